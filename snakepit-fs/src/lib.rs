//! # snakepit-fs
//!
//! The one place where snakepit decides whether a directory or file on disk may be trusted:
//! the bridge cache (`snakepit-adapters`), the gRPC socket root (`snakepit-transport-grpc`) and
//! the run registry (`snakepit-supervisor`) all live in places other users may reach (a shared
//! `$TMPDIR` at worst), and each of them would run, serve or kill on the strength of what it
//! finds there.
//!
//! The rule, checked with `lstat` (never following a symlink at the last step):
//!
//! * a directory snakepit uses is a real directory (not a symlink), owned by the effective uid,
//!   with no group or other permission bits ([`check_private_dir`]);
//! * each of its ancestors (after symlinks in them are resolved) is owned by root or the
//!   effective uid and is not writable by group or others unless it is sticky, like `/tmp`;
//! * directories are created with mode 0700 ([`ensure_private_dir`], [`private_tempdir`]) and
//!   never `chmod`ed afterwards; files are created `O_CREAT|O_EXCL|O_NOFOLLOW` with mode 0600
//!   and renamed into place ([`write_private_file`]); files are read through `O_NOFOLLOW` and
//!   checked on the open descriptor ([`read_own_file`]).
//!
//! Its own crate so that every crate that needs it can depend on it without an upward edge: it
//! depends on `nix` only.

#![forbid(unsafe_code)]

