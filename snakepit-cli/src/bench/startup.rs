//! The start-up rows: a pool's time to ready (and its first call), against bare spawns of the
//! same interpreter and bootstrap and against bare `python -c pass`.

use super::*;

/// An import-heavy worker script (for the start-up rows).
pub(super) const HEAVY: &str = "import json, decimal, asyncio, email, email.mime.text, http.client, xml.dom.minidom, \
                     sqlite3, unittest\nfrom snakepit_bridge import tool\n\n@tool\ndef ping():\n    return 'pong'\n";

/// Time until a pool of `n` workers is ready (cold, or forked from a zygote).
pub(super) async fn pool_ready(
    python: &str,
    n: usize,
    script: Option<&std::path::Path>,
    zygote: bool,
) -> Duration {
    let adapter = match script {
        Some(s) => Python::script(s),
        None => Python::showcase(),
    };
    let b = Pool::builder().adapter(adapter.interpreter(python)).size(n).run_registry(false);
    let b = if zygote { b.profile(snakepit::Zygote(snakepit::ProcessProfile)) } else { b };
    time_to_ready(b).await
}

/// Time until the pool `b` builds is ready and has answered its first call (`ping`).
pub(super) async fn time_to_ready(b: snakepit::PoolBuilder) -> Duration {
    let t = Instant::now();
    let pool = b.build().await;
    let ready = match &pool {
        Ok(p) => {
            let _ = p.execute("ping", json!(null)).await;
            t.elapsed()
        }
        Err(_) => t.elapsed(),
    };
    if let Ok(p) = pool {
        p.shutdown().await;
    }
    ready
}

/// Time of `n` concurrent `python -c pass`: the interpreter's own start-up, the floor of a
/// cold worker's.
#[allow(clippy::disallowed_methods)] // the start-up floor: bare interpreters
pub(super) fn bare_pass(python: &str, n: usize) -> Duration {
    spawn_all(n, || {
        let mut c = Command::new(python);
        c.args(["-c", "pass"]);
        c
    })
}

/// Time of `n` bare concurrent spawns of the same interpreter and bootstrap (which import
/// everything, then exit at stdin EOF): what a pool's cold start is compared with.
#[allow(clippy::disallowed_methods)] // the start-up floor: bare spawns to compare against
pub(super) fn bare_spawns(python: &str, n: usize, script: Option<&std::path::Path>) -> Duration {
    let bridge = snakepit::adapters::bridge_dir().unwrap_or_default();
    spawn_all(n, || {
        let mut c = Command::new(python);
        match script {
            Some(s) => c.args(["-m", "snakepit_bridge", "--script"]).arg(s),
            None => c.args(["-m", "snakepit_bridge", "--module", "snakepit_bridge.showcase"]),
        };
        c.env("PYTHONPATH", &bridge);
        c
    })
}

/// Starts `n` processes made by `command` at once (stdio to /dev/null) and times them until
/// the last has exited.
pub(super) fn spawn_all(n: usize, command: impl Fn() -> Command) -> Duration {
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .filter_map(|_| {
            command().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
        })
        .collect();
    for mut c in children {
        let _ = c.wait();
    }
    t.elapsed()
}
