//! # snakepit-shm
//!
//! A shared-memory **arena** per worker: large binary segments travel through it instead of
//! the worker's pipe (docs/protocol.md, "Shared memory").
//!
//! ```text
//!  0                         split                         size
//!  +---------------------------+----------------------------+
//!  | host → worker             | worker → host              |
//!  | (the host allocates here: | (the worker allocates; the |
//!  |  call arguments)          |  host only copies out)     |
//!  +---------------------------+----------------------------+
//! ```
//!
//! * The arena is a `memfd` created `MFD_CLOEXEC | MFD_ALLOW_SEALING`, sized, then sealed with
//!   `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` **before** any worker sees it: no `ftruncate`
//!   by the worker can make the host's mapping fault (`SIGBUS`).
//! * The host maps it once, read-write. It writes only into its half, into regions it
//!   allocated ([`Arena::alloc`]); it never takes a reference to the shared bytes, only copies
//!   in and out through raw pointers.
//! * The worker's half is untrusted: [`Arena::read`] bounds-checks an offset and length the
//!   worker sent and copies the bytes out before anything parses them (a worker that scribbles
//!   on them meanwhile gets garbage back, never memory outside the mapping).
//!
//! The descriptor reaches the worker as an inherited fd (cold start) or with the zygote's fork
//! request (`SCM_RIGHTS`); see `snakepit-supervisor`. This crate only makes, maps and accounts
//! for the memory. `#![deny(unsafe_code)]`: the few sites that need it say why they are sound.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{madvise, mmap, munmap, MapFlags, MmapAdvise, ProtFlags};

/// Copies out of the arena at least this large go into memory advised for transparent huge
/// pages (as numpy does for its arrays): faulting in 100 MB of fresh 4 KiB pages costs more
/// than copying it.
const HUGE_COPY: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Sizes are rounded up to this (a multiple of every page size Linux uses by default), so that
/// the worker's half starts on a page boundary and can be mapped on its own.
pub const GRANULE: usize = 64 * 1024;

/// Regions are aligned to (and sized in multiples of) this many bytes: a cache line, and
/// enough for any numpy dtype.
pub const ALIGN: usize = 64;

/// What can go wrong with an arena.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The arena could not be made (`memfd_create`, `ftruncate`, sealing or `mmap` failed).
    #[error("cannot create a shared-memory arena of {size} bytes: {step} failed")]
    Create {
        /// The arena size asked for.
        size: usize,
        /// The system call that failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
    /// A region the worker named does not lie inside the worker's half of the arena.
    #[error(
        "shared-memory region [{offset}, +{len}) is outside the worker's part of the arena [{start}, {end})"
    )]
    OutOfBounds {
        /// The offset the worker sent.
        offset: u64,
        /// The length the worker sent.
        len: u64,
        /// Where the worker's half starts.
        start: usize,
        /// Where it ends (the arena's size).
        end: usize,
    },
}

/// A region of the host's half of an arena, allocated by [`Arena::alloc`]. Give it back with
/// [`Arena::free`] (the worker is done with it) or [`Arena::retire`] (it may still be read).
#[derive(Debug, PartialEq, Eq)]
pub struct Region {
    offset: usize,
    len: usize,
    /// The allocated size (the length rounded up to [`ALIGN`]).
    size: usize,
}

impl Region {
    /// Where the region starts, from the start of the arena.
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }

    /// How many bytes it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Process-wide counts of arena traffic (all arenas), for stats and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Segments the host wrote into an arena.
    pub to_worker: u64,
    /// Segments the host copied out of an arena.
    pub from_worker: u64,
    /// Segments that went over the pipe because the arena had no room for them.
    pub arena_full: u64,
    /// Regions retired (never reused) because the worker could not let go of them.
    pub retired: u64,
}

static TO_WORKER: AtomicU64 = AtomicU64::new(0);
static FROM_WORKER: AtomicU64 = AtomicU64::new(0);
static ARENA_FULL: AtomicU64 = AtomicU64::new(0);
static RETIRED: AtomicU64 = AtomicU64::new(0);

