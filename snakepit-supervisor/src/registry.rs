//! The run registry: one small file per running pool, so that whatever a host killed with
//! SIGKILL left behind can be found and reaped later — by the next start of the same pool
//! instance, or by hand (`snakepit reap`).
//!
//! The shepherds already kill every worker subtree when their host dies; the registry is the
//! last layer, for what escaped them (a shepherd killed by the OOM killer, a descendant that
//! outlived the kill loop). Every worker carries `SNAKEPIT_RUN_ID=<run id>` in its environment,
//! and so do its descendants unless they clear it.
//!
//! A process is killed only if (a) the run's host is dead — its pid is gone or its start time
//! differs — and (b) the process is the recorded worker (same pid *and* start time) or carries
//! the run id in its environment. A live host's run is never touched.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The contents of one run file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunRecord {
    /// The pool instance's name.
    pub instance: String,
    /// The run id (also in every worker's environment as `SNAKEPIT_RUN_ID`).
    pub run_id: String,
    /// The host's pid.
    pub host_pid: u32,
    /// The host's start time (clock ticks since boot, `/proc/<pid>/stat` field 22).
    pub host_start: u64,
    /// The live workers: (pid, start time).
    pub workers: Vec<(u32, u64)>,
}

/// What reaping found (or, in a dry run, would kill).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reaped {
    /// Run files of dead hosts that were examined (and removed unless dry-run).
    pub runs: Vec<RunRecord>,
    /// Processes killed (or to be killed).
    pub pids: Vec<u32>,
}

/// The directory run files live in: `$SNAKEPIT_RUN_DIR`, else `$XDG_RUNTIME_DIR/snakepit/runs`,
/// else `$XDG_STATE_HOME/snakepit/runs`, else `~/.local/state/snakepit/runs`, else
/// `/tmp/snakepit-<uid>/runs`.
#[allow(unsafe_code)] // getuid has no preconditions
pub fn run_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("SNAKEPIT_RUN_DIR") {
        return d;
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        return d.join("snakepit").join("runs");
    }
    if let Some(d) = var("XDG_STATE_HOME") {
        return d.join("snakepit").join("runs");
    }
    if let Some(h) = var("HOME") {
        return h.join(".local").join("state").join("snakepit").join("runs");
    }
    // SAFETY: getuid has no preconditions.
    std::env::temp_dir().join(format!("snakepit-{}", unsafe { libc::getuid() })).join("runs")
}

/// A process's start time in clock ticks since boot, if it is alive (zombies count as gone).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    // After the command come state (3), ppid (4), ... starttime (22): index 22 - 3 = 19.
    fields.nth(18)?.parse().ok()
}

fn environ_has(pid: u32, needle: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(64)
        .collect()
}

/// The registry file of one running pool. Dropping (or [closing](RunFile::close)) it removes the
/// file; updates after that are ignored, so a late one cannot bring the file back.
#[derive(Debug)]
pub struct RunFile {
    path: PathBuf,
    /// The record, and whether the file is closed; every write happens under this lock.
    record: Mutex<(RunRecord, bool)>,
}

impl RunFile {
    /// Creates the run file for `instance` / `run_id` in `dir`, owned by this process.
    pub fn create(dir: &Path, instance: &str, run_id: &str) -> std::io::Result<RunFile> {
        std::fs::create_dir_all(dir)?;
        let pid = std::process::id();
        let record = RunRecord {
            instance: instance.to_owned(),
            run_id: run_id.to_owned(),
            host_pid: pid,
            host_start: start_time(pid).unwrap_or(0),
            workers: Vec::new(),
        };
        let path = dir.join(format!("{}.{}.run.json", sanitize(instance), sanitize(run_id)));
        write(&path, &record)?;
        Ok(RunFile { path, record: Mutex::new((record, false)) })
    }

    /// Applies `change` to the record and rewrites the file, unless it is closed.
    fn update(&self, change: impl FnOnce(&mut RunRecord)) {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        if rec.1 {
            return;
        }
        change(&mut rec.0);
        if let Err(e) = write(&self.path, &rec.0) {
            tracing::warn!("cannot update the run registry {}: {e}", self.path.display());
        }
    }

