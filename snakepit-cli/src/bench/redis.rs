//! The shared-session rows: a session-routed call and session creation with the sessions in
//! a real `redis-server` on a Unix socket (started here, in a temporary directory, when one is
//! installed), beside the in-memory store.

use super::*;

/// A `redis-server` of the bench's own, stopped on drop.
pub(super) struct Server {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts one, or `None` (with a message) when `redis-server` is not installed.
    #[allow(clippy::disallowed_methods)] // the bench's Redis server, not a worker
    pub(super) fn start() -> Option<Server> {
        let dir = tempfile::tempdir().ok()?;
        let sock = dir.path().join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("bench: no Redis rows (redis-server is not installed)");
            return None;
        };
        let server = Server { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if Instant::now() > deadline {
                eprintln!("bench: no Redis rows (redis-server did not come up)");
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub(super) fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.path().join("redis.sock").display())
    }
}

/// A one-worker pool keeping its sessions in `server`.
pub(super) async fn pool(python: &str, server: &Server) -> Option<Arc<Pool>> {
    let built = Pool::builder()
        .run_registry(false)
        .heartbeat(None)
        .adapter(Python::showcase().interpreter(python))
        .size(1)
        .session_store_url(server.url())
        .build()
        .await;
    match built {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            eprintln!("bench: no Redis rows: {e}");
            None
        }
    }
}

/// `n` sequential session creations (distinct ids, closed afterwards).
pub(super) async fn creates(pool: &Pool, tag: &str, n: u64) -> Sample {
    let mut h = hist();
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        if pool.create_session(&format!("{tag}-{i}"), json!(null)).await.is_ok() {
            let _ = h.record(t.elapsed().as_nanos() as u64);
        }
    }
    let elapsed = start.elapsed();
    for i in 0..n {
        let _ = pool.session_store().close(&format!("{tag}-{i}")).await;
    }
    sample(&h, n, elapsed)
}