/// The process-wide [`Counters`].
pub fn counters() -> Counters {
    Counters {
        to_worker: TO_WORKER.load(Ordering::Relaxed),
        from_worker: FROM_WORKER.load(Ordering::Relaxed),
        arena_full: ARENA_FULL.load(Ordering::Relaxed),
        retired: RETIRED.load(Ordering::Relaxed),
    }
}

/// A sealed memfd mapped into the host, split into the host's half and the worker's half.
pub struct Arena {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    size: usize,
    split: usize,
    /// Free ranges of the host's half: offset → length, coalesced.
    free: Mutex<BTreeMap<usize, usize>>,
}

// SAFETY: `ptr` is a shared mapping owned by the arena for its whole life; the arena only
// copies through it (never hands out references), and the free list is behind a mutex.
#[allow(unsafe_code)]
unsafe impl Send for Arena {}
// SAFETY: as for `Send`: every method takes `&self` and either locks the free list or copies
// through the raw pointer into or out of memory no Rust reference points at.
#[allow(unsafe_code)]
unsafe impl Sync for Arena {}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("size", &self.size).field("split", &self.split).finish_non_exhaustive()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are the mapping made in `create`, unmapped exactly once, here;
        // no reference into it exists (only raw copies were ever made).
        #[allow(unsafe_code)]
        let _ = unsafe { munmap(self.ptr.cast(), self.size) };
    }
}

