"""The host's shared-memory arena, worker side (docs/protocol.md, "Shared memory").

The host offers a sealed memfd in ``hello.shm``: ``[0, split)`` is the host's part (call
arguments arrive there), ``[split, size)`` is ours (large results and chunks go there).

* Arguments: each call gets its own read-only mapping of the host's part (taken from a small
  pool, so page tables stay warm and no system call is made per call) and views of its regions
  in it. Every view, slice or numpy array over one of them keeps the mapping's buffer export,
  which holds a reference to the mapping: so once the call is answered and the bridge has
  dropped its own views, the mapping's reference count tells whether the tool kept anything.
  If it did, the call's regions are kept (its last message says ``keep``; the host never reuses
  them) and the mapping stays with whatever views it, never reused; else it goes back to the
  pool.
* Results: ``put`` copies a buffer into a free region of our part (first fit, 64-byte aligned);
  the host copies it out and sends ``release`` with its offset, and the region is free again.
  No room: the segment takes the pipe.
"""

from __future__ import annotations

import bisect
import mmap
import os
import sys
import threading
from typing import Any

_PAGE = mmap.ALLOCATIONGRANULARITY
_ALIGN = 64
_POOL = 8  # argument mappings kept for reuse (one per call running at once is enough)


class Lease:
    """A call's argument mapping, held only through this object (see `Arena.let_go`)."""

    __slots__ = ("m",)

    def __init__(self, m: mmap.mmap) -> None:
        self.m: mmap.mmap | None = m


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
        self._maps: list[mmap.mmap] = []  # argument mappings to reuse
        os.set_inheritable(fd, False)  # our children get no copy

    def lease(self) -> Lease:
        """A read-only mapping of the host's part for one call's arguments."""
        with self._lock:
            m = self._maps.pop() if self._maps else None
        if m is None:
            m = mmap.mmap(self.fd, self.split, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return Lease(m)

    def view(self, lease: Lease, offset: Any, n: Any) -> memoryview:
        """A read-only view of ``n`` bytes at ``offset`` of the host's part, in the call's
        mapping. Raises ValueError when they are not inside the host's part."""
        if type(offset) is not int or type(n) is not int or offset < 0 or n < 0 or offset + n > self.split:
            raise ValueError("shared-memory segment [%r, %r] is outside the host's part [0, %d)" % (offset, n, self.split))
        if lease.m is None:
            raise ValueError("the call's mapping is gone")
        return memoryview(lease.m)[offset : offset + n]

    def let_go(self, leases: list[Lease]) -> bool:
        """Takes back a call's mappings once the bridge has dropped its own views; False when
        something still views one (that mapping then lives on with its views, never reused)."""
        ok = True
        for lease in leases:
            # References: `lease.m` and getrefcount's argument; a live buffer export adds one.
            if lease.m is not None and sys.getrefcount(lease.m) > 2:
                ok = False
            elif lease.m is not None:
                with self._lock:
                    if len(self._maps) < _POOL:
                        self._maps.append(lease.m)
            lease.m = None
        return ok

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

