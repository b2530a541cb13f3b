//! The embedded bridge's bytecode: written into its private cache directory on first use even
//! under `PYTHONDONTWRITEBYTECODE=1`, while that setting still holds for the worker's own code.
//! (Its own test binary: `bridge_package.rs` spawns `python3 -m venv` children that would count
//! as this test's leftovers.)

use std::time::Duration;

use serde_json::json;
use snakepit::Python;
use snakepit_tests::Reaper;

#[tokio::test]
async fn the_embedded_bridge_keeps_its_bytecode_and_the_users_setting_holds_for_user_code() {
    let r = Reaper::new();
    std::fs::write(r.dir().join("helper.py"), "VALUE = 42\n").expect("helper");
    let script = r.script(
        "w.py",
        "import sys, helper\nfrom snakepit_bridge import tool\n\n@tool\ndef flag():\n    return {\"dont_write\": sys.dont_write_bytecode, \"v\": helper.VALUE}\n",
    );
    // Start from no bytecode for `_core` (another worker may write it back meanwhile: fine).
    let cache =
        snakepit::adapters::bridge_dir().expect("bridge dir").join("snakepit_bridge").join("__pycache__");
    for e in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("_core.") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let pool = r
        .builder()
        .adapter(Python::script(script).env("PYTHONDONTWRITEBYTECODE", "1"))
        .size(1)
        .build()
        .await
        .expect("pool");
    let v = pool.execute("flag", json!(null)).await.expect("flag");
    assert_eq!(v, json!({"dont_write": true, "v": 42}), "the user's setting is back before their code runs");
    pool.shutdown().await;
    assert!(!r.dir().join("__pycache__").exists(), "no bytecode written for the user's modules");
    let core_pyc = std::fs::read_dir(&cache)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("_core.")))
        .unwrap_or(false);
    assert!(core_pyc, "no _core bytecode in {}", cache.display());
    r.assert_none_left(Duration::from_secs(5));
}