impl Arena {
    /// Creates, sizes, seals and maps an arena of at least `size` bytes (rounded up to twice
    /// [`GRANULE`]); each side gets half.
    pub fn create(size: usize) -> Result<Arena, Error> {
        let size = size.max(1).div_ceil(2 * GRANULE).saturating_mul(2 * GRANULE);
        let err = |step, source| Error::Create { size, step, source };
        let fd = memfd_create(c"snakepit-arena", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| err("memfd_create", e))?;
        let len = i64::try_from(size).map_err(|_| err("ftruncate", nix::Error::EFBIG))?;
        nix::unistd::ftruncate(&fd, len).map_err(|e| err("ftruncate", e))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| err("sealing", e))?;
        let length = NonZeroUsize::new(size).ok_or_else(|| err("mmap", nix::Error::EINVAL))?;
        // SAFETY: a fresh shared mapping of a descriptor we own and sealed against shrinking,
        // at an address the kernel picks: it aliases no Rust object, and it stays the file's
        // full size for the mapping's whole life, so no access inside it can fault.
        #[allow(unsafe_code)]
        let ptr = unsafe {
            mmap(None, length, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, 0)
        }
        .map_err(|e| err("mmap", e))?;
        let split = size / 2;
        Ok(Arena { fd, ptr: ptr.cast(), size, split, free: Mutex::new(BTreeMap::from([(0, split)])) })
    }

    /// The memfd, for the worker to inherit (it is close-on-exec in the host).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The arena's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Where the worker's half starts (the host's half is `[0, split)`).
    pub fn split(&self) -> usize {
        self.split
    }

    fn free_list(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, usize>> {
        // Every operation leaves the map consistent before it can panic: recover it.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates `len` bytes of the host's half (first fit), or `None` when no free range is
    /// large enough (counted in [`Counters::arena_full`]).
    pub fn alloc(&self, len: usize) -> Option<Region> {
        let size = len.max(1).checked_next_multiple_of(ALIGN)?;
        let mut free = self.free_list();
        let found = free.iter().find(|(_, &n)| n >= size).map(|(&o, &n)| (o, n));
        let Some((offset, n)) = found else {
            drop(free);
            ARENA_FULL.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        free.remove(&offset);
        if n > size {
            free.insert(offset + size, n - size);
        }
        Some(Region { offset, len, size })
    }

    /// Allocates a region for `data` and copies it in (see [`Arena::alloc`]).
    pub fn alloc_copy(&self, data: &[u8]) -> Option<Region> {
        let region = self.alloc(data.len())?;
        // SAFETY: `region` came from this arena's host half, so `[offset, offset + len)` is
        // inside the mapping; `data` is ordinary host memory and cannot overlap it (the
        // mapping is never lent out as a Rust slice).
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(region.offset), data.len());
        }
        TO_WORKER.fetch_add(1, Ordering::Relaxed);
        Some(region)
    }

    /// Gives a region back: the worker is done with it.
    pub fn free(&self, region: Region) {
        let Region { mut offset, size, .. } = region;
        if !self.owns(offset, size) {
            return;
        }
        let mut len = size;
        let mut free = self.free_list();
        // Merge with the free range just before and the one just after.
        if let Some((&o, &n)) = free.range(..offset).next_back() {
            if o + n == offset {
                free.remove(&o);
                offset = o;
                len += n;
            }
        }
        if let Some(n) = free.remove(&(offset + len)) {
            len += n;
        }
        free.insert(offset, len);
    }

    /// Whether `[offset, offset + size)` lies in the host's half (a region of another arena
    /// does not, and is then ignored rather than let `alloc` hand out memory past it).
    fn owns(&self, offset: usize, size: usize) -> bool {
        let ok = offset.checked_add(size).is_some_and(|end| end <= self.split);
        debug_assert!(ok, "a region of another arena");
        ok
    }

    /// Never reuses a region (the worker may still read it); it is gone with the arena.
    pub fn retire(&self, region: Region) {
        let _ = region;
        RETIRED.fetch_add(1, Ordering::Relaxed);
    }

    /// How many bytes of the host's half are free.
    pub fn host_free(&self) -> usize {
        self.free_list().values().sum()
    }

    /// Copies `len` bytes at `offset` out of the worker's half, after checking that they lie
    /// inside it ([`Error::OutOfBounds`] otherwise).
    pub fn read(&self, offset: u64, len: u64) -> Result<Bytes, Error> {
        let out = || Error::OutOfBounds { offset, len, start: self.split, end: self.size };
        let start = usize::try_from(offset).map_err(|_| out())?;
        let n = usize::try_from(len).map_err(|_| out())?;
        let end = start.checked_add(n).ok_or_else(out)?;
        if start < self.split || end > self.size {
            return Err(out());
        }
        let mut v = Vec::<u8>::with_capacity(n);
        if n >= HUGE_COPY {
            advise_huge(&mut v);
        }
        // SAFETY: `[start, end)` lies inside the mapping (checked above); the destination is
        // a fresh allocation of `n` bytes. The worker may write to those bytes meanwhile: we
        // then copy whatever it wrote, never anything outside the mapping, and no Rust
        // reference to the shared bytes is created.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), v.as_mut_ptr(), n);
            v.set_len(n);
        }
        FROM_WORKER.fetch_add(1, Ordering::Relaxed);
        Ok(Bytes::from(v))
    }

    /// Writes into the worker's half, as a worker would (tests and the conformance kit's
    /// fake workers only; the host never writes there).
    #[doc(hidden)]
    pub fn write_worker_part(&self, offset: usize, data: &[u8]) -> Result<(), Error> {
        let end = offset.checked_add(data.len()).filter(|&e| offset >= self.split && e <= self.size);
        if end.is_none() {
            return Err(Error::OutOfBounds {
                offset: offset as u64,
                len: data.len() as u64,
                start: self.split,
                end: self.size,
            });
        }
        // SAFETY: inside the mapping (checked above); `data` is host memory, not the mapping.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len());
        }
        Ok(())
    }
}

