//! Process descriptors: signals and exit checks that can never reach a reused pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

/// Sends `sig` through a pidfd (a dead process yields ESRCH, never another process).
#[allow(unsafe_code)] // the pidfd_send_signal syscall: no safe wrapper in nix
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal on a descriptor we own, with no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the process behind a pidfd has exited (it may not be reaped yet).
#[allow(unsafe_code)] // poll(2) on a pidfd we own, with a zero timeout
pub(crate) fn pidfd_exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// `pid`'s start time, read while `pidfd` (a descriptor for that very process) says it has not
/// exited: checked after reading, so the value belongs to the process the pidfd names and not to
/// a process that reused its pid.
pub(crate) fn pinned_start_time(pid: u32, pidfd: &OwnedFd) -> Option<u64> {
    let start = crate::registry::start_time(pid)?;
    (!pidfd_exited(pidfd)).then_some(start)
}

/// Registers a descriptor we own with the runtime's reactor.
#[allow(unsafe_code)] // AsyncFd registration of a descriptor we own
pub(crate) fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` stays open and keeps naming the same file description until the
    // `AsyncFd` that owns it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// A pidfd for `pid`, or `None`.
#[allow(unsafe_code)] // the pidfd_open syscall: no safe wrapper in nix
pub(crate) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
