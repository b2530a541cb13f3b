//! The zygote start mode with real python3 workers: workers are forks of one warm process, and
//! crash, restart, recycling, orphans and shutdown behave as with cold workers.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use snakepit::{Error, ExitInfo, ProcessProfile, Python, ThreadProfile, Zygote};
use snakepit_tests::{procs, Reaper};

/// Field 4 of /proc/<pid>/stat: the parent pid.
fn parent_of(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A pool of `size` workers forked from a zygote of `script`.
async fn zygote_pool(r: &Reaper, script: &std::path::Path, size: usize) -> snakepit::Pool {
    r.builder()
        .adapter(Python::script(script))
        .profile(Zygote(ProcessProfile))
        .size(size)
        .build()
        .await
        .expect("pool")
}

async fn pids(pool: &snakepit::Pool, n: usize) -> Vec<i64> {
    let calls = (0..n).map(|_| pool.execute("sleep_pid", json!({"ms": 200})));
    let mut v: Vec<i64> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("sleep_pid").as_i64().expect("pid"))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

const SLEEP_PID: &str = r#"
import os, time
from snakepit_bridge import tool, serve

LOADED_IN = os.getpid()

@tool
def sleep_pid(ms):
    time.sleep(ms / 1000)
    return os.getpid()

@tool
def loaded_in():
    return LOADED_IN

@tool
def worker_id():
    return os.environ.get("SNAKEPIT_WORKER_ID")

@tool
def crash(code):
    os._exit(code)

if __name__ == "__main__":
    serve()
"#;

#[tokio::test]
async fn workers_are_forks_of_one_warm_zygote() {
    let r = Reaper::new();
    let script = r.script("w.py", SLEEP_PID);
    let pool = zygote_pool(&r, &script, 3).await;
    let workers = pids(&pool, 3).await;
    assert_eq!(workers.len(), 3, "three distinct workers: {workers:?}");
    // The module ran once, in the zygote: every worker reports the zygote's pid for it.
    let zygote = pool.execute("loaded_in", json!(null)).await.expect("loaded_in").as_i64().expect("pid");
    for w in &workers {
        assert_ne!(*w, zygote);
        assert_eq!(parent_of(*w), Some(zygote), "worker {w} is the zygote's child");
    }
    // Each worker knows its own id, as a cold one does.
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(pool.execute("worker_id", json!(null)).await.expect("id").as_str().expect("str").to_owned());
    }
    assert!(ids.iter().all(|i| i.starts_with("worker ")), "{ids:?}");
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_crashed_fork_reports_its_exit_status_and_is_replaced_by_a_new_fork() {
    let r = Reaper::new();
    let script = r.script("w.py", SLEEP_PID);
    let pool = zygote_pool(&r, &script, 1).await;
    let zygote = pool.execute("loaded_in", json!(null)).await.expect("zygote");
    match pool.execute("crash", json!({"code": 9})).await {
        Err(Error::WorkerCrashed { exit, .. }) => assert_eq!(exit, ExitInfo::Code(9)),
        other => panic!("unexpected {other:?}"),
    }
    let pid = pool.execute("sleep_pid", json!({"ms": 0})).await.expect("served again").as_i64().expect("pid");
    // SIGKILL from outside: the zygote reports the signal.
    let p = std::sync::Arc::new(pool);
    let p2 = p.clone();
    let call = tokio::spawn(async move { p2.execute("sleep_pid", json!({"ms": 60_000})).await });
    p.wait_stats(|s| s.busy == 1, Duration::from_secs(10)).await.expect("busy");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill");
    match call.await.expect("join") {
        Err(Error::WorkerCrashed { exit, .. }) => assert_eq!(exit, ExitInfo::Signal(9)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(p.execute("loaded_in", json!(null)).await.expect("same zygote"), zygote);
    assert_eq!(p.stats().restarts, 2);
    p.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_killed_zygote_takes_its_workers_down_and_is_started_again() {
    let r = Reaper::new();
    let script = r.script("w.py", SLEEP_PID);
    let pool = zygote_pool(&r, &script, 2).await;
    let old_workers = pids(&pool, 2).await;
    let zygote = pool.execute("loaded_in", json!(null)).await.expect("zygote").as_i64().expect("pid");
    kill(Pid::from_raw(zygote as i32), Signal::SIGKILL).expect("kill the zygote");
    let deadline = Instant::now() + Duration::from_secs(5);
    for w in &old_workers {
        assert!(procs::wait_exit(*w as i32, deadline), "worker {w} outlived its zygote");
    }
    pool.wait_stats(|s| s.ready == 2 && s.restarts >= 2, Duration::from_secs(20))
        .await
        .expect("back to 2 ready");
    let new_zygote = pool.execute("loaded_in", json!(null)).await.expect("new zygote").as_i64().expect("pid");
    assert_ne!(new_zygote, zygote);
    for w in pids(&pool, 2).await {
        assert_eq!(parent_of(w), Some(new_zygote));
    }
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_dead_fork_takes_its_grandchildren_with_it_even_setsid_ones() {
    let r = Reaper::new();
    let pool = r
        .builder()
        .adapter(Python::showcase())
        .profile(Zygote(ProcessProfile))
        .size(1)
        .build()
        .await
        .expect("pool");
    let in_group =
        pool.execute("grandchild", json!({"setsid": false})).await.expect("spawn").as_i64().expect("pid");
    let escaped =
        pool.execute("grandchild", json!({"setsid": true})).await.expect("spawn").as_i64().expect("pid");
    let worker = pool.execute("pid", json!(null)).await.expect("pid").as_i64().expect("pid");
    // While the worker lives, its descendants are its own (it is a subreaper).
    assert_eq!(parent_of(in_group), Some(worker));
    assert_eq!(parent_of(escaped), Some(worker));
    assert!(matches!(pool.execute("crash", json!({"code": 1})).await, Err(Error::WorkerCrashed { .. })));
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in [in_group, escaped] {
        assert!(procs::wait_exit(pid as i32, deadline), "grandchild {pid} survived its worker");
    }
    pool.execute("grandchild", json!({"setsid": true})).await.expect("spawn");
    drop(pool);
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn recycling_forks_a_fresh_worker_and_the_thread_profile_works_too() {
    let r = Reaper::new();
    let script = r.script("w.py", SLEEP_PID);
    let pool = r
        .builder()
        .adapter(Python::script(&script))
        .profile(Zygote(ThreadProfile::new(4)))
        .size(1)
        .max_requests(4)
        .recycle_jitter(0.0)
        .build()
        .await
        .expect("pool");
    // Four concurrent sleeps on one worker take one sleep, not four.
    let t = Instant::now();
    let one = pids(&pool, 4).await;
    assert_eq!(one.len(), 1, "{one:?}");
    assert!(t.elapsed() < Duration::from_millis(750), "{:?}", t.elapsed());
    pool.wait_stats(|s| s.recycled >= 1 && s.ready == 1, Duration::from_secs(10)).await.expect("recycled");
    let next = pool.execute("sleep_pid", json!({"ms": 0})).await.expect("call").as_i64().expect("pid");
    assert_ne!(next, one[0]);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn an_import_error_in_the_zygote_fails_startup_with_the_traceback() {
    let r = Reaper::new();
    let script = r.script("broken.py", "import no_such_module_here\n");
    let t = Instant::now();
    let err = r
        .builder()
        .adapter(Python::script(&script))
        .profile(Zygote(ProcessProfile))
        .size(2)
        .build()
        .await
        .expect_err("must fail");
    assert!(t.elapsed() < Duration::from_secs(10));
    match err {
        Error::StartupFailed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("no_such_module_here"), "{stderr_tail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn an_adapter_without_a_zygote_is_a_clear_spawn_error() {
    let r = Reaper::new();
    let err = r
        .builder()
        .adapter(snakepit::Generic::new("true"))
        .profile(Zygote(ProcessProfile))
        .size(1)
        .build()
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("zygote"), "{err}");
}

const PRELOAD: &str = r#"
import os, threading, time
from snakepit_bridge import BaseAdapter, tool

class Model(BaseAdapter):
    @classmethod
    def preload(cls):
        cls.loaded_in = os.getpid()
        cls.weights = list(range(1000))
        if os.environ.get("PRELOAD_THREAD"):
            threading.Thread(target=time.sleep, args=(60,), name="blas-pool", daemon=True).start()

    def setup(self):
        self.set_up_in = os.getpid()

    @tool
    def where(self):
        return {"loaded_in": self.loaded_in, "set_up_in": self.set_up_in, "me": os.getpid(), "n": len(self.weights)}
"#;

#[tokio::test]
async fn preload_runs_once_in_the_zygote_and_setup_in_each_worker() {
    let r = Reaper::new();
    let script = r.script("model.py", PRELOAD);
    let pool = zygote_pool(&r, &script, 2).await;
    let calls = (0..8).map(|_| pool.execute("where", json!(null)));
    let answers: Vec<serde_json::Value> =
        futures::future::join_all(calls).await.into_iter().map(|a| a.expect("where")).collect();
    let loaded: std::collections::BTreeSet<i64> =
        answers.iter().map(|a| a["loaded_in"].as_i64().expect("pid")).collect();
    assert_eq!(loaded.len(), 1, "one preload for every worker: {answers:?}");
    let zygote = *loaded.iter().next().expect("pid");
    for a in &answers {
        let me = a["me"].as_i64().expect("pid");
        assert_eq!(a["set_up_in"].as_i64(), Some(me), "setup runs in the worker itself");
        assert_ne!(me, zygote);
        assert_eq!(parent_of(me), Some(zygote), "forked from the process that preloaded");
        assert_eq!(a["n"], 1000);
    }
    pool.shutdown().await;
    // A cold worker preloads for itself, before setup.
    let pool = r.builder().adapter(Python::script(&script)).size(1).build().await.expect("pool");
    let a = pool.execute("where", json!(null)).await.expect("where");
    assert_eq!(a["loaded_in"], a["me"]);
    pool.shutdown().await;
    r.assert_none_left(Duration::from_secs(5));
}

#[tokio::test]
async fn a_zygote_with_a_thread_alive_refuses_to_fork_and_says_why() {
    let r = Reaper::new();
    let script = r.script("model.py", PRELOAD);
    let err = r
        .builder()
        .adapter(Python::script(script).env("PRELOAD_THREAD", "1"))
        .profile(Zygote(ProcessProfile))
        .size(1)
        .build()
        .await
        .expect_err("a thread alive in the zygote");
    let text = format!("{err}");
    assert!(text.contains("blas-pool") && text.contains("setup()"), "{text}");
    r.assert_none_left(Duration::from_secs(5));
}
