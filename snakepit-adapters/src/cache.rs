//! Embedded bridge sources written out once to a private cache directory, shared by the
//! Python and Node adapters (the same directory rules for both).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A set of embedded files that a worker needs on disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bundle {
    /// The cache directory is `<root>/<prefix>-<hash>/`.
    pub(crate) prefix: &'static str,
    /// The files go under `<dir>/<subdir>/` (`snakepit_bridge`, `node_modules/snakepit-bridge`).
    pub(crate) subdir: &'static str,
    /// `(path under subdir, text)`.
    pub(crate) files: &'static [(&'static str, &'static str)],
    /// A file (under subdir) whose presence says a copy is complete (written last is not
    /// needed: copies are renamed into place whole).
    pub(crate) marker: &'static str,
}

/// The directory bundles are cached under: `$XDG_CACHE_HOME/snakepit`, else
/// `~/.cache/snakepit`, else `$TMPDIR/snakepit-<euid>`.
pub(crate) fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("snakepit");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache").join("snakepit");
    }
    std::env::temp_dir().join(format!("snakepit-{}", snakepit_fs::euid()))
}

impl Bundle {
    /// A stable hash (FNV-1a) of the embedded sources, naming their cache directory.
    pub(crate) fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, text) in self.files {
            for b in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    fn complete(&self, dir: &Path) -> bool {
        dir.join(self.subdir).join(self.marker).is_file()
    }

    /// A usable copy under `root`: the existing `<prefix>-<hash>/` if it passes
    /// `snakepit_fs::check_private_dir`, else a fresh one written there. `root` (created 0700
    /// if missing) is the copy's parent and is checked as one (`snakepit_fs::check_parent_dir`:
    /// a real directory owned by root or the effective uid, not writable by others unless
    /// sticky), so a `~/.cache/snakepit` an older version created 0755 still serves. Refuses
    /// (without touching them) a `root` or copy that is a symlink or another user's, a `root`
    /// others may write to, or a copy open to others.
    pub(crate) fn install(&self, root: &Path) -> Result<PathBuf, snakepit_fs::Refused> {
        if std::fs::symlink_metadata(root).is_err() {
            snakepit_fs::ensure_private_dir(root)?;
        }
        let root = snakepit_fs::check_parent_dir(root)?;
        let dir = root.join(format!("{}-{:016x}", self.prefix, self.hash()));
        if std::fs::symlink_metadata(&dir).is_ok() {
            let dir = snakepit_fs::check_private_dir(&dir)?;
            if self.complete(&dir) {
                return Ok(dir);
            }
        }
        // Write into a fresh private directory, then rename it into place atomically, so a
        // concurrent host never sees half a package.
        let tmp = snakepit_fs::private_tempdir(&root, ".tmp-")?;
        let io = |e: std::io::Error| snakepit_fs::Refused {
            path: tmp.clone(),
            reason: format!("cannot write it: {e}"),
        };
        self.write(&tmp).map_err(io)?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => snakepit_fs::check_private_dir(&dir),
            Err(_) if snakepit_fs::check_private_dir(&dir).is_ok() && self.complete(&dir) => {
                // A concurrent host put its copy there first.
                let _ = std::fs::remove_dir_all(&tmp);
                snakepit_fs::check_private_dir(&dir)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(snakepit_fs::Refused {
                    path: dir,
                    reason: format!("cannot move the bridge into place: {e}"),
                })
            }
        }
    }

    /// Writes the files under `dir` (a fresh private directory): directories 0700, files
    /// created `O_EXCL|O_NOFOLLOW` with mode 0600.
    fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::DirBuilderExt;
        for (name, text) in self.files {
            let path = dir.join(self.subdir).join(name);
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
            }
            snakepit_fs::create_new(&path)?.write_all(text.as_bytes())?;
        }
        Ok(())
    }

    /// A fresh private copy in a new `mkdtemp` directory under `$TMPDIR`, for when the cache
    /// directory was refused.
    fn fresh(&self) -> Result<PathBuf, snakepit_fs::Refused> {
        let dir = snakepit_fs::private_tempdir(&std::env::temp_dir(), "snakepit-bridge-")?;
        self.write(&dir).map_err(|e| snakepit_fs::Refused {
            path: dir.clone(),
            reason: format!("cannot write it: {e}"),
        })?;
        Ok(dir)
    }

    /// The bundle's directory: the cached copy (see [`install`](Self::install)), or a fresh
    /// private one with a warning naming the refused path; remembered in `cell` once known. A
    /// failed write-out is not remembered: the next call tries again.
    pub(crate) fn dir(&self, cell: &OnceLock<PathBuf>) -> Result<PathBuf, crate::Error> {
        if let Some(d) = cell.get() {
            return Ok(d.clone());
        }
        // Concurrent first calls may both write the sources out; `install` lets the second one
        // find the first one's copy.
        let dir = match self.install(&cache_root()) {
            Ok(d) => d,
            Err(refused) => {
                let fresh = self.fresh().map_err(|e| crate::Error::Bridge(e.into()))?;
                tracing::warn!(
                    "bridge cache: {refused}; using the fresh private directory {} instead",
                    fresh.display()
                );
                fresh
            }
        };
        Ok(cell.get_or_init(|| dir).clone())
    }
}
