//! The `snakepit_bridge` package installed in a worker's interpreter: the embedded copy wins by
//! default, `Python::installed_bridge()` runs the installed one, and an installed bridge of
//! another protocol version fails the start with a `version_mismatch` naming both sides.
//!
//! Each test makes a real virtualenv (`python3 -m venv --without-pip`) and puts a copy of the
//! bridge into its site-packages, as `pip install` would.

#![allow(clippy::disallowed_methods)] // makes virtualenvs with python3 -m venv

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use snakepit::{Error, Python};
use snakepit_tests::Reaper;

const WHICH_BRIDGE: &str = r#"
import snakepit_bridge
from snakepit_bridge import tool

@tool
def which():
    return {"version": snakepit_bridge.__version__, "file": snakepit_bridge.__file__}
"#;

/// A virtualenv under `dir` whose site-packages holds a copy of the bridge with
/// `protocol` versions and package `version` (none when `protocol` is `None`). Returns its python.
fn venv_with_bridge(dir: &Path, protocol: Option<&str>, version: &str) -> (PathBuf, PathBuf) {
    let venv = dir.join("venv");
    let out =
        Command::new("python3").args(["-m", "venv", "--without-pip"]).arg(&venv).output().expect("venv");
    assert!(out.status.success(), "python3 -m venv: {}", String::from_utf8_lossy(&out.stderr));
    let python = venv.join("bin").join("python");
    let out = Command::new(&python)
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .output()
        .expect("purelib");
    let site = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let Some(protocol) = protocol else { return (python, site) };
    let from = snakepit::adapters::bridge_dir().expect("bridge").join("snakepit_bridge");
    let to = site.join("snakepit_bridge");
    copy_dir(&from, &to);
    let core = to.join("_core.py");
    let text = std::fs::read_to_string(&core).expect("read _core.py");
    assert!(text.contains("PROTOCOL_VERSIONS = (1,)"));
    std::fs::write(
        &core,
        text.replace("PROTOCOL_VERSIONS = (1,)", &format!("PROTOCOL_VERSIONS = {protocol}")),
    )
    .expect("write _core.py");
    std::fs::write(to.join("_version.py"), format!("__version__ = \"{version}\"\n"))
        .expect("write _version.py");
    (python, site)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("ls") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

#[tokio::test]
async fn an_installed_bridge_of_another_protocol_version_is_a_version_mismatch_naming_both() {
    let r = Reaper::new();
    let (python, site) = venv_with_bridge(r.dir(), Some("(2,)"), "9.0.0");
    let script = r.script("w.py", WHICH_BRIDGE);
    let err = r
        .builder()
        .adapter(Python::script(&script).interpreter(&python).installed_bridge())
        .size(1)
        .build()
        .await
        .expect_err("a v2-only bridge cannot serve a v1 host");
    assert_eq!(err.kind(), "version_mismatch");
    match &err {
        Error::VersionMismatch { offered, speaks, reason, .. } => {
            assert_eq!(*offered, [1]);
            assert_eq!(*speaks, [2]);
            assert!(reason.contains("snakepit_bridge 9.0.0"), "{reason}");
            assert!(reason.contains(&site.display().to_string()), "names where it was found: {reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = err.to_string();
    let host = format!("the host (snakepit {}) offered protocol versions [1]", env!("CARGO_PKG_VERSION"));
    assert!(text.contains(&host) && text.contains("the worker speaks [2]"), "{text}");
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn the_embedded_bridge_wins_over_an_installed_one_by_default() {
    let r = Reaper::new();
    let (python, site) = venv_with_bridge(r.dir(), Some("(2,)"), "9.0.0");
    let script = r.script("w.py", WHICH_BRIDGE);
    let pool = r
        .builder()
        .adapter(Python::script(&script).interpreter(&python))
        .size(1)
        .build()
        .await
        .expect("pool");
    let which = pool.execute("which", json!(null)).await.expect("which");
    assert_eq!(which["version"], env!("CARGO_PKG_VERSION"));
    let file = which["file"].as_str().expect("file");
    assert!(!file.starts_with(&site.display().to_string()), "ran the installed copy: {file}");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn an_installed_bridge_of_the_same_protocol_serves() {
    let r = Reaper::new();
    let (python, site) = venv_with_bridge(r.dir(), Some("(1,)"), "0.0.9");
    let script = r.script("w.py", WHICH_BRIDGE);
    let pool = r
        .builder()
        .adapter(Python::script(&script).interpreter(&python).installed_bridge())
        .size(1)
        .build()
        .await
        .expect("pool");
    let which = pool.execute("which", json!(null)).await.expect("which");
    assert_eq!(which["version"], "0.0.9");
    assert!(which["file"].as_str().expect("file").starts_with(&site.display().to_string()), "{which}");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn installed_bridge_without_the_package_says_how_to_install_it() {
    let r = Reaper::new();
    let (python, _) = venv_with_bridge(r.dir(), None, "");
    let script = r.script("w.py", WHICH_BRIDGE);
    let err = r
        .builder()
        .adapter(Python::script(&script).interpreter(&python).installed_bridge())
        .size(1)
        .build()
        .await
        .expect_err("no bridge installed");
    let text = err.to_string();
    assert!(text.contains("has no snakepit_bridge package") && text.contains("pip install"), "{err:?}");
    r.assert_none_left(Duration::from_secs(5));
}
