//! The shepherd: a tiny per-worker guardian process that makes "no orphans" hold even when the
//! host is SIGKILLed.
//!
//! `PR_SET_PDEATHSIG` reaches only a direct child, and a process group misses descendants that
//! call `setsid()`. So every worker is started under a shepherd:
//!
//! ```text
//! host ──(lifeline pipe)──▶ shepherd (PR_SET_CHILD_SUBREAPER, own process group)
//!                             └─ worker (PDEATHSIG = SIGKILL, execs the adapter's program)
//!                                  └─ grandchildren (any, even after setsid())
//! ```
//!
//! The shepherd is the child that `fork` creates for the worker: inside the `pre_exec` hook it
//! forks once more; the grandchild returns from the hook and execs the worker program, while
//! the shepherd never returns: it closes every descriptor but the lifeline's read end and waits
//! for either the worker's exit (on a pidfd) or the lifeline to close. The host holds the only
//! write end of the lifeline (close-on-exec, never inherited by workers), so the lifeline closes
//! when the host asks for a kill (it drops the write end) or when the host dies, however it
//! dies. Then, and also after the worker exits on its own, the shepherd kills every process in
//! its subtree: as the subreaper, orphaned descendants (including `setsid()` escapees) are
//! re-parented to it, and it kills its children and reaps until it has none. Finally it exits
//! with the worker's own status (re-raising the worker's fatal signal), so the host sees the
//! worker's exit as if it were its direct child.
//!
//! Everything here after `fork` runs in a child of a multi-threaded process, so it only makes
//! async-signal-safe system calls: no allocation, no locks, no `std` I/O.

// Everything here runs in a forked child of a multi-threaded host, between fork and exec:
// raw async-signal-safe system calls only, so unsafe is this module's nature.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// Runs in the forked child (the future shepherd) from `pre_exec`. Returns `Ok(())` only in the
/// grandchild, which then execs the worker program; the shepherd never returns.
///
/// # Safety
/// Must only be called in a freshly forked child, from `pre_exec`.
pub(crate) unsafe fn fork_shepherd(lifeline: RawFd, host: libc::pid_t) -> io::Result<()> {
    // SAFETY (whole body): plain system calls on values we own, as `pre_exec` requires.
    unsafe {
        if libc::getppid() != host {
            // The host died between its fork and now: nobody will ever close the lifeline.
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let shepherd = libc::getpid();
        let worker = libc::fork();
        if worker < 0 {
            return Err(io::Error::last_os_error());
        }
        if worker == 0 {
            // The worker: dies with its shepherd; the lifeline is close-on-exec.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != shepherd {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            return Ok(());
        }
        shepherd_main(lifeline, worker)
    }
}

unsafe fn shepherd_main(lifeline: RawFd, worker: libc::pid_t) -> ! {
    // SAFETY (whole body): async-signal-safe system calls only.
    unsafe {
        // Group-wide signals the host sends to stop the worker gracefully are not for us.
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        close_all_but(lifeline);
        let pidfd = libc::syscall(libc::SYS_pidfd_open, worker, 0) as libc::c_int;
        let mut status: libc::c_int = 0;
        let mut worker_reaped = false;
        loop {
            let mut fds = [
                libc::pollfd { fd: lifeline, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 },
            ];
            // Without a pidfd (old kernels), poll the lifeline and check the worker every 50 ms.
            let (n, timeout) = if pidfd >= 0 { (2, -1) } else { (1, 50) };
            let r = libc::poll(fds.as_mut_ptr(), n, timeout);
            if r < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                break;
            }
            if fds[0].revents != 0 {
                break; // lifeline closed: the host wants the worker gone, or is itself gone
            }
            if pidfd < 0 || fds[1].revents != 0 {
                let w = libc::waitpid(worker, &mut status, if pidfd < 0 { libc::WNOHANG } else { 0 });
                if w == worker {
                    worker_reaped = true;
                    break;
                }
            }
        }
        // Kill the whole subtree and reap it. Re-parenting to us (the subreaper) happens before
        // a dead parent becomes reapable, so once `waitpid` reports ECHILD nothing is left.
        loop {
            kill_children();
            let mut st: libc::c_int = 0;
            let r = libc::waitpid(-1, &mut st, 0);
            if r == worker {
                worker_reaped = true;
                status = st;
            } else if r < 0 {
                match errno() {
                    libc::EINTR => continue,
                    _ => break,
                }
            }
        }
        if !worker_reaped {
            libc::_exit(137);
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

fn errno() -> libc::c_int {
    // SAFETY: reading the thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Closes every descriptor except `keep` (stdio included: the worker's pipes must reach EOF
/// when the worker dies, and other workers' pipes and the host's sockets are not ours).
unsafe fn close_all_but(keep: RawFd) {
    // SAFETY: close_range/close on descriptors of this (forked) process.
    unsafe {
        let k = keep as libc::c_uint;
        let ok = (k == 0 || libc::syscall(libc::SYS_close_range, 0u32, k - 1, 0u32) == 0)
            && libc::syscall(libc::SYS_close_range, k + 1, u32::MAX, 0u32) == 0;
        if !ok {
            for fd in 0..65536 {
                if fd != keep {
                    libc::close(fd);
                }
            }
        }
    }
}

/// SIGKILLs every current child, read from `/proc/thread-self/children` without allocating.
unsafe fn kill_children() {
    // SAFETY: open/read/close/kill with a stack buffer.
    unsafe {
        let path = c"/proc/thread-self/children";
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        let mut buf = [0u8; 512];
        let mut pid: libc::pid_t = 0;
        let mut in_number = false;
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            for &b in &buf[..n as usize] {
                if b.is_ascii_digit() {
                    pid = pid.saturating_mul(10).saturating_add((b - b'0') as libc::pid_t);
                    in_number = true;
                } else if in_number {
                    libc::kill(pid, libc::SIGKILL);
                    pid = 0;
                    in_number = false;
                }
            }
        }
        if in_number && pid > 0 {
            libc::kill(pid, libc::SIGKILL);
        }
        libc::close(fd);
    }
}