    /// Records a started worker process.
    pub fn add_worker(&self, pid: u32) {
        let Some(start) = start_time(pid) else { return };
        self.update(|r| r.workers.push((pid, start)));
    }

    /// Forgets a worker process that has exited.
    pub fn remove_worker(&self, pid: u32) {
        self.update(|r| r.workers.retain(|(p, _)| *p != pid));
    }

    /// Removes the file (the pool is gone); later updates are ignored.
    pub fn close(&self) {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        if !std::mem::replace(&mut rec.1, true) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `rec` to `path` atomically (a temporary file, then a rename).
fn write(path: &Path, rec: &RunRecord) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(rec).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

impl Drop for RunFile {
    fn drop(&mut self) {
        self.close();
    }
}

fn host_alive(r: &RunRecord) -> bool {
    start_time(r.host_pid).is_some_and(|s| s == r.host_start)
}

/// Reaps the leftovers of dead hosts' runs in `dir` (only those of `instance` when given).
/// With `dry_run`, kills nothing and keeps the files: it reports what it would kill.
#[allow(unsafe_code)] // pidfd syscalls on processes the registry verified
pub fn reap(dir: &Path, instance: Option<&str>, dry_run: bool) -> Reaped {
    let mut out = Reaped::default();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let mut dead = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if !path.to_string_lossy().ends_with(".run.json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let Ok(rec) = serde_json::from_slice::<RunRecord>(&bytes) else {
            tracing::warn!("ignoring unreadable run file {}", path.display());
            continue;
        };
        if instance.is_some_and(|i| i != rec.instance) || host_alive(&rec) {
            continue;
        }
        dead.push((path, rec));
    }
    if dead.is_empty() {
        return out;
    }
    // One /proc scan for every dead run's marker.
    let markers: Vec<Vec<u8>> =
        dead.iter().map(|(_, r)| format!("SNAKEPIT_RUN_ID={}", r.run_id).into_bytes()).collect();
    let mut victims: Vec<u32> = Vec::new();
    for (_, rec) in &dead {
        for &(pid, start) in &rec.workers {
            if start_time(pid) == Some(start) {
                victims.push(pid);
            }
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if pid == std::process::id() || start_time(pid).is_none() {
                continue;
            }
            if markers.iter().any(|m| environ_has(pid, m)) {
                victims.push(pid);
            }
        }
    }
    victims.sort_unstable();
    victims.dedup();
    if !dry_run {
        for &pid in &victims {
            // SAFETY: plain kill(2) of a process verified just above.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            tracing::warn!(pid, "reaped a process left behind by a dead host");
        }
        for (path, _) in &dead {
            let _ = std::fs::remove_file(path);
        }
    }
    out.pids = victims;
    out.runs = dead.into_iter().map(|(_, r)| r).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_hosts_run_is_never_reaped_and_a_file_goes_with_its_owner() {
        let dir = std::env::temp_dir().join(format!("snakepit-reg-test-{}", std::process::id()));
        let f = RunFile::create(&dir, "inst", "run-1").expect("create");
        f.add_worker(std::process::id());
        let r = reap(&dir, None, false);
        assert!(r.runs.is_empty() && r.pids.is_empty(), "{r:?}");
        let path = f.path().to_owned();
        assert!(path.exists());
        drop(f);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_closed_file_stays_gone_whatever_updates_come_late() {
        let dir = std::env::temp_dir().join(format!("snakepit-reg-close-{}", std::process::id()));
        let f = std::sync::Arc::new(RunFile::create(&dir, "inst", "run-2").expect("create"));
        let path = f.path().to_owned();
        let late = f.clone(); // a worker's exit watcher, still holding the file
        f.close();
        assert!(!path.exists());
        late.remove_worker(std::process::id());
        late.add_worker(std::process::id());
        assert!(!path.exists(), "an update after close must not bring the file back");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn start_time_of_self_is_known() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX - 1), None);
    }
}
