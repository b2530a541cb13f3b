//! Pools from configuration files (feature `config`) with real workers: `Pool::from_config` on a
//! Python worker with the file's settings applied, `PoolBuilder::from_config` with more added in
//! code, `Pools::from_config` with a Python pool and a Node pool side by side, and a pool that
//! cannot start stopping the others.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use snakepit::config::{PoolConfig, PoolsConfig};
use snakepit::{Pool, PoolBuilder, Pools};
use snakepit_tests::{procs, Reaper, ADD_SCRIPT};

const NO_ENV: [(&str, &str); 0] = [];

/// A Python worker with `add` and `var` (an environment variable of the worker).
const PY_WORKER: &str = r#"
import os
from snakepit_bridge import tool, serve

@tool
def add(a, b):
    return a + b

@tool
def var(name):
    return os.environ.get(name)

serve()
"#;

/// The file's common part: the workers carry the test's marker and keep their run files in the
/// scratch directory.
fn head(r: &Reaper, env: &str) -> String {
    format!(
        "run_dir = {:?}\n[worker]\nenv = {{ {} = {:?}{env} }}\n",
        r.dir().join("runs").display().to_string(),
        procs::MARKER_VAR,
        r.marker
    )
}

fn file(r: &Reaper, text: &str) -> PathBuf {
    let p = r.dir().join("snakepit.toml");
    std::fs::write(&p, text).expect("write the configuration");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_from_config_runs_a_python_worker_with_the_files_settings() {
    let r = Reaper::new();
    let script = r.script("worker.py", PY_WORKER);
    let text = format!(
        "size = 2\nmax_queue = 7\nqueue_timeout = \"2s\"\n{}script = {:?}\n[heartbeat]\ninterval = \"1s\"\n",
        head(&r, ", GREETING = \"hi\""),
        script.display().to_string()
    );
    let cfg = PoolConfig::load_with_env(file(&r, &text), NO_ENV).expect("valid configuration");
    assert_eq!(cfg.size, Some(2));
    let pool = Pool::from_config(&cfg).await.expect("pool");
    assert_eq!(pool.stats().size, 2);
    assert_eq!(pool.worker_pids().len(), 2);
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add"), json!(3));
    assert_eq!(pool.execute("var", json!({"name": "GREETING"})).await.expect("var"), json!("hi"));
    pool.shutdown().await;

    // The builder form: more added in code before `build()`.
    let pool = PoolBuilder::from_config(&cfg)
        .expect("builder")
        .env("EXTRA", "x")
        .size(1)
        .build()
        .await
        .expect("pool");
    assert_eq!(pool.stats().size, 1);
    assert_eq!(pool.execute("var", json!({"name": "EXTRA"})).await.expect("var"), json!("x"));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_from_config_run_a_python_pool_and_a_node_pool_side_by_side() {
    let r = Reaper::new();
    let py = r.script("add.py", ADD_SCRIPT);
    let js = r.script(
        "add.cjs",
        "const { tool, serve } = require(\"snakepit-bridge\");\ntool(\"add\", ({ a, b }) => a + b);\nserve();\n",
    );
    let text = format!(
        "size = 2\n{}\n[pools.py]\nworker.script = {:?}\n\n[pools.js]\nsize = 1\nworker.script = {:?}\n",
        head(&r, ""),
        py.display().to_string(),
        js.display().to_string()
    );
    let cfg = PoolsConfig::load_with_env(file(&r, &text), NO_ENV).expect("valid configuration");
    let pools = Pools::from_config(&cfg).await.expect("pools");
    assert_eq!(pools.names().collect::<Vec<_>>(), ["js", "py"]);
    assert!(pools.get("rb").is_none());
    let (Some(py), Some(js)) = (pools.get("py"), pools.get("js")) else { panic!("both pools") };
    assert_eq!((py.stats().size, js.stats().size), (2, 1));
    assert_eq!(py.execute("add", json!({"a": 1, "b": 2})).await.expect("python"), json!(3));
    assert_eq!(js.execute("add", json!({"a": 40, "b": 2})).await.expect("node"), json!(42));
    let ready = js.worker_handshakes().into_iter().flatten().next().expect("ready");
    assert!(ready.bridge.starts_with("node/"), "{}", ready.bridge);
    pools.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_cannot_start_stops_the_others_and_is_named() {
    let r = Reaper::new();
    let good = r.script("add.py", ADD_SCRIPT);
    let bad = r.script("broken.py", "raise SystemExit('cannot load')\n");
    let text = format!(
        "size = 1\n{}\n[pools.good]\nworker.script = {:?}\n\n[pools.bad]\nworker.script = {:?}\n",
        head(&r, ""),
        good.display().to_string(),
        bad.display().to_string()
    );
    let cfg = PoolsConfig::load_with_env(file(&r, &text), NO_ENV).expect("valid configuration");
    let e = Pools::from_config(&cfg).await.expect_err("the bad pool cannot start");
    assert_eq!(e.kind(), "config");
    match &e {
        snakepit::Error::Config { key, source: Some(cause), .. } => {
            assert_eq!(key, "pools.bad");
            assert_eq!(cause.kind(), "startup_failed", "{cause}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains("cannot load"), "{e}");
    r.assert_none_left(Duration::from_secs(5));
}
