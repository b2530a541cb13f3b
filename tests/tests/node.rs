//! Node.js workers through the library (`snakepit::Node`): ESM and CommonJS scripts with nothing
//! installed, the class form with `setup()` and the host's config, output at load time, the
//! thread profile's concurrency on the event loop, and what is refused. The protocol behaviours
//! themselves are `snakepit conform`'s (snakepit-cli/tests/conform.rs runs it on the Node
//! showcase); the SDK's own tests are `node --test` in snakepit-adapters/node/ (`cargo xtask node`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use snakepit::{Error, Node, ThreadProfile, Zygote};
use snakepit_tests::Reaper;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_esm_worker_imports_the_sdk_with_nothing_installed_and_may_print_at_load_time() {
    let r = Reaper::new();
    let script = r.script(
        "worker.mjs",
        r#"import { tool, serve } from "snakepit-bridge";
console.log("printed at load time: stdout is the stderr pipe, not the protocol");
process.stdout.write("even without a newline");
tool("add", ({ a, b }) => a + b, { doc: "adds" });
tool("where", () => ({ cwd: process.cwd(), fds: process.env.SNAKEPIT_PROTOCOL_FDS }));
serve();
"#,
    );
    let pool = r.builder().adapter(Node::script(&script).cwd(r.dir())).size(2).build().await.expect("pool");
    assert_eq!(pool.execute("add", json!({"a": 2, "b": 40})).await.expect("add"), json!(42));
    let w = pool.execute("where", json!(null)).await.expect("where");
    assert_eq!(w["fds"], "3,4");
    assert_eq!(std::fs::read_dir(r.dir()).expect("ls").count(), 1, "nothing written next to the script");
    let ready = pool.worker_handshakes().into_iter().flatten().next().expect("ready");
    assert!(ready.bridge.starts_with("node/"), "{}", ready.bridge);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

/// A `.js` ES module (its package.json says `"type": "module"`) gets the resolve hook too; a
/// CommonJS script goes without it (it costs start-up time) and still finds the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_module_under_a_type_module_package_imports_the_sdk() {
    let r = Reaper::new();
    std::fs::create_dir(r.dir().join("esm")).expect("mkdir");
    std::fs::write(r.dir().join("esm/package.json"), r#"{"type": "module"}"#).expect("package.json");
    let esm = r.script(
        "esm/worker.js",
        "import { tool, serve } from \"snakepit-bridge\";\ntool(\"kind\", () => \"esm\");\nserve();\n",
    );
    let cjs = r.script(
        "worker.js",
        "const { tool, serve } = require(\"snakepit-bridge\");\ntool(\"kind\", () => \"cjs\");\nserve();\n",
    );
    for (script, kind) in [(esm, "esm"), (cjs, "cjs")] {
        let pool = r.builder().adapter(Node::script(&script)).size(1).build().await.expect("pool");
        assert_eq!(pool.execute("kind", json!(null)).await.expect("kind"), json!(kind));
        pool.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_class_form_runs_setup_with_the_hosts_config_before_ready() {
    let r = Reaper::new();
    let script = r.script(
        "model.cjs",
        r#"const { Adapter, serve } = require("snakepit-bridge");
class Model extends Adapter {
  async setup() { await new Promise((ok) => setImmediate(ok)); this.scale = this.config.scale; }
  predict({ x }) { return x * this.scale; }
  _private() { return "not a tool"; }
}
serve(Model);
"#,
    );
    let adapter = Node::script(&script).config(json!({"scale": 3}));
    let pool = r.builder().adapter(adapter).size(1).build().await.expect("pool");
    assert_eq!(pool.execute("predict", json!({"x": 14})).await.expect("predict"), json!(42));
    assert_eq!(pool.tools(), ["predict"]);
    match pool.execute("_private", json!(null)).await {
        Err(Error::UnknownCommand { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thread_profile_runs_calls_concurrently_on_the_event_loop() {
    let r = Reaper::new();
    let pool = Arc::new(
        r.builder()
            .adapter(Node::showcase())
            .profile(ThreadProfile::new(4))
            .size(1)
            .build()
            .await
            .expect("pool"),
    );
    let ready = pool.worker_handshakes().into_iter().flatten().next().expect("ready");
    assert_eq!(ready.max_in_flight, 4);
    // Four calls that each wait for a file only the last of them creates: they can only all
    // finish if they run at once.
    let gate = r.dir().join("gate");
    let waits = (0..3)
        .map(|_| pool.execute("wait_for", json!({"path": gate.to_string_lossy(), "timeout_ms": 20_000})));
    let touch = async {
        pool.wait_stats(|s| s.busy == 3, Duration::from_secs(10)).await.expect("three running");
        pool.execute("touch", json!({"path": gate.to_string_lossy()})).await
    };
    let (waited, touched) = tokio::join!(futures::future::join_all(waits), touch);
    touched.expect("touch");
    for w in waited {
        assert_eq!(w.expect("wait_for"), json!(true));
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_worker_has_no_zygote_start_mode() {
    let r = Reaper::new();
    let err = r
        .builder()
        .adapter(Node::showcase())
        .profile(Zygote(snakepit::ProcessProfile))
        .size(1)
        .build()
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("zygote start mode is not supported for Node workers"), "{err}");
    assert_eq!(err.kind(), "bad_request", "{err:?}");
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_interpreter_or_a_broken_script_fails_start_up_clearly() {
    let r = Reaper::new();
    let err = r
        .builder()
        .adapter(Node::showcase().interpreter(r.dir().join("no-such-node")))
        .size(1)
        .build()
        .await
        .expect_err("no node");
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    let script = r.script("broken.js", "throw new Error('broken at load time');\n");
    let err = r.builder().adapter(Node::script(&script)).size(1).build().await.expect_err("broken");
    match err {
        Error::StartupFailed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("broken at load time"), "{stderr_tail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    r.assert_none_left(Duration::from_secs(5));
}

/// The repository's `npm ci` (`cargo xtask setup`): the Node SDK's gRPC packages.
fn grpc_modules() -> Option<std::path::PathBuf> {
    let m = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../snakepit-adapters/node/node_modules");
    if m.join("@grpc/grpc-js").is_dir() {
        return Some(m);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} has no @grpc/grpc-js: run `cargo xtask setup`",
        m.display()
    );
    eprintln!("SKIP: {} has no @grpc/grpc-js (run `cargo xtask setup`)", m.display());
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_node_worker_names_the_missing_package_or_serves() {
    let r = Reaper::new();
    let grpc = || snakepit::Grpc::default().socket_root(r.dir().join("s"));
    // Without the packages on NODE_PATH (the library adds no build-tree path of its own).
    let err = r
        .builder()
        .adapter(Node::showcase().env_clear())
        .transport(grpc())
        .size(1)
        .build()
        .await
        .expect_err("no @grpc/grpc-js");
    match err {
        Error::StartupFailed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("@grpc/grpc-js"), "{stderr_tail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    let Some(modules) = grpc_modules() else { return };
    let pool = r
        .builder()
        .adapter(Node::showcase().node_path(modules))
        .transport(grpc())
        .size(1)
        .build()
        .await
        .expect("pool");
    assert_eq!(pool.execute("add", json!({"a": 1, "b": 2})).await.expect("add"), json!(3));
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}
