//! The loader: files, `SNAKEPIT_CFG_*` variables (given as a list: the process's environment
//! is never touched), precedence, errors with their lines, several pools, and the example file.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::keys::KEYS;
use super::validate;
use super::*;

/// A TOML file in the temporary directory, removed on drop.
struct File(PathBuf);

impl File {
    fn new(text: &str) -> File {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("snakepit-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        File(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// `FILE:` as errors show it.
    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.0.display())
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const NO_ENV: [(&str, &str); 0] = [];

fn load(text: &str, env: &[(&str, &str)]) -> (File, Result<PoolConfig, crate::Error>) {
    let f = File::new(text);
    let r = PoolConfig::load_with_env(f.path(), env.iter().copied());
    (f, r)
}

fn error_text(text: &str, env: &[(&str, &str)]) -> (File, String) {
    let (f, r) = load(text, env);
    let e = r.expect_err("an invalid configuration");
    assert_eq!(e.kind(), "config");
    (f, e.to_string())
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../snakepit.example.toml")
}

fn showcase() -> PoolConfig {
    let mut c = PoolConfig::default();
    c.worker.module = Some("snakepit_bridge.showcase".into());
    c
}

#[test]
fn a_file_sets_every_kind_of_value() {
    let (_f, r) = load(
        r#"
size = 3
queue_timeout = "250ms"
default_timeout = "1h 30m"
drop_policy = "detach"
shm_threshold = "4KiB"
shm_max = 1048576
transport = "stdio"

[worker]
command = "perl -e 'print 1' 'a b'"
args = ["--fast"]
env = { OMP_NUM_THREADS = "1" }
config = { scale = 3, names = ["a"] }
timeouts = { predict = "2s" }

[heartbeat]
enabled = false

[recycle]
max_memory = "512MiB"
jitter = 0

[sessions]
affinity = "strict_fail_fast"
"#,
        &[],
    );
    let c = r.unwrap();
    assert_eq!(c.size, Some(3));
    assert_eq!(c.queue_timeout, Duration::from_millis(250));
    assert_eq!(c.default_timeout, Some(Duration::from_secs(5400)));
    assert_eq!(c.max_call_time, None);
    assert_eq!(c.drop_policy, crate::DropPolicy::Detach);
    assert_eq!((c.shm_threshold, c.shm_max), (4096, 1 << 20));
    let words: Vec<String> = ["perl", "-e", "print 1", "a b"].map(String::from).into();
    assert_eq!(c.worker.command, Some(words));
    assert_eq!(c.worker.args, ["--fast"]);
    assert_eq!(c.worker.env.get("OMP_NUM_THREADS").map(String::as_str), Some("1"));
    assert_eq!(c.worker.config, Some(serde_json::json!({"scale": 3, "names": ["a"]})));
    assert_eq!(c.worker.timeouts.get("predict"), Some(&Duration::from_secs(2)));
    assert!(!c.heartbeat.enabled);
    assert_eq!(c.recycle.max_memory, Some(512 << 20));
    assert_eq!(c.recycle.jitter, 0.0);
    assert_eq!(c.sessions.affinity, crate::Affinity::StrictFailFast);
    let (_f, r) = load("[worker]\ncommand = [\"perl\", \"w.pl\"]\n", &[]);
    assert_eq!(r.unwrap().worker.command, Some(vec!["perl".to_string(), "w.pl".to_string()]));
}

#[test]
fn precedence_is_defaults_then_file_then_environment_then_the_program() {
    let text = "size = 2\nqueue_timeout = \"1s\"\n[worker]\nmodule = \"m\"\n[heartbeat]\ninterval = \"3s\"\n";
    let env = [
        ("SNAKEPIT_CFG_SIZE", "3"),
        ("SNAKEPIT_CFG_HEARTBEAT__INTERVAL", "2s"),
        ("SNAKEPIT_CFG_WORKER__ENV__OMP_NUM_THREADS", "4"),
        ("SNAKEPIT_CFG_WORKER__CONFIG__Model", "big"),
        ("SNAKEPIT_CFG_RECYCLE__MAX_MEMORY", "1GiB"),
        ("SNAKEPIT_CFG_WORKER__ARGS", "[\"-v\", \"x\"]"),
        // Not configuration: never an error, never read.
        ("SNAKEPIT_RUN_DIR", "/nowhere"),
        ("SNAKEPIT_PYTHON", "python3"),
        ("HOME", "/root"),
        // Unknown keys: a warning each, ignored.
        ("SNAKEPIT_CFG_SIZEE", "9"),
        ("SNAKEPIT_CFG_HEARTBEAT", "9"),
        ("SNAKEPIT_CFG_POOLS__X__SIZE", "9"),
        ("SNAKEPIT_CFG_", "9"),
    ];
    let (_f, r) = load(text, &env);
    let mut c = r.unwrap();
    assert_eq!(c.size, Some(3), "the environment beats the file");
    assert_eq!(c.queue_timeout, Duration::from_secs(1), "the file beats the defaults");
    assert_eq!(c.max_queue, 1000, "the defaults");
    assert_eq!(c.heartbeat.interval, Duration::from_secs(2));
    assert_eq!(c.heartbeat.timeout, Duration::from_secs(5));
    assert_eq!(c.worker.env.get("OMP_NUM_THREADS").map(String::as_str), Some("4"));
    assert_eq!(c.worker.config, Some(serde_json::json!({"Model": "big"})));
    assert_eq!(c.recycle.max_memory, Some(1 << 30));
    assert_eq!(c.worker.args, ["-v", "x"]);
    // What the program sets last (command-line flags) wins.
    c.size = Some(5);
    assert_eq!(crate::PoolBuilder::from_config(&c).map(|_| ()).ok(), Some(()));
}

#[test]
fn errors_name_the_file_line_key_and_reason() {
    let cases: &[(&str, usize, &str)] = &[
        ("size = 2\n[worker\nmodule = \"m\"\n", 2, "invalid table header; expected `.`, `]`"),
        ("size = 2\nsizee = 3\n[worker]\nmodule = \"m\"\n", 2, "key 'sizee': unknown key (known here: "),
        ("[worker]\nmodule = \"m\"\nscrpit = \"w.py\"\n", 3, "key 'worker.scrpit': unknown key (known here: script, "),
        (
            "[worker]\nmodule = \"m\"\n[heartbeat]\n\ninterval = \"5x\"\n",
            5,
            "key 'heartbeat.interval': invalid value string \"5x\", expected a duration",
        ),
        (
            "size = \"many\"\n[worker]\nmodule = \"m\"\n",
            1,
            "key 'size': invalid type: found string \"many\", expected usize",
        ),
        ("size = 0\n[worker]\nmodule = \"m\"\n", 1, "key 'size': must be at least 1"),
        ("pipeline_depth = 17\n[worker]\nmodule = \"m\"\n", 1, "key 'pipeline_depth': must be 1 to 16 (got 17)"),
        (
            "[worker]\nmodule = \"m\"\n[recycle]\njitter = 0.7\n",
            4,
            "key 'recycle.jitter': must be between 0 and 0.5 (got 0.7)",
        ),
        (
            "size = 1\n[worker]\nmodule = \"m\"\nscript = \"w.py\"\n",
            2,
            "key 'worker': `script` and `module` each name the worker: set exactly one of `script`, `module` or `command`",
        ),
        ("size = 1\n", 0, "key 'worker': no worker: set one of `script`, `module` or `command`"),
        (
            "[worker]\nmodule = \"m\"\n[recycle]\nmax_memory = \"lots\"\n",
            4,
            "key 'recycle.max_memory': invalid size \"lots\"",
        ),
        ("drop_policy = \"later\"\n[worker]\nmodule = \"m\"\n", 1, "key 'drop_policy': unknown value \"later\" (expected \"kill\", \"detach\")"),
        ("[worker]\ncommand = \"perl 'open\"\n", 2, "key 'worker.command': \"perl 'open\": unbalanced quotes"),
        ("heartbeat.interval = \"0s\"\n[worker]\nmodule = \"m\"\n", 1, "key 'heartbeat.interval': must be longer than 0"),
        (
            "[worker]\nmodule = \"m\"\nprotocol = \"snakepit-v0\"\n",
            3,
            "key 'worker.protocol': snakepit-v0 workers are bridge scripts given with `command`",
        ),
        ("[worker]\nmodule = \"m\"\nprofile = \"thread\"\n", 1, "key 'worker.threads': profile = \"thread\" needs `threads = N`"),
    ];
    for (text, line, want) in cases {
        let (f, got) = error_text(text, &[]);
        let place =
            if *line == 0 { format!("{}: ", f.path().display()) } else { format!("{}: ", f.at(*line)) };
        assert!(got.starts_with(&format!("{place}{want}")), "{text:?}:\n got  {got}\n want {place}{want}");
    }
}

#[test]
fn errors_in_values_from_variables_name_the_variable() {
    let text = "size = 2\n[worker]\nmodule = \"m\"\n";
    let (_f, got) = error_text(text, &[("SNAKEPIT_CFG_SIZE", "0")]);
    assert_eq!(got, "SNAKEPIT_CFG_SIZE: key 'size': must be at least 1");
    let (_f, got) = error_text(text, &[("SNAKEPIT_CFG_HEARTBEAT__TIMEOUT", "soon")]);
    assert_eq!(got, "SNAKEPIT_CFG_HEARTBEAT__TIMEOUT: key 'heartbeat.timeout': invalid value string \"soon\", expected a duration");
    let (_f, got) =
        error_text("", &[("SNAKEPIT_CFG_WORKER__MODULE", "m"), ("SNAKEPIT_CFG_WORKER__SCRIPT", "w.py")]);
    assert!(got.starts_with("SNAKEPIT_CFG_WORKER__MODULE: key 'worker': `script` and `module`"), "{got}");
}

#[test]
fn a_multi_pool_file_is_not_one_pool() {
    let (f, got) = error_text("size = 1\n[worker]\nmodule = \"m\"\n[pools.a]\n[pools.b]\n", &[]);
    assert_eq!(
        got,
        format!(
            "{}: key 'pools': this file describes several pools (a, b): load it with `PoolsConfig::load` (`snakepit::Pools`), or choose one with `snakepit serve --pool NAME`",
            f.at(4)
        )
    );
}

#[test]
fn pools_inherit_the_top_level_and_override_it() {
    let f = File::new(
        r#"
size = 2
queue_timeout = "1s"
[worker]
module = "m"
env = { A = "top" }
[heartbeat]
interval = "7s"

[pools.text]

[pools.perl]
size = 3
worker.command = "perl w.pl"
worker.env = { B = "own" }
heartbeat.timeout = "1s"

[pools.named]
name = "custom"
"#,
    );
    let all =
        PoolsConfig::load_with_env(f.path(), [("SNAKEPIT_CFG_POOLS__PERL__QUEUE_TIMEOUT", "9s")]).unwrap();
    assert_eq!(all.pools.keys().collect::<Vec<_>>(), ["named", "perl", "text"]);
    let text = &all.pools["text"];
    assert_eq!((text.size, text.name.as_deref()), (Some(2), Some("text")));
    assert_eq!(text.worker.module.as_deref(), Some("m"));
    assert_eq!(text.heartbeat.interval, Duration::from_secs(7));
    let perl = &all.pools["perl"];
    assert_eq!(perl.size, Some(3));
    assert_eq!(perl.queue_timeout, Duration::from_secs(9));
    assert_eq!((perl.worker.module.as_deref(), perl.worker.command.as_ref().map(Vec::len)), (None, Some(2)));
    let env: Vec<_> = perl.worker.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(env, ["A=top", "B=own"]);
    assert_eq!(
        (perl.heartbeat.interval, perl.heartbeat.timeout),
        (Duration::from_secs(7), Duration::from_secs(1))
    );
    assert_eq!(all.pools["named"].name.as_deref(), Some("custom"));

    // An error in a pool's own table names it there; an inherited one, at the top level.
    let f = File::new("[worker]\nmodule = \"m\"\n[pools.a]\n[pools.b]\nsize = 0\n");
    let e = PoolsConfig::load_with_env(f.path(), NO_ENV).unwrap_err().to_string();
    assert_eq!(e, format!("{}: key 'pools.b.size': must be at least 1", f.at(5)));
    let f = File::new("pipeline_depth = 99\n[worker]\nmodule = \"m\"\n[pools.a]\n");
    let e = PoolsConfig::load_with_env(f.path(), NO_ENV).unwrap_err().to_string();
    assert_eq!(e, format!("{}: key 'pipeline_depth': must be 1 to 16 (got 99)", f.at(1)));
    let f = File::new("[pools.a]\nsize = 1\n");
    let e = PoolsConfig::load_with_env(f.path(), NO_ENV).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("{}: key 'pools.a.worker': no worker: set one of `script`, `module` or `command`", f.at(1))
    );
    let f = File::new("[pools.a.worker]\nmodule = \"m\"\nmodel = 1\n");
    let e = PoolsConfig::load_with_env(f.path(), NO_ENV).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: key 'pools.a.worker.model': unknown key", f.at(3))), "{e}");

    // A file without [pools] is one pool.
    let f = File::new("[worker]\nmodule = \"m\"\n");
    let all = PoolsConfig::load_with_env(f.path(), NO_ENV).unwrap();
    assert_eq!(all.pools.keys().collect::<Vec<_>>(), ["default"]);
}

#[test]
fn a_configuration_built_in_code_is_validated_too() {
    let e = crate::PoolBuilder::from_config(&PoolConfig::default()).unwrap_err();
    assert_eq!(e.to_string(), "key 'worker': no worker: set one of `script`, `module` or `command`");
    let mut c = showcase();
    c.recycle.jitter = 0.9;
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "key 'recycle.jitter': must be between 0 and 0.5 (got 0.9)"
    );
    c.recycle.jitter = 0.2;
    c.worker.script = Some("w.js".into());
    c.worker.module = None;
    let r = crate::PoolBuilder::from_config(&c).map(|_| ());
    if cfg!(feature = "node") {
        assert!(r.is_ok(), "{r:?}");
    } else {
        let e = r.unwrap_err().to_string();
        assert_eq!(e, "key 'worker.script': a Node script (.js, .mjs, .cjs) needs snakepit's `node` feature");
    }
}

