//! The pipelining rows: one worker × 16 callers and the many-worker pool × 32 callers at
//! pipeline depths 1, 2, 4 and 8 (quick: 1 and 4), and with orjson (the repository's `.venv`
//! python) at depths 1 and 4.

use std::path::Path;
use std::sync::Arc;

use snakepit::{Pool, Python};

/// Two pools (one worker; `nw` workers) at one pipeline depth and interpreter.
pub(super) struct Piped {
    /// What the rows' names end with, e.g. `, pipeline 4, orjson`.
    pub(super) suffix: String,
    pub(super) one: Arc<Pool>,
    pub(super) many: Arc<Pool>,
}

/// The pools of the pipelining rows (see the module docs) whose rows `want` picks; those that
/// fail to start are left out, with a message.
pub(super) async fn pools(
    python: &str,
    venv: Option<&Path>,
    nw: usize,
    quick: bool,
    want: &dyn Fn(&str) -> bool,
) -> Vec<Piped> {
    let depths: &[usize] = if quick { &[1, 4] } else { &[1, 2, 4, 8] };
    let mut plan: Vec<(usize, String, String)> =
        depths.iter().map(|&d| (d, python.to_owned(), format!(", pipeline {d}"))).collect();
    if let Some(v) = venv.filter(|v| super::bytes::has_module(v, "orjson")) {
        for d in [1, 4] {
            plan.push((d, v.to_string_lossy().into_owned(), format!(", pipeline {d}, orjson")));
        }
    }
    plan.retain(|(_, _, suffix)| {
        want(&format!("stdio 1 worker 16 callers 64 B{suffix}"))
            || want(&format!("stdio {nw} workers 32 callers 64 B{suffix}"))
    });
    let mut out = Vec::new();
    for (depth, py, suffix) in plan {
        let build = |size: usize| {
            Pool::builder()
                .run_registry(false)
                .heartbeat(None)
                .adapter(Python::showcase().interpreter(&py))
                .size(size)
                .pipeline_depth(depth)
                .build()
        };
        match futures::future::try_join(build(1), build(nw)).await {
            Ok((one, many)) => out.push(Piped { suffix, one: Arc::new(one), many: Arc::new(many) }),
            Err(e) => eprintln!("bench: cannot start the pools{suffix}: {e}"),
        }
    }
    out
}
