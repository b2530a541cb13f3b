//! The run registry: one small file per running pool, so that whatever a host killed with
//! SIGKILL left behind can be found and reaped later — by the next start of the same pool
//! instance, or by hand (`snakepit reap`).
//!
//! The shepherds already kill every worker subtree when their host dies; the registry is the
//! last layer, for what escaped them (a shepherd killed by the OOM killer, a descendant that
//! outlived the kill loop). Every worker carries `SNAKEPIT_RUN_ID=<run id>` in its environment,
//! and so do its descendants unless they clear it.
//!
//! Only what the host verified is recorded: a cold worker's shepherd (the host's own child),
//! a forked worker (checked as its zygote's child through a pidfd), and a worker process whose
//! claimed pid checked out as its shepherd's child — never a pid a worker merely claimed.
//!
//! A process is killed only if (a) the run's host is dead — its pid is gone or its start time
//! differs — and (b) the process is a recorded one (same pid *and* start time) or carries the
//! run id in its environment and belongs to the run file's owner. The kill goes through a pidfd
//! opened *before* that final check, so a pid reused after the check is never signalled. A live
//! host's run is never touched.
//!
//! The directory is checked before use (see `snakepit_fs`): a real directory owned by the
//! effective uid with no group or other access, under safe ancestors. A run file that is not a
//! regular file owned by the effective uid is skipped with a warning.

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
    /// The live worker processes the host verified: (pid, start time).
    pub workers: Vec<(u32, u64)>,
    /// Private directories the run's transports created (gRPC socket directories), removed by
    /// [`reap`] when the host died without removing them.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
}

/// What reaping found (or, in a dry run, would kill).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reaped {
    /// Run files of dead hosts that were examined (and removed unless dry-run).
    pub runs: Vec<RunRecord>,
    /// Processes killed (or to be killed).
    pub pids: Vec<u32>,
    /// Directories removed (or to be removed).
    pub dirs: Vec<PathBuf>,
}

/// The directory run files live in: `$SNAKEPIT_RUN_DIR`, else `$XDG_RUNTIME_DIR/snakepit/runs`,
/// else `$XDG_STATE_HOME/snakepit/runs`, else `~/.local/state/snakepit/runs`, else
/// `$TMPDIR/snakepit-<uid>/runs`. Where it is is not whether it may be used: [`RunFile::create`]
/// and [`reap`] check it first.
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
    std::env::temp_dir().join(format!("snakepit-{}", snakepit_fs::euid())).join("runs")
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

/// Whether `pid`'s real and effective uids are both `uid` (from `/proc/<pid>/status`).
fn owned_by(pid: u32, uid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let Some(line) = status.lines().find_map(|l| l.strip_prefix("Uid:")) else { return false };
    let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
    matches!((ids.next(), ids.next()), (Some(Some(r)), Some(Some(e))) if r == uid && e == uid)
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
    dir: PathBuf,
    name: String,
    /// The record, and whether the file is closed; every write happens under this lock.
    record: Mutex<(RunRecord, bool)>,
}

impl RunFile {
    /// Creates the run file for `instance` / `run_id` in `dir`, owned by this process. `dir` is
    /// created (mode 0700) if missing, and refused (an error naming it and why) unless it
    /// passes `snakepit_fs::check_private_dir`.
    pub fn create(dir: &Path, instance: &str, run_id: &str) -> std::io::Result<RunFile> {
        let dir = snakepit_fs::ensure_private_dir(dir)?;
        let pid = std::process::id();
        let record = RunRecord {
            instance: instance.to_owned(),
            run_id: run_id.to_owned(),
            host_pid: pid,
            host_start: start_time(pid).unwrap_or(0),
            workers: Vec::new(),
            dirs: Vec::new(),
        };
        let name = format!("{}.{}.run.json", sanitize(instance), sanitize(run_id));
        write(&dir, &name, &record)?;
        Ok(RunFile { dir, name, record: Mutex::new((record, false)) })
    }

    /// Applies `change` to the record and rewrites the file, unless it is closed.
    fn update(&self, change: impl FnOnce(&mut RunRecord)) {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        if rec.1 {
            return;
        }
        change(&mut rec.0);
        if let Err(e) = write(&self.dir, &self.name, &rec.0) {
            tracing::warn!("cannot update the run registry {}: {e}", self.path().display());
        }
    }