/// Asks for transparent huge pages for the 2 MiB-aligned part of `v`'s (untouched) spare
/// capacity. Advisory: ignored where THP is off.
fn advise_huge(v: &mut Vec<u8>) {
    let spare = v.spare_capacity_mut();
    let addr = spare.as_mut_ptr() as usize;
    let start = addr.next_multiple_of(HUGE_PAGE);
    let end = (addr + spare.len()) / HUGE_PAGE * HUGE_PAGE;
    if let (Some(p), true) = (NonNull::new(start as *mut std::ffi::c_void), end > start) {
        // SAFETY: the range lies inside `v`'s own allocation; MADV_HUGEPAGE changes how its
        // pages are backed, never their contents or validity.
        #[allow(unsafe_code)]
        let _ = unsafe { madvise(p, end - start, MmapAdvise::MADV_HUGEPAGE) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_round_up_and_split_in_half() {
        let a = Arena::create(1000).unwrap();
        assert_eq!(a.size(), 2 * GRANULE);
        assert_eq!(a.split(), GRANULE);
        assert_eq!(a.host_free(), GRANULE);
    }

    #[test]
    fn the_memfd_is_sealed_against_resizing() {
        let a = Arena::create(4 * GRANULE).unwrap();
        assert_eq!(nix::unistd::ftruncate(a.fd(), 0), Err(nix::Error::EPERM));
        assert_eq!(nix::unistd::ftruncate(a.fd(), 1 << 30), Err(nix::Error::EPERM));
        let more = SealFlag::F_SEAL_WRITE;
        assert_eq!(fcntl(a.fd(), FcntlArg::F_ADD_SEALS(more)), Err(nix::Error::EPERM));
        // Close-on-exec in the host: a worker gets it only when the spawner hands it over.
        let flags = fcntl(a.fd(), FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn regions_are_first_fit_aligned_and_coalesce_when_freed() {
        let a = Arena::create(2 * GRANULE).unwrap();
        let r1 = a.alloc(10).unwrap();
        let r2 = a.alloc(100).unwrap();
        let r3 = a.alloc(64).unwrap();
        assert_eq!((r1.offset(), r2.offset(), r3.offset()), (0, 64, 192));
        assert_eq!(r2.len(), 100);
        a.free(r2);
        // Fits in r2's hole.
        let r4 = a.alloc(128).unwrap();
        assert_eq!(r4.offset(), 64);
        a.free(r1);
        a.free(r4);
        a.free(r3);
        assert_eq!(a.host_free(), GRANULE);
        assert_eq!(a.free_list().len(), 1, "coalesced back into one range");
        // The whole half, then nothing.
        let all = a.alloc(GRANULE).unwrap();
        assert!(a.alloc(1).is_none());
        a.retire(all);
        assert!(a.alloc(1).is_none(), "a retired region is never reused");
    }

    #[test]
    fn writes_land_where_reads_of_the_same_memory_see_them() {
        let a = Arena::create(2 * GRANULE).unwrap();
        let r = a.alloc_copy(b"hello").unwrap();
        // A second mapping of the same memfd sees the host's write (what a worker maps).
        let len = NonZeroUsize::new(a.size()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: a fresh read-only shared mapping, unmapped below; read through a raw copy.
        let view = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, a.fd(), 0) }.unwrap();
        let mut got = [0u8; 5];
        #[allow(unsafe_code)]
        // SAFETY: the region lies inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                view.cast::<u8>().as_ptr().add(r.offset() as usize),
                got.as_mut_ptr(),
                5,
            );
            munmap(view, a.size()).unwrap();
        }
        assert_eq!(&got, b"hello");
        a.write_worker_part(a.split() + 128, b"world").unwrap();
        assert_eq!(&a.read((a.split() + 128) as u64, 5).unwrap()[..], b"world");
    }

    #[test]
    fn reads_outside_the_workers_half_are_refused() {
        let a = Arena::create(2 * GRANULE).unwrap();
        let s = a.split() as u64;
        let end = a.size() as u64;
        for (off, len) in [(0, 1), (s - 1, 2), (end, 1), (end - 1, 2), (s, u64::MAX), (u64::MAX, 1)] {
            assert!(matches!(a.read(off, len), Err(Error::OutOfBounds { .. })), "{off}+{len}");
        }
        assert_eq!(a.read(s, 0).unwrap().len(), 0);
        assert_eq!(a.read(s, end - s).unwrap().len(), (end - s) as usize);
        assert!(a.write_worker_part(0, b"x").is_err());
    }
}
