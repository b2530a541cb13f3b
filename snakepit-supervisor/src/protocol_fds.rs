//! Protocol pipes at fds 3 and 4 ([`ProtocolIo::Fds`](snakepit_core::ProtocolIo::Fds)), for
//! runtimes that cannot move the protocol off fd 1 themselves (Node has no `dup2`).
//!
//! The host makes two close-on-exec pipes. In the worker (not its shepherd, which closes
//! everything but its lifeline), between fork and exec, the worker's ends are `dup2`ed to fds 3
//! and 4 (which clears close-on-exec on those numbers only) and fd 1 becomes a copy of fd 2,
//! the stderr pipe; fd 0 is `/dev/null`. Every other copy of the pipes is close-on-exec, so
//! after `exec` the worker holds its ends at 3 and 4 only, and the host its own ends only.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use snakepit_core::{Error, WorkerId, WorkerIo};

/// The lowest descriptor number the worker's ends (and an inherited arena) may have before
/// the `dup2`s: anything at 3 or 4 would be overwritten by them.
pub(crate) const FIRST_FREE: RawFd = 5;

/// The environment variable that tells the worker where its protocol is.
pub(crate) const ENV: (&str, &str) = ("SNAKEPIT_PROTOCOL_FDS", "3,4");

/// The two pipes, before the spawn.
#[derive(Debug)]
pub(crate) struct ProtocolPipes {
    /// The worker's read end (becomes its fd 3).
    worker_in: OwnedFd,
    /// The worker's write end (becomes its fd 4).
    worker_out: OwnedFd,
    host_in: OwnedFd,
    host_out: OwnedFd,
    /// Descriptors below [`FIRST_FREE`] that were moved up: held open until after the spawn,
    /// so that nothing made in between (the lifeline, std's exec-error pipe) takes fd 3 or 4,
    /// which the worker's `dup2`s would then close under it.
    low: Vec<OwnedFd>,
}

impl ProtocolPipes {
    /// Makes the pipes, the worker's ends numbered at least [`FIRST_FREE`].
    pub(crate) fn new() -> std::io::Result<Self> {
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (worker_in, host_in) = nix::unistd::pipe2(cloexec)?;
        let (host_out, worker_out) = nix::unistd::pipe2(cloexec)?;
        let mut low = Vec::new();
        let worker_in = above(worker_in, &mut low)?;
        let worker_out = above(worker_out, &mut low)?;
        Ok(ProtocolPipes { worker_in, worker_out, host_in, host_out, low })
    }

    /// `fd` numbered at least [`FIRST_FREE`] (see [`above`]), its low original held with the
    /// pipes until the spawn is done.
    pub(crate) fn above(&mut self, fd: OwnedFd) -> std::io::Result<OwnedFd> {
        above(fd, &mut self.low)
    }

    /// The worker's ends, for the pre-exec hook ([`install`]).
    pub(crate) fn worker_fds(&self) -> (RawFd, RawFd) {
        (self.worker_in.as_raw_fd(), self.worker_out.as_raw_fd())
    }

    /// After the spawn: closes the worker's ends in the host and wraps the host's for the
    /// transport (non-blocking, on the runtime's reactor).
    pub(crate) fn into_io(self, worker: WorkerId) -> std::io::Result<WorkerIo> {
        let ProtocolPipes { worker_in, worker_out, host_in, host_out, low } = self;
        drop((worker_in, worker_out, low));
        let input = tokio::net::unix::pipe::Sender::from_owned_fd(host_in)?;
        let output = tokio::net::unix::pipe::Receiver::from_owned_fd(host_out)?;
        Ok(WorkerIo { worker, input: Box::new(input), output: Box::new(output) })
    }
}

/// `fd` itself when its number is at least [`FIRST_FREE`], else a close-on-exec copy that is
/// (the original goes to `low`, to be closed after the spawn).
#[allow(unsafe_code)] // adopting the descriptor F_DUPFD_CLOEXEC returns
fn above(fd: OwnedFd, low: &mut Vec<OwnedFd>) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() >= FIRST_FREE {
        return Ok(fd);
    }
    let copy = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FIRST_FREE))?;
    low.push(fd);
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// In the worker, between fork and exec: the protocol pipes to fds 3 and 4, stdout to the
/// stderr pipe. Only async-signal-safe calls (`dup2`).
#[allow(unsafe_code)] // dup2 between fork and exec
pub(crate) fn install((worker_in, worker_out): (RawFd, RawFd)) -> std::io::Result<()> {
    for (from, to) in [(2, 1), (worker_in, 3), (worker_out, 4)] {
        // SAFETY: dup2 on descriptors this process holds; the sources are >= FIRST_FREE, so
        // no earlier dup2 overwrote them.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A spawn error for a failure to set the pipes up.
pub(crate) fn setup_error(worker: WorkerId, program: &str, e: std::io::Error) -> Error {
    Error::Spawn {
        worker,
        program: program.to_string(),
        reason: "cannot set up the protocol pipes (fds 3 and 4)".into(),
        source: Some(e),
    }
}