    /// Records a started worker process the host verified: its pid and start time.
    pub fn add_worker(&self, pid: u32, start: u64) {
        self.update(|r| r.workers.push((pid, start)));
    }

    /// Forgets a worker process that has exited: the entry with this pid *and* start time.
    pub fn remove_worker(&self, pid: u32, start: u64) {
        self.update(|r| r.workers.retain(|e| *e != (pid, start)));
    }

    /// Records a private directory a transport created for this run.
    pub fn add_dir(&self, dir: &Path) {
        self.update(|r| r.dirs.push(dir.to_path_buf()));
    }

    /// Forgets a directory (its owner removes it).
    pub fn remove_dir(&self, dir: &Path) {
        self.update(|r| r.dirs.retain(|d| d != dir));
    }

    /// Removes the file (the pool is gone); later updates are ignored.
    pub fn close(&self) {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        if !std::mem::replace(&mut rec.1, true) {
            let _ = std::fs::remove_file(self.path());
        }
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }
}

/// Writes `rec` to `dir/name` atomically (a fresh 0600 file, then a rename).
fn write(dir: &Path, name: &str, rec: &RunRecord) -> std::io::Result<()> {
    snakepit_fs::write_private_file(dir, name, &serde_json::to_vec(rec).map_err(std::io::Error::other)?)
}

impl Drop for RunFile {
    fn drop(&mut self) {
        self.close();
    }
}

fn host_alive(r: &RunRecord) -> bool {
    start_time(r.host_pid).is_some_and(|s| s == r.host_start)
}

/// Why a process is to be killed; checked again once a pidfd pins it.
#[derive(Clone, Copy)]
enum Claim {
    /// A recorded process: its start time must still match.
    Recorded(u64),
    /// Carries dead run `usize`'s marker and belongs to the run files' owner.
    Marked(usize),
}

