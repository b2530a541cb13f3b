//! A real `redis-server` for the shared-session tests, in a temporary directory on a Unix
//! socket (no TCP port, no persistence), stopped on drop. `restart` stops it and starts a new
//! one on the same socket: what a front end sees when Redis goes away and comes back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// Whether `redis-server` runs here. Under `CI=true` a missing one fails the test (CI installs
/// it: `cargo xtask setup`); elsewhere the test says what to install and skips.
pub fn available() -> bool {
    #[allow(clippy::disallowed_methods)] // a probe of the server binary, not a worker
    let ok = Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is missing: `cargo xtask setup` installs it (Debian: apt-get install redis-server)"
        );
        eprintln!("skipped: no redis-server (apt-get install redis-server, or `cargo xtask setup` as root)");
    }
    ok
}

impl RedisServer {
    /// Starts one and waits (at most 10 s) until it answers.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = RedisServer { child: None, dir };
        r.spawn();
        r
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The store URL of this server.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    #[allow(clippy::disallowed_methods)] // the test's Redis server, not a worker
    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers(&self.socket()) {
            assert!(Instant::now() < deadline, "redis-server did not come up on {}", self.socket().display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (its data is gone: no persistence).
    pub fn stop(&mut self) {
        self.freeze(false);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the server: a Redis that hangs without closing
    /// its connections.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig =
                if frozen { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Starts a server again on the same socket.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

/// Whether a server answers `PING` on `socket`.
fn answers(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
