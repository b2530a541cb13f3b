//! Finding, killing and waiting for the processes a test started, by a marker in their
//! environment. Shared (via `#[path]`) with the CLI tests of `snakepit-cli`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The environment variable that tags every process a test starts.
pub const MARKER_VAR: &str = "SNAKEPIT_TEST_MARKER";

/// A unique marker for one test.
pub fn new_marker() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("t{}-{nanos}", std::process::id())
}

/// Live (non-zombie) processes whose environment holds `MARKER_VAR=marker`.
pub fn marked_pids(marker: &str) -> Vec<i32> {
    let needle = format!("{MARKER_VAR}={marker}");
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) && !is_zombie(pid) {
            out.push(pid);
        }
    }
    out
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// Waits until `pid` has exited (or `deadline` passes), on a pidfd: no polling loop.
/// Returns whether it exited.
#[allow(unsafe_code)] // pidfd_open and poll(2): no safe wrapper in the test dependencies
pub fn wait_exit(pid: i32, deadline: Instant) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return true; // ESRCH: already gone
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p =
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&fd), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 {
            return false;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return !std::path::Path::new(&format!("/proc/{pid}")).exists();
        }
    }
}

/// Live (non-zombie) children of this process (worker shepherds are forks of the host, so
/// they carry no marker of their own).
pub fn own_children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for t in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("children")) else { continue };
        out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()).filter(|p| !is_zombie(*p)));
    }
    out
}

/// Waits up to `within` for every marked process (and every child of this process) to exit;
/// returns the survivors.
pub fn wait_none_left(marker: &str, within: Duration) -> Vec<i32> {
    let deadline = Instant::now() + within;
    for pid in marked_pids(marker).into_iter().chain(own_children()) {
        wait_exit(pid, deadline);
    }
    let mut left = marked_pids(marker);
    left.extend(own_children());
    left
}

/// SIGKILLs every marked process.
#[allow(unsafe_code)] // kill(2) on pids this test tagged
pub fn kill_marked(marker: &str) {
    for pid in marked_pids(marker) {
        // SAFETY: plain kill(2).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