/// Reaps the leftovers of dead hosts' runs in `dir` (only those of `instance` when given): kills
/// their processes and removes their private directories. With `dry_run`, kills and removes
/// nothing: it reports what it would.
///
/// A missing `dir` has nothing to reap. A `dir` that fails `snakepit_fs::check_private_dir` is
/// an error naming it and why; run files in it that are not regular files owned by the
/// effective uid are skipped with a warning.
pub fn reap(dir: &Path, instance: Option<&str>, dry_run: bool) -> std::io::Result<Reaped> {
    let mut out = Reaped::default();
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(out);
    }
    let dir = snakepit_fs::check_private_dir(dir)?;
    let owner = snakepit_fs::euid();
    let mut dead = Vec::new();
    for e in std::fs::read_dir(&dir)?.flatten() {
        let path = e.path();
        if !path.to_string_lossy().ends_with(".run.json") {
            continue;
        }
        let bytes = match snakepit_fs::read_own_file(&path) {
            Ok(b) => b,
            Err(r) => {
                tracing::warn!("skipping run file: {r}");
                continue;
            }
        };
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
        return Ok(out);
    }
    // One /proc scan for every dead run's marker.
    let markers: Vec<Vec<u8>> =
        dead.iter().map(|(_, r)| format!("SNAKEPIT_RUN_ID={}", r.run_id).into_bytes()).collect();
    let mut victims: Vec<(u32, Claim)> = Vec::new();
    for (_, rec) in &dead {
        for &(pid, start) in &rec.workers {
            if start_time(pid) == Some(start) {
                victims.push((pid, Claim::Recorded(start)));
            }
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if pid == std::process::id() || start_time(pid).is_none() || !owned_by(pid, owner) {
                continue;
            }
            if let Some(i) = markers.iter().position(|m| environ_has(pid, m)) {
                victims.push((pid, Claim::Marked(i)));
            }
        }
    }
    victims.sort_unstable_by_key(|(pid, _)| *pid);
    victims.dedup_by_key(|(pid, _)| *pid);
    let holds = |pid: u32, claim: Claim| match claim {
        Claim::Recorded(start) => start_time(pid) == Some(start),
        Claim::Marked(i) => {
            start_time(pid).is_some() && owned_by(pid, owner) && environ_has(pid, &markers[i])
        }
    };
    for (pid, claim) in victims {
        if dry_run {
            if holds(pid, claim) {
                out.pids.push(pid);
            }
            continue;
        }
        // Opened before the final check: if the checked process exits and its pid is reused
        // after this point, the pidfd still names the dead one and the kill is a no-op.
        let Some(fd) = crate::process::pidfd_open(pid) else { continue };
        if !holds(pid, claim) {
            continue;
        }
        if crate::process::pidfd_send_signal(&fd, libc::SIGKILL).is_ok() {
            tracing::warn!(pid, "reaped a process left behind by a dead host");
            out.pids.push(pid);
        }
    }
    for (path, rec) in &dead {
        for d in &rec.dirs {
            match snakepit_fs::check_private_dir(d) {
                Ok(d) => {
                    if dry_run || std::fs::remove_dir_all(&d).is_ok() {
                        out.dirs.push(d);
                    }
                }
                Err(r) if std::fs::symlink_metadata(d).is_ok() => {
                    tracing::warn!("not removing a dead run's directory: {r}");
                }
                Err(_) => {} // already gone
            }
        }
        if !dry_run {
            let _ = std::fs::remove_file(path);
        }
    }
    out.runs = dead.into_iter().map(|(_, r)| r).collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_hosts_run_is_never_reaped_and_a_file_goes_with_its_owner() {
        let dir = std::env::temp_dir().join(format!("snakepit-reg-test-{}", std::process::id()));
        let f = RunFile::create(&dir, "inst", "run-1").expect("create");
        f.add_worker(std::process::id(), start_time(std::process::id()).expect("own start"));
        let r = reap(&dir, None, false).expect("reap");
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
        late.remove_worker(std::process::id(), 1);
        late.add_worker(std::process::id(), 1);
        assert!(!path.exists(), "an update after close must not bring the file back");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `sleep 600` that is SIGKILLed and reaped when dropped, whatever the test did.
    struct Bystander(std::process::Child);

    impl Bystander {
        #[allow(clippy::disallowed_methods)] // a bystander process for the test
        fn spawn(configure: impl FnOnce(&mut std::process::Command)) -> Self {
            let mut c = std::process::Command::new("sleep");
            c.arg("600");
            configure(&mut c);
            Bystander(c.spawn().expect("spawn sleep"))
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        fn alive(&mut self) -> bool {
            self.0.try_wait().expect("try_wait").is_none()
        }
    }

    impl Drop for Bystander {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A private scratch run dir, removed when dropped.
    struct Scratch(tempfile::TempDir, PathBuf);

    impl Scratch {
        fn new() -> Self {
            let t = tempfile::tempdir().expect("tempdir");
            let runs = snakepit_fs::ensure_private_dir(&t.path().join("runs")).expect("runs");
            Scratch(t, runs)
        }

        /// Writes a dead host's run file (pid `u32::MAX - 1` never runs) recording `workers`.
        fn dead_run(&self, run_id: &str, workers: &[(u32, u64)]) -> PathBuf {
            let rec = RunRecord {
                instance: "x".into(),
                run_id: run_id.into(),
                host_pid: u32::MAX - 1,
                host_start: 1,
                workers: workers.to_vec(),
                dirs: Vec::new(),
            };
            let path = self.1.join(format!("x.{run_id}.run.json"));
            std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write");
            path
        }
    }

    fn is_root() -> bool {
        snakepit_fs::euid() == 0
    }

    #[test]
    fn a_dead_runs_recorded_process_is_reaped_through_its_pidfd() {
        let s = Scratch::new();
        let mut b = Bystander::spawn(|_| {});
        let start = start_time(b.pid()).expect("start");
        s.dead_run("r1", &[(b.pid(), start)]);
        let dry = reap(&s.1, None, true).expect("dry run");
        assert_eq!(dry.pids, [b.pid()]);
        assert!(b.alive(), "a dry run killed it");
        let r = reap(&s.1, None, false).expect("reap");
        assert_eq!(r.pids, [b.pid()]);
        assert!(matches!(b.0.wait().map(|s| std::os::unix::process::ExitStatusExt::signal(&s)), Ok(Some(9))));
    }

    #[test]
    fn remove_worker_forgets_only_the_entry_with_that_start_time() {
        let s = Scratch::new();
        let f = RunFile::create(&s.1, "inst", "run-3").expect("create");
        f.add_worker(42, 7);
        f.add_worker(42, 9);
        f.remove_worker(42, 7);
        let rec: RunRecord = serde_json::from_slice(&std::fs::read(f.path()).expect("read")).expect("json");
        assert_eq!(rec.workers, [(42, 9)]);
    }

    #[test]
    fn a_run_dir_that_fails_the_ownership_check_is_refused_not_reaped() {
        let s = Scratch::new();
        let mut b = Bystander::spawn(|_| {});
        let start = start_time(b.pid()).expect("start");
        s.dead_run("r1", &[(b.pid(), start)]);
        // A symlink to a run dir (anyone could plant one in a shared temp dir).
        let link = s.0.path().join("link");
        std::os::unix::fs::symlink(&s.1, &link).expect("symlink");
        let e = reap(&link, None, false).expect_err("a symlinked run dir");
        assert!(e.to_string().contains("link") && e.to_string().contains("symlink"), "{e}");
        assert!(RunFile::create(&link, "x", "r2").is_err(), "a run file was created through a symlink");
        assert!(b.alive(), "reaped through a symlinked run dir");
        if !is_root() {
            eprintln!("not root: cannot plant a run dir owned by another user; only the symlink case ran");
            return;
        }
        std::os::unix::fs::chown(&s.1, Some(65534), Some(65534)).expect("chown");
        let e = reap(&s.1, None, false).expect_err("another user's run dir");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert!(b.alive(), "reaped what another user's run dir listed");
    }

    #[test]
    fn a_run_file_that_is_a_symlink_or_another_users_is_skipped() {
        let s = Scratch::new();
        let mut b = Bystander::spawn(|_| {});
        let start = start_time(b.pid()).expect("start");
        let planted = s.dead_run("elsewhere", &[(b.pid(), start)]);
        let other = s.0.path().join("planted.json");
        std::fs::rename(&planted, &other).expect("move");
        std::os::unix::fs::symlink(&other, &planted).expect("symlink");
        let r = reap(&s.1, None, false).expect("reap");
        assert!(r.pids.is_empty() && r.runs.is_empty(), "{r:?}");
        assert!(b.alive(), "reaped through a symlinked run file");
        if !is_root() {
            eprintln!("not root: cannot plant a run file owned by another user; only the symlink case ran");
            return;
        }
        let planted = s.dead_run("theirs", &[(b.pid(), start)]);
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).expect("chown");
        let r = reap(&s.1, None, false).expect("reap");
        assert!(r.pids.is_empty() && r.runs.is_empty(), "{r:?}");
        assert!(b.alive(), "reaped what another user's run file listed");
        assert!(planted.exists(), "removed another user's run file");
    }

    #[test]
    fn a_process_of_another_user_carrying_the_run_id_is_not_reaped() {
        if !is_root() {
            eprintln!("not root: cannot start a process as another user; skipped");
            return;
        }
        let s = Scratch::new();
        s.dead_run("marked", &[]);
        let mut theirs = Bystander::spawn(|c| {
            std::os::unix::process::CommandExt::uid(c.env("SNAKEPIT_RUN_ID", "marked"), 65534);
        });
        let mut mine = Bystander::spawn(|c| {
            c.env("SNAKEPIT_RUN_ID", "marked");
        });
        // `spawn` may return before the new image's environment is readable (vfork).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for p in [theirs.pid(), mine.pid()] {
            while !environ_has(p, b"SNAKEPIT_RUN_ID=marked") {
                assert!(std::time::Instant::now() < deadline, "no marker in {p}'s environment");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let r = reap(&s.1, None, false).expect("reap");
        assert_eq!(r.pids, [mine.pid()], "{r:?}");
        assert!(theirs.alive(), "killed another user's process that carried the run id");
        assert!(matches!(
            mine.0.wait().map(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
            Ok(Some(9))
        ));
    }

    #[test]
    fn a_dead_runs_socket_dirs_are_removed_only_if_they_pass_the_check() {
        let s = Scratch::new();
        let ours = snakepit_fs::ensure_private_dir(&s.0.path().join("g1")).expect("dir");
        std::fs::write(ours.join("w.sock"), b"").expect("file");
        let open = s.0.path().join("g2");
        std::fs::create_dir(&open).expect("dir");
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let path = s.dead_run("dirs", &[]);
        let mut rec: RunRecord = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        rec.dirs = vec![ours.clone(), open.clone()];
        std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write");
        let r = reap(&s.1, None, false).expect("reap");
        assert_eq!(r.dirs, std::slice::from_ref(&ours));
        assert!(!ours.exists());
        assert!(open.exists(), "removed a directory that failed the check");
    }

    #[test]
    fn start_time_of_self_is_known() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX - 1), None);
    }
}
