"""The worker's side of the shared-memory arena (snakepit_bridge._shm), over a real memfd."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

from snakepit_bridge import _shm

SIZE = 4 * mmap.ALLOCATIONGRANULARITY * 16
SPLIT = SIZE // 2


@pytest.fixture
def arena() -> Iterator[_shm.Arena]:
    fd = os.memfd_create("test-arena")
    os.ftruncate(fd, SIZE)
    a = _shm.Arena(fd, SIZE, SPLIT, 1024)
    yield a
    os.close(fd)


def test_results_take_first_fit_regions_that_release_coalesces(arena: _shm.Arena) -> None:
    part = SIZE - SPLIT
    a = arena.put(memoryview(b"x" * 100))
    b = arena.put(memoryview(b"y" * 64))
    c = arena.put(memoryview(b"z" * 10))
    assert (a, b, c) == (SPLIT, SPLIT + 128, SPLIT + 192)
    assert arena.free_bytes() == part - 256
    arena.release([b])
    assert arena.put(memoryview(b"w" * 60)) == b  # fits b's hole
    arena.release([a, b, c, 12345, "junk"])  # unknown offsets are ignored
    arena.release("not a list")
    assert arena.free_bytes() == part
    assert arena.put(memoryview(bytes(part + 1))) is None
    assert arena.full == 1
    whole = arena.put(memoryview(bytes(part)))
    assert whole == SPLIT
    arena.release([whole])
    assert arena.free_bytes() == part


def test_what_put_writes_is_in_the_workers_part_of_the_memfd(arena: _shm.Arena) -> None:
    off = arena.put(memoryview(b"hello"))
    assert off is not None
    with mmap.mmap(arena.fd, SIZE, access=mmap.ACCESS_READ) as m:
        assert m[off : off + 5] == b"hello"


def test_arguments_are_read_only_views_and_bounds_are_checked(arena: _shm.Arena) -> None:
    with mmap.mmap(arena.fd, SIZE) as m:
        m[5000:5004] = b"abcd"
    lease = arena.lease()
    view = arena.view(lease, 5000, 4)
    assert bytes(view) == b"abcd"
    assert view.readonly
    assert arena.view(lease, 100, 0).nbytes == 0
    for off, n in ((SPLIT - 1, 2), (-1, 1), (0, SPLIT + 1), ("0", 1), (0, None)):
        with pytest.raises(ValueError):
            arena.view(lease, off, n)
    del view
    assert arena.let_go([lease])
    again = arena.lease()  # the mapping is reused
    assert bytes(arena.view(again, 5000, 4)) == b"abcd"


def test_a_mapping_still_viewed_is_not_reused(arena: _shm.Arena) -> None:
    import numpy as np

    for keep in (lambda v: v[10:20], lambda v: np.frombuffer(v, np.uint8), lambda v: memoryview(v), lambda v: v.obj):
        lease = arena.lease()
        view = arena.view(lease, 0, 4096)
        kept = keep(view)
        del view
        m = lease.m
        assert not arena.let_go([lease]), keep
        assert m is not None and not m.closed  # lives on with its views
        del kept, m
    # Nothing kept: back to the pool, reused by the next call.
    lease = arena.lease()
    first = id(lease.m)  # not a reference: that would count as one
    view = arena.view(lease, 0, 4096)
    np.frombuffer(view, np.uint8).sum()
    del view
    assert arena.let_go([lease])
    assert id(arena.lease().m) == first


def test_bad_offers_are_refused(arena: _shm.Arena) -> None:
    for args in ((arena.fd, SIZE, SIZE, 1), (arena.fd, SIZE, 100, 1), (arena.fd, SIZE * 2, SPLIT, 1), (-1, SIZE, SPLIT, 1), (arena.fd, "x", SPLIT, 1)):
        with pytest.raises((ValueError, OSError)):
            _shm.Arena(*args)
