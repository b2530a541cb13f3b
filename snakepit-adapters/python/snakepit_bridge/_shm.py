"""The host's shared-memory arena, worker side (docs/protocol.md, "Shared memory").

The host offers a sealed memfd in ``hello.shm``: ``[0, split)`` is the host's part (call
arguments arrive there), ``[split, size)`` is ours (large results and chunks go there).

* Arguments: each call maps its regions read-only on their own (``args``), so that after the
  tool returns, ``mmap.close()`` tells whether anything still holds a view of them (a numpy
  array over the buffer, a slice kept in a global): then the regions are kept (the reply says
  ``keep``) and the host never reuses them.
* Results: ``put`` copies a buffer into a free region of our part (first fit, 64-byte aligned);
  the host copies it out and sends ``release`` with its offset, and the region is free again.
  No room: the segment takes the pipe.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from typing import Any

_PAGE = mmap.ALLOCATIONGRANULARITY
_ALIGN = 64
# Maps a call's argument pages up front (one call, not one page fault per 64 KiB read).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class Arena:
    """The arena as the worker sees it. ``put`` and ``release`` may be called from any thread."""

    def __init__(self, fd: Any, size: Any, split: Any, threshold: Any) -> None:
        for name, v in (("fd", fd), ("size", size), ("split", split), ("threshold", threshold)):
            if type(v) is not int or v < 0:
                raise ValueError("hello.shm.%s is %r, not a non-negative integer" % (name, v))
        if not 0 < split < size or split % _PAGE or threshold < 1:
            raise ValueError("hello.shm: split %d does not divide size %d at a page boundary" % (split, size))
        if os.fstat(fd).st_size < size:
            raise ValueError("the shared-memory descriptor %d holds less than %d bytes" % (fd, size))
        self.fd: int = fd
        self.size: int = size
        self.split: int = split
        self.threshold: int = threshold
        self._out = mmap.mmap(fd, size - split, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=split)
        self._view = memoryview(self._out)
        # Free ranges of our part, [offset, length] relative to `split`, sorted and coalesced.
        self._free: list[list[int]] = [[0, size - split]]
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()
        self.full = 0  # segments that took the pipe for want of room
        os.set_inheritable(fd, False)  # our children get no copy

    def args(self, offset: Any, n: Any) -> tuple[mmap.mmap | None, memoryview]:
        """A read-only view of ``n`` bytes at ``offset`` of the host's part, in a mapping of
        its own (None for an empty segment). Raises ValueError when they are not inside it."""
        if type(offset) is not int or type(n) is not int or offset < 0 or n < 0 or offset + n > self.split:
            raise ValueError("shared-memory segment [%r, %r] is outside the host's part [0, %d)" % (offset, n, self.split))
        if n == 0:
            return None, memoryview(b"")
        base = offset - offset % _PAGE
        m = mmap.mmap(self.fd, offset + n - base, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ, offset=base)
        return m, memoryview(m)[offset - base :]

    def put(self, data: memoryview) -> int | None:
        """Copies ``data`` (bytes, 1-D) into a free region of our part; returns its offset in
        the arena, or None when no free range is large enough."""
        n = data.nbytes
        size = max(_ALIGN, -(-n // _ALIGN) * _ALIGN)
        o = -1
        with self._lock:
            for i, (start, length) in enumerate(self._free):
                if length >= size:
                    o = start
                    if length == size:
                        del self._free[i]
                    else:
                        self._free[i] = [o + size, length - size]
                    self._used[o] = size
                    break
            else:
                self.full += 1
                return None
        self._view[o : o + n] = data
        return self.split + o

    def release(self, offsets: Any) -> None:
        """The host copied these regions out (``release``): they are free again. Offsets that
        name no region of ours are ignored."""
        if type(offsets) is not list:
            return
        with self._lock:
            for a in offsets:
                if type(a) is not int:
                    continue
                o = a - self.split
                size = self._used.pop(o, None)
                if size is None:
                    continue
                free = self._free
                i = bisect.bisect_left(free, [o, 0])
                if i > 0 and free[i - 1][0] + free[i - 1][1] == o:
                    i -= 1
                    free[i][1] += size
                else:
                    free.insert(i, [o, size])
                if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
                    free[i][1] += free[i + 1][1]
                    del free[i + 1]

    def free_bytes(self) -> int:
        """How many bytes of our part are free (tests)."""
        with self._lock:
            return sum(length for _, length in self._free)


def let_go(maps: list[mmap.mmap]) -> bool:
    """Unmaps a call's argument mappings; False when one is still viewed (it then stays mapped
    until its last view goes, and the host must never reuse its region)."""
    ok = True
    for m in maps:
        try:
            m.close()
        except BufferError:
            ok = False
    return ok