#[test]
fn the_example_file_loads() {
    let c = PoolConfig::load_with_env(example(), NO_ENV).unwrap();
    assert_eq!(c, showcase());
}

#[test]
fn the_example_documents_every_key() {
    let text = std::fs::read_to_string(example()).unwrap();
    let mut section = String::new();
    let mut documented = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{h}.");
            continue;
        }
        let body = line.trim_start_matches('#').trim_start();
        if let Some((key, _)) = body.split_once(" = ") {
            if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                documented.insert(format!("{section}{key}"));
            }
        }
    }
    let missing: Vec<&str> = KEYS.iter().map(|(k, _)| *k).filter(|k| !documented.contains(*k)).collect();
    assert!(missing.is_empty(), "snakepit.example.toml does not document {missing:?}");
}

/// Uncommenting every `# key = value` line gives the defaults, plus the examples of the keys
/// that have no default.
#[test]
fn the_examples_commented_values_are_the_defaults() {
    let text = std::fs::read_to_string(example()).unwrap();
    let live: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(body)
                if body
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
            {
                body
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let (_f, r) = load(&live, &[]);
    let got = r.unwrap();
    let mut want = showcase();
    want.name = Some("model".into());
    want.instance = Some("model".into());
    want.size = Some(4);
    want.default_timeout = Some(Duration::from_secs(30));
    want.max_call_time = Some(Duration::from_secs(300));
    want.quarantine = Some(3);
    want.run_dir = Some("/run/user/1000/snakepit/runs".into());
    want.worker.interpreter = Some("python3".into());
    want.worker.env.insert("OMP_NUM_THREADS".into(), "1".into());
    want.worker.cwd = Some("/srv/model".into());
    want.worker.config = Some(serde_json::json!({"scale": 3}));
    want.worker.timeouts.insert("predict".into(), Duration::from_secs(30));
    want.worker.adapter_class = Some("Model".into());
    want.recycle.max_requests = Some(10_000);
    want.recycle.max_age = Some(Duration::from_secs(3600));
    want.recycle.max_memory = Some(1 << 30);
    want.autoscale.max = 8;
    want.remote.tls_ca = Some("/etc/snakepit/ca.pem".into());
    want.remote.tls_cert = Some("/etc/snakepit/client.pem".into());
    want.remote.tls_key = Some("/etc/snakepit/client.key".into());
    assert_eq!(got, want);
}

/// The loader's list of keys (for variables and the example) is exactly the structs' fields.
#[test]
fn the_known_keys_are_the_structs_fields() {
    let mut fields = Vec::new();
    for section in ["", "worker", "heartbeat", "recycle", "restart", "sessions", "autoscale", "remote"] {
        let text = match section {
            "" => "zzz = 1\n[worker]\nmodule = \"m\"\n".to_string(),
            "worker" => "[worker]\nmodule = \"m\"\nzzz = 1\n".to_string(),
            s => format!("[worker]\nmodule = \"m\"\n[{s}]\nzzz = 1\n"),
        };
        let (_f, e) = error_text(&text, &[]);
        let known = e
            .split("(known here: ")
            .nth(1)
            .and_then(|k| k.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{e}"));
        for k in known.split(", ") {
            let tables = ["worker", "heartbeat", "recycle", "restart", "sessions", "autoscale", "remote"];
            if section.is_empty() && tables.contains(&k) {
                continue;
            }
            fields.push(if section.is_empty() { k.to_string() } else { format!("{section}.{k}") });
        }
    }
    fields.sort();
    let mut keys: Vec<String> = KEYS.iter().map(|(k, _)| (*k).to_string()).collect();
    keys.sort();
    assert_eq!(fields, keys);
}

#[test]
fn relative_paths_in_the_file_are_relative_to_the_file() {
    let f = File::new(
        r#"
run_dir = "runs"
[worker]
script = "w.py"
cwd = "work"
interpreter = "venv/bin/python"
[pools.perl.worker]
command = "./bin/worker.pl --fast"
[pools.bare.worker]
script = "/abs/w.py"
interpreter = "python3"
[pools.other.worker]
module = "m"
"#,
    );
    let dir = std::path::absolute(f.path()).unwrap().parent().unwrap().to_path_buf();
    let all = PoolsConfig::load_with_env(f.path(), [("SNAKEPIT_CFG_POOLS__OTHER__WORKER__CWD", "from-env")])
        .unwrap();
    let perl = &all.pools["perl"];
    assert_eq!(perl.run_dir, Some(dir.join("runs")));
    let program = dir.join("bin/worker.pl").to_string_lossy().into_owned();
    assert_eq!(perl.worker.command, Some(vec![program, "--fast".into()]));
    assert_eq!(perl.worker.cwd, Some(dir.join("work")), "inherited from the top level");
    let bare = &all.pools["bare"];
    assert_eq!(bare.worker.script, Some(PathBuf::from("/abs/w.py")));
    assert_eq!(bare.worker.interpreter, Some(PathBuf::from("python3")), "a bare name is looked up on PATH");
    let other = &all.pools["other"];
    assert_eq!(other.worker.cwd, Some(PathBuf::from("from-env")), "a variable's path stays as given");
    #[cfg(feature = "node")]
    {
        let f = File::new("[worker]\nscript = \"w.js\"\nnode_path = [\"node_modules\"]\n");
        let node = PoolConfig::load_with_env(f.path(), NO_ENV).unwrap();
        let dir = std::path::absolute(f.path()).unwrap().parent().unwrap().to_path_buf();
        assert_eq!(node.worker.script, Some(dir.join("w.js")));
        assert_eq!(node.worker.node_path, [dir.join("node_modules")]);
    }
    // The top level's own source, interpreter included.
    let f = File::new("[worker]\nscript = \"w.py\"\ninterpreter = \"venv/bin/python\"\n");
    let one = PoolConfig::load_with_env(f.path(), NO_ENV).unwrap();
    let dir = std::path::absolute(f.path()).unwrap().parent().unwrap().to_path_buf();
    assert_eq!(one.worker.script, Some(dir.join("w.py")));
    assert_eq!(one.worker.interpreter, Some(dir.join("venv/bin/python")));
}

#[test]
fn a_pools_own_source_replaces_everything_tied_to_the_top_levels() {
    let f = File::new(
        r#"
[worker]
script = "/srv/w.py"
interpreter = "/venv/bin/python"
args = ["--model", "big"]
zygote = true
env = { A = "kept" }
[pools.perl.worker]
command = "/usr/bin/perl w.pl"
[pools.py]
size = 1
"#,
    );
    let all = PoolsConfig::load_with_env(f.path(), NO_ENV).unwrap();
    let perl = &all.pools["perl"];
    assert_eq!(perl.worker.script, None);
    assert_eq!(
        (perl.worker.interpreter.as_ref(), perl.worker.args.len(), perl.worker.zygote),
        (None, 0, false)
    );
    assert_eq!(perl.worker.env.get("A").map(String::as_str), Some("kept"));
    let py = &all.pools["py"];
    assert_eq!(py.worker.interpreter, Some(PathBuf::from("/venv/bin/python")));
    assert!(py.worker.zygote);
    // The same in code.
    let mut w = py.worker.clone();
    w.clear_source();
    assert_eq!((w.script, w.interpreter, w.zygote, w.args.len()), (None, None, false, 0));
    assert_eq!(w.env.get("A").map(String::as_str), Some("kept"));
}

#[test]
fn settings_that_would_churn_or_stall_workers_are_refused() {
    for (text, key) in [
        ("[recycle]\nmax_memory = 0\n", "recycle.max_memory"),
        ("[recycle]\nmax_age = \"0s\"\n", "recycle.max_age"),
        ("[restart]\nwindow = \"0s\"\n", "restart.window"),
    ] {
        let (_f, e) = error_text(&format!("[worker]\nmodule = \"m\"\n{text}"), &[]);
        assert!(e.contains(&format!("key '{key}'")), "{e}");
    }
    let (_f, e) = error_text("[worker]\nmodule = \"m\"\nhandshake_timeout = \"0s\"\n", &[]);
    assert!(e.contains("key 'worker.handshake_timeout'"), "{e}");
}

/// The directory a test file is in (what its relative paths are relative to).
fn dir_of(f: &File) -> PathBuf {
    std::path::absolute(f.path()).unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn a_remote_section_loads() {
    let f = File::new(
        r#"
size = 2
[remote]
agents = ["https://a.example:7443", "https://b.example"]
tls_ca = "certs/ca.pem"
tls_cert = "./certs/client.pem"
tls_key = "/abs/client.key"
keepalive_interval = "500ms"
keepalive_timeout = "1s"
connect_timeout = "2s"
resolve_every = "1m"
"#,
    );
    let dir = dir_of(&f);
    let file = ConfigFile::read_with_env(f.path(), NO_ENV).unwrap();
    let c = file.pool(None).unwrap();
    let r = &c.remote;
    assert!(r.is_remote());
    assert_eq!(r.agents, ["https://a.example:7443", "https://b.example"]);
    assert_eq!(r.tls_ca, Some(dir.join("certs/ca.pem")), "relative to the file");
    assert_eq!(r.tls_cert, Some(dir.join("certs/client.pem")));
    assert_eq!(r.tls_key, Some(PathBuf::from("/abs/client.key")));
    assert!(!r.insecure_plaintext);
    assert_eq!(
        (r.keepalive_interval, r.keepalive_timeout),
        (Duration::from_millis(500), Duration::from_secs(1))
    );
    assert_eq!((r.connect_timeout, r.resolve_every), (Duration::from_secs(2), Duration::from_secs(60)));
    assert_eq!((c.size, c.worker.script.as_ref(), c.worker.module.as_ref()), (Some(2), None, None));
    // A remote pool needs no [worker]; a build without remote workers refuses it.
    let checked = file.check(None, &c);
    if cfg!(feature = "remote") {
        checked.unwrap();
    } else {
        let e = checked.unwrap_err().to_string();
        assert_eq!(e, format!("{}: key 'remote.agents': {}", f.at(4), validate::NO_REMOTE));
    }

    // Variables: agents separated by commas, paths kept as given.
    let env = [
        ("SNAKEPIT_CFG_REMOTE__AGENTS", "http://127.0.0.1:7001, http://[::1]:7002,"),
        ("SNAKEPIT_CFG_REMOTE__INSECURE_PLAINTEXT", "true"),
        ("SNAKEPIT_CFG_REMOTE__TLS_CA", "env/ca.pem"),
        ("SNAKEPIT_CFG_REMOTE__CONNECT_TIMEOUT", "250ms"),
    ];
    let file = ConfigFile::read_with_env(f.path(), env).unwrap();
    let r = file.pool(None).unwrap().remote;
    assert_eq!(r.agents, ["http://127.0.0.1:7001", "http://[::1]:7002"]);
    assert!(r.insecure_plaintext);
    assert_eq!(r.tls_ca, Some(PathBuf::from("env/ca.pem")));
    assert_eq!(r.connect_timeout, Duration::from_millis(250));

    // The defaults: no agents, local workers.
    let r = RemoteConfig::default();
    assert!(!r.is_remote());
    assert_eq!((r.keepalive_interval, r.keepalive_timeout), (Duration::from_secs(2), Duration::from_secs(3)));
    assert_eq!((r.connect_timeout, r.resolve_every), (Duration::from_secs(5), Duration::from_secs(10)));
}

#[test]
fn remote_pools_are_validated() {
    let tls = "tls_ca = \"/ca.pem\"\ntls_cert = \"/c.pem\"\ntls_key = \"/c.key\"\n";
    let cases: Vec<(String, usize, &str, &str)> = vec![
        (
            format!("[worker]\nmodule = \"m\"\n[remote]\nagents = [\"https://a\"]\n{tls}"),
            4,
            "remote.agents",
            validate::REMOTE_OR_LOCAL,
        ),
        (
            format!("[remote]\nagents = [\"https://a\"]\n{tls}[worker]\ncommand = \"perl w.pl\"\n"),
            2,
            "remote.agents",
            validate::REMOTE_OR_LOCAL,
        ),
        (
            "[remote]\nagents = [\"https://a\"]\n".into(),
            1,
            "remote.tls_ca",
            "https:// agents (\"https://a\") need mutual TLS: set `tls_ca`, `tls_cert` and `tls_key`",
        ),
        (
            "[remote]\nagents = [\"https://a\"]\ntls_ca = \"/ca.pem\"\ntls_key = \"/c.key\"\n".into(),
            1,
            "remote.tls_cert",
            "mutual TLS needs all of `tls_ca`, `tls_cert` and `tls_key`",
        ),
        (
            "[remote]\nagents = [\"http://127.0.0.1:7443\"]\n".into(),
            2,
            "remote.agents",
            "\"http://127.0.0.1:7443\": http:// is plaintext: it needs `insecure_plaintext = true`",
        ),
        (
            "[remote]\nagents = [\"ftp://a\"]\ninsecure_plaintext = true\n".into(),
            2,
            "remote.agents",
            "\"ftp://a\": expected https://HOST[:PORT]",
        ),
        (
            "[worker]\nmodule = \"m\"\n[remote]\nconnect_timeout = \"0s\"\n".into(),
            4,
            "remote.connect_timeout",
            "must be longer than 0",
        ),
        (
            "[worker]\nmodule = \"m\"\n[remote]\n\nkeepalive_timeout = \"0s\"\n".into(),
            5,
            "remote.keepalive_timeout",
            "must be longer than 0",
        ),
    ];
    for (text, line, key, want) in &cases {
        let (f, got) = error_text(text, &[]);
        let want = format!("{}: key '{key}': {want}", f.at(*line));
        assert!(got.starts_with(&want), "{text:?}:\n got  {got}\n want {want}");
    }

    // Plaintext on loopback, when allowed.
    let (f, r) = load("[remote]\nagents = [\"http://127.0.0.1:7443\"]\ninsecure_plaintext = true\n", &[]);
    if cfg!(feature = "remote") {
        assert!(r.unwrap().remote.is_remote());
        let (f, got) =
            error_text("[remote]\nagents = [\"http://10.0.0.7:7443\"]\ninsecure_plaintext = true\n", &[]);
        let want = format!(
            "{}: key 'remote.agents': \"http://10.0.0.7:7443\": plaintext (http://) is for loopback",
            f.at(2)
        );
        assert!(got.starts_with(&want), "got  {got}\nwant {want}");
    } else {
        let e = r.unwrap_err().to_string();
        assert_eq!(e, format!("{}: key 'remote.agents': {}", f.at(2), validate::NO_REMOTE));
    }

    // In code: no key, no line.
    let mut c = showcase();
    c.remote.agents = vec!["https://a".into()];
    let e = c.validate().unwrap_err().to_string();
    assert_eq!(e, format!("key 'remote.agents': {}", validate::REMOTE_OR_LOCAL));
}

#[test]
fn a_pools_choice_of_remote_or_local_workers_replaces_the_top_levels() {
    let f = File::new(
        r#"
[worker]
module = "m"
env = { A = "kept" }
[remote]
tls_ca = "ca.pem"
tls_cert = "client.pem"
tls_key = "client.key"
[pools.local]
[pools.far]
remote.agents = ["https://far.example:7443"]
[pools.empty]
remote.agents = []
"#,
    );
    let dir = dir_of(&f);
    let file = ConfigFile::read_with_env(f.path(), NO_ENV).unwrap();
    let local = file.pool(Some("local")).unwrap();
    assert_eq!((local.worker.module.as_deref(), local.remote.is_remote()), (Some("m"), false));
    file.check(Some("local"), &local).unwrap();
    let empty = file.pool(Some("empty")).unwrap();
    assert_eq!((empty.worker.module.as_deref(), empty.remote.is_remote()), (Some("m"), false));
    let far = file.pool(Some("far")).unwrap();
    assert_eq!(far.worker.module, None, "a pool naming agents inherits no worker source");
    assert_eq!(far.worker.env.get("A").map(String::as_str), Some("kept"));
    assert_eq!(far.remote.agents, ["https://far.example:7443"]);
    assert_eq!(far.remote.tls_ca, Some(dir.join("ca.pem")), "inherited, relative to the file");
    let checked = file.check(Some("far"), &far);
    if cfg!(feature = "remote") {
        checked.unwrap();
    } else {
        let e = checked.unwrap_err().to_string();
        assert_eq!(e, format!("{}: key 'pools.far.remote.agents': {}", f.at(11), validate::NO_REMOTE));
    }

    // The other way round: the top level's agents, a pool with its own worker.
    let f = File::new(
        "[remote]\nagents = [\"https://a:7443\"]\ninsecure_plaintext = true\n[pools.far]\n[pools.near.worker]\nmodule = \"m\"\n",
    );
    let file = ConfigFile::read_with_env(f.path(), NO_ENV).unwrap();
    let near = file.pool(Some("near")).unwrap();
    assert_eq!((near.worker.module.as_deref(), near.remote.is_remote()), (Some("m"), false));
    assert!(near.remote.insecure_plaintext, "the rest of [remote] is inherited");
    file.check(Some("near"), &near).unwrap();
    let far = file.pool(Some("far")).unwrap();
    assert_eq!((far.worker.module.as_ref(), far.remote.agents.len()), (None, 1));
}

/// The section's defaults are the remote client's.
#[cfg(feature = "remote")]
#[test]
fn the_remote_defaults_are_the_clients() {
    let d = RemoteConfig::default();
    let o = snakepit_remote::RemoteOptions::new(Vec::<String>::new());
    assert_eq!(
        (d.insecure_plaintext, d.keepalive_interval, d.keepalive_timeout, d.connect_timeout, d.resolve_every),
        (o.insecure_plaintext, o.keepalive_interval, o.keepalive_timeout, o.connect_timeout, o.resolve_every)
    );
}

/// A remote pool's builder gets the remote options and no adapter; its size only when set.
/// Nothing connects before `build`.
#[cfg(feature = "remote")]
#[test]
fn a_remote_pool_becomes_a_builder_with_remote_options() {
    let mut c = PoolConfig::default();
    c.remote.agents = vec!["https://a.example:7443".into(), "https://b.example".into()];
    c.remote.tls_ca = Some("/ca.pem".into());
    c.remote.tls_cert = Some("/client.pem".into());
    c.remote.tls_key = Some("/client.key".into());
    c.remote.keepalive_interval = Duration::from_secs(7);
    c.remote.resolve_every = Duration::from_secs(30);
    let b = crate::PoolBuilder::from_config(&c).unwrap();
    let o = b.remote.as_ref().unwrap();
    assert_eq!(o.agents, ["https://a.example:7443", "https://b.example"]);
    let tls = o.tls.as_ref().unwrap();
    assert_eq!(
        (tls.ca.as_path(), tls.cert.as_path(), tls.key.as_path()),
        (Path::new("/ca.pem"), Path::new("/client.pem"), Path::new("/client.key"))
    );
    assert_eq!((o.keepalive_interval, o.keepalive_timeout), (Duration::from_secs(7), Duration::from_secs(3)));
    assert_eq!((o.connect_timeout, o.resolve_every), (Duration::from_secs(5), Duration::from_secs(30)));
    assert!(!o.insecure_plaintext);
    assert!(b.adapter.is_none(), "the agents are the adapter, at build");
    assert!(!b.cfg.size_set, "no size: the agents' workers");
    c.size = Some(3);
    let b = crate::PoolBuilder::from_config(&c).unwrap();
    assert!(b.cfg.size_set);
    assert_eq!(b.cfg.size, 3);
    // No local adapter to reload.
    let e = c.adapter().map(|_| ()).unwrap_err();
    assert!(e.to_string().starts_with("key 'remote.agents': "), "{e}");
}
