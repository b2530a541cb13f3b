//! The preload rows (full mode, when scikit-learn is installed in the repository's `.venv`): a
//! real model worker — numpy and scikit-learn imported at module level, a `LogisticRegression`
//! fitted in `BaseAdapter.preload()` — started as one cold worker, as 8 cold workers, and as 8
//! workers forked from a zygote that preloaded the model: time until every worker is ready and
//! has answered a prediction, and the proportional set size (PSS) of the processes that hold the
//! model (the workers, and the zygote when there is one).

use super::*;

/// The model worker.
pub(super) const MODEL: &str = r#"
import numpy as np
from sklearn.linear_model import LogisticRegression
from snakepit_bridge import BaseAdapter, tool


class Model(BaseAdapter):
    model = None

    @classmethod
    def preload(cls):
        # The expensive part: once in the zygote (inherited by every fork), or per cold worker.
        rng = np.random.default_rng(0)
        x = rng.normal(size=(50_000, 100))
        y = (x[:, 0] + x[:, 1] > 0).astype(int)
        cls.model = LogisticRegression(max_iter=500).fit(x, y)

    @tool
    def predict(self, x):
        return int(self.model.predict(np.asarray([x], dtype=float))[0])
"#;

/// One start of a model pool: milliseconds to ready and first prediction from every worker,
/// and the PSS total in KiB.
pub(super) struct ModelStart {
    pub(super) ms: f64,
    pub(super) pss_kib: u64,
}

/// Whether `python` can run the model worker.
pub(super) fn available(python: &std::path::Path) -> bool {
    bytes::has_module(python, "sklearn")
}

/// Starts `n` model workers (cold, or forked from a zygote that preloaded the model), times
/// them until each has answered a prediction, measures their PSS and stops them.
pub(super) async fn start(
    python: &std::path::Path,
    script: &std::path::Path,
    n: usize,
    zygote: bool,
) -> Option<ModelStart> {
    // One BLAS thread per worker: a pool's workers share the cores, and no thread is alive at
    // the zygote's forks.
    let adapter = Python::script(script)
        .interpreter(python)
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1");
    let b = Pool::builder().adapter(adapter).size(n).run_registry(false).heartbeat(None);
    let b = if zygote { b.profile(snakepit::Zygote(snakepit::ProcessProfile)) } else { b };
    let t = Instant::now();
    let pool = match b.build().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: the model pool did not start: {e}");
            return None;
        }
    };
    let x: Vec<f64> = (0..100).map(|i| f64::from(i % 7) - 3.0).collect();
    let calls = (0..n).map(|_| pool.execute("predict", json!({"x": x})));
    let ok = futures::future::join_all(calls).await.iter().all(Result::is_ok);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let pids: Vec<u32> = pool.worker_handshakes().iter().flatten().map(|r| r.pid).collect();
    let mut holders: Vec<u32> = pids.clone();
    if zygote {
        // The zygote holds the model too: its share counts.
        holders.extend(pids.iter().filter_map(|&p| parent_of(p)).collect::<std::collections::BTreeSet<_>>());
    }
    let pss_kib = holders.iter().filter_map(|&p| pss_kib(p)).sum();
    pool.shutdown().await;
    ok.then_some(ModelStart { ms, pss_kib })
}

/// A process's proportional set size in KiB (`/proc/<pid>/smaps_rollup`).
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find(|l| l.starts_with("Pss:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// A process's parent (`/proc/<pid>/stat`, after the command name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}
