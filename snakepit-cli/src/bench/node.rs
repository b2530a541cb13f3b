//! The Node rows: the Node showcase (`snakepit-bridge/showcase.js`) beside the Python one —
//! sequential 64 B calls, the many-worker pool × 32 callers, and the start-up of pools against
//! bare spawns of the same bootstrap and against `node -e 0`.

use super::*;
use snakepit::Node;

/// The interpreter: `$SNAKEPIT_NODE`, else `node`.
fn node() -> String {
    std::env::var("SNAKEPIT_NODE").unwrap_or_else(|_| "node".into())
}

/// Whether `node` runs here.
#[allow(clippy::disallowed_methods)] // a probe of the interpreter, not a worker
pub(super) fn available() -> bool {
    Command::new(node()).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn build(n: usize) -> snakepit::PoolBuilder {
    Pool::builder().run_registry(false).heartbeat(None).adapter(Node::showcase()).size(n)
}

/// Node pools of one worker and of `nw` workers, or `None` (with a message) when Node workers
/// cannot start here.
pub(super) async fn pools(nw: usize) -> Option<(Arc<Pool>, Arc<Pool>)> {
    match futures::future::try_join(build(1).build(), build(nw).build()).await {
        Ok((one, many)) => Some((Arc::new(one), Arc::new(many))),
        Err(e) => {
            eprintln!("bench: no Node rows: {e}");
            None
        }
    }
}

/// Time until a Node pool of `n` workers is ready and has answered its first call.
pub(super) async fn pool_ready(n: usize) -> Duration {
    super::startup::time_to_ready(build(n)).await
}

/// Time of `n` bare concurrent spawns of the same bootstrap and showcase (which load
/// everything, then exit at their input's end).
#[allow(clippy::disallowed_methods)] // the start-up floor: bare spawns to compare against
pub(super) fn bare_spawns(n: usize) -> Duration {
    let dir = snakepit::adapters::node_bridge_dir().unwrap_or_default();
    let package = dir.join("node_modules").join("snakepit-bridge");
    super::startup::spawn_all(n, || {
        let mut c = Command::new(node());
        c.arg("--import").arg(package.join("bootstrap.mjs")).arg(package.join("showcase.js"));
        c.env("NODE_PATH", dir.join("node_modules"));
        c
    })
}

/// Time of `n` concurrent `node -e 0`: Node's own start-up.
#[allow(clippy::disallowed_methods)] // the start-up floor: bare interpreters
pub(super) fn bare_pass(n: usize) -> Duration {
    super::startup::spawn_all(n, || {
        let mut c = Command::new(node());
        c.args(["-e", "0"]);
        c
    })
}