use std::fs::{DirBuilder, File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A path snakepit refused to trust, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The refused path.
    pub path: PathBuf,
    /// Why it was refused.
    pub reason: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refusing {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for Refused {}

impl From<Refused> for std::io::Error {
    fn from(r: Refused) -> Self {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, r.to_string())
    }
}

fn refused(path: &Path, reason: impl Into<String>) -> Refused {
    Refused { path: path.to_path_buf(), reason: reason.into() }
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Checks that `path` is a real directory (not a symlink), owned by the effective uid, with no
/// group or other permission bits, under [safe ancestors](self). Returns the path with its
/// parent's symlinks resolved: use that one afterwards, so a symlink swapped in an ancestor
/// later cannot redirect the caller.
pub fn check_private_dir(path: &Path) -> Result<PathBuf, Refused> {
    let path = resolve_parent(path)?;
    let meta = lstat(&path)?;
    if meta.file_type().is_symlink() {
        return Err(refused(&path, "it is a symlink"));
    }
    if !meta.is_dir() {
        return Err(refused(&path, "it is not a directory"));
    }
    if meta.uid() != euid() {
        return Err(refused(&path, format!("it is owned by uid {}, not {}", meta.uid(), euid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refused(
            &path,
            format!("its mode {:o} gives group or others access", meta.mode() & 0o7777),
        ));
    }
    Ok(path)
}

/// Checks that `path` is a real directory (not a symlink) owned by root or the effective uid,
/// not writable by group or others unless sticky, under safe ancestors: a directory
/// snakepit may create private directories in (a caller's socket root, `/tmp`). Returns the
/// resolved path, as [`check_private_dir`] does.
pub fn check_parent_dir(path: &Path) -> Result<PathBuf, Refused> {
    let path = resolve_parent(path)?;
    let meta = lstat(&path)?;
    if meta.file_type().is_symlink() {
        return Err(refused(&path, "it is a symlink"));
    }
    if !meta.is_dir() {
        return Err(refused(&path, "it is not a directory"));
    }
    check_ancestor(&path, &meta)?;
    Ok(path)
}

/// Creates `path` (and missing parents) with mode 0700 if it does not exist, then
/// [checks](check_private_dir) it. An existing directory is never `chmod`ed: one that fails the
/// check is refused.
pub fn ensure_private_dir(path: &Path) -> Result<PathBuf, Refused> {
    if std::fs::symlink_metadata(path).is_err() {
        // Nothing there yet: create it only under a safe place.
        if let Some(existing) = path.ancestors().skip(1).find(|a| !a.as_os_str().is_empty() && a.exists()) {
            check_parent_dir(existing)?;
        }
    }
    if let Err(e) = DirBuilder::new().recursive(true).mode(0o700).create(path) {
        // `recursive` also fails when a symlink or file sits there: say what the check says.
        if std::fs::symlink_metadata(path).is_err() {
            return Err(refused(path, format!("cannot create it: {e}")));
        }
    }
    check_private_dir(path)
}

/// A fresh private (0700) directory `<parent>/<prefix>XXXXXX` made by `mkdtemp(3)`, after
/// checking that `parent` is a [safe place](check_parent_dir) for it.
pub fn private_tempdir(parent: &Path, prefix: &str) -> Result<PathBuf, Refused> {
    let parent = check_parent_dir(parent)?;
    let template = parent.join(format!("{prefix}XXXXXX"));
    let dir =
        nix::unistd::mkdtemp(&template).map_err(|e| refused(&template, format!("mkdtemp failed: {e}")))?;
    check_private_dir(&dir)
}

/// Creates the directory `path` (its parent must exist) with mode 0700; fails if anything
/// already exists there. Then [checks](check_private_dir) it.
pub fn create_private_dir(path: &Path) -> Result<PathBuf, Refused> {
    DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| refused(path, format!("cannot create it: {e}")))?;
    check_private_dir(path)
}

/// Writes `bytes` to `dir/name` atomically: a fresh temporary file in `dir` created
/// `O_CREAT|O_EXCL|O_NOFOLLOW` with mode 0600, then renamed over `name`. `dir` should have
/// passed [`check_private_dir`].
pub fn write_private_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut n = 0u32;
    let (tmp, mut f) = loop {
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match create_new(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 64 => n += 1,
            Err(e) => return Err(e),
        }
    };
    let written = f.write_all(bytes).and_then(|()| f.sync_data());
    drop(f);
    match written.and_then(|()| std::fs::rename(&tmp, dir.join(name))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Creates a new file at `path`: `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(nix::libc::O_NOFOLLOW).open(path)
}

/// Reads `path` if it is a regular file (not a symlink: opened `O_NOFOLLOW`) owned by the
/// effective uid, checked on the open descriptor. Refusals say why; I/O errors are refusals
/// too.
pub fn read_own_file(path: &Path) -> Result<Vec<u8>, Refused> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| refused(path, format!("cannot open it: {e}")))?;
    let meta = f.metadata().map_err(|e| refused(path, format!("cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(refused(path, "it is not a regular file"));
    }
    if meta.uid() != euid() {
        return Err(refused(path, format!("it is owned by uid {}, not {}", meta.uid(), euid())));
    }
    let mut out = Vec::with_capacity(meta.len().min(1 << 20) as usize);
    f.read_to_end(&mut out).map_err(|e| refused(path, format!("cannot read it: {e}")))?;
    Ok(out)
}

fn lstat(path: &Path) -> Result<Metadata, Refused> {
    std::fs::symlink_metadata(path).map_err(|e| refused(path, format!("cannot stat it: {e}")))
}

/// `path` made absolute with its parent's symlinks resolved, after checking every ancestor.
fn resolve_parent(path: &Path) -> Result<PathBuf, Refused> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| refused(path, format!("no current directory: {e}")))?.join(path)
    };
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(refused(&abs, "it has no parent directory"));
    };
    let parent = parent.canonicalize().map_err(|e| refused(parent, format!("cannot resolve it: {e}")))?;
    for dir in parent.ancestors() {
        check_ancestor(dir, &lstat(dir)?)?;
    }
    Ok(parent.join(name))
}

/// An ancestor is owned by root or the effective uid and is not writable by group or others
/// unless sticky.
fn check_ancestor(dir: &Path, meta: &Metadata) -> Result<(), Refused> {
    if meta.uid() != 0 && meta.uid() != euid() {
        return Err(refused(dir, format!("it is owned by uid {}, neither root nor {}", meta.uid(), euid())));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(refused(
            dir,
            format!("its mode {:o} lets group or others write to it and it is not sticky", mode & 0o7777),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_private_dir_passes_and_a_symlink_to_it_does_not() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = ensure_private_dir(&t.path().join("a/b")).expect("private dir");
        assert_eq!(std::fs::metadata(&d).expect("stat").mode() & 0o777, 0o700);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).expect("symlink");
        let e = check_private_dir(&link).expect_err("a symlink");
        assert!(e.reason.contains("symlink"), "{e}");
        let e = ensure_private_dir(&link).expect_err("a symlink");
        assert!(e.reason.contains("symlink"), "{e}");
    }

    #[test]
    fn an_existing_open_dir_is_refused_and_left_as_it_was() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("open");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = ensure_private_dir(&d).expect_err("group/other bits");
        assert!(e.reason.contains("755"), "{e}");
        assert_eq!(std::fs::metadata(&d).expect("stat").mode() & 0o777, 0o755, "chmodded");
    }

    #[test]
    fn a_group_writable_ancestor_is_refused_but_a_sticky_one_is_not() {
        let t = tempfile::tempdir().expect("tempdir");
        let open = t.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = ensure_private_dir(&open.join("x")).expect_err("writable ancestor");
        assert_eq!(e.path, open.canonicalize().expect("canon"));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        ensure_private_dir(&open.join("y")).expect("sticky ancestor");
        let fresh = private_tempdir(&open, "p-").expect("mkdtemp");
        assert!(fresh.starts_with(open.canonicalize().expect("canon")));
    }

    #[test]
    fn private_files_are_0600_replace_atomically_and_symlinks_are_not_read() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = ensure_private_dir(&t.path().join("d")).expect("dir");
        write_private_file(&d, "f.json", b"one").expect("write");
        write_private_file(&d, "f.json", b"two").expect("rewrite");
        let f = d.join("f.json");
        assert_eq!(std::fs::metadata(&f).expect("stat").mode() & 0o777, 0o600);
        assert_eq!(read_own_file(&f).expect("read"), b"two");
        let link = d.join("l.json");
        std::os::unix::fs::symlink(&f, &link).expect("symlink");
        read_own_file(&link).expect_err("symlink");
        assert_eq!(std::fs::read_dir(&d).expect("ls").count(), 2, "a temporary file was left");
    }
}
