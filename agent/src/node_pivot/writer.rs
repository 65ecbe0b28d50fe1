//! Atomic file replacement for `registries.yaml`.
//!
//! Temp file in the same directory, write, fsync, rename over the target, fsync
//! the directory. Before replacing, the previous content is saved (the same
//! atomic way) as `<name>.bak`. An identical render writes nothing. On any
//! failure (disk full, read-only file system, permission) the target is left as
//! it was and the error says which step failed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Same bytes already there: nothing touched.
    Unchanged,
    /// New content in place (previous one, if any, in the backup).
    Written,
    /// The file was removed (previous content in the backup).
    Removed,
}

/// A failed step; the target file is intact.
#[derive(Debug, thiserror::Error)]
#[error("{step} {path}: {source}")]
pub struct WriteError {
    /// Which step failed: read, backup, create_temp, write, fsync, rename, fsync_dir, remove.
    pub step: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl WriteError {
    /// Metric label: the cause, not the step.
    pub fn label(&self) -> &'static str {
        match self.source.kind() {
            ErrorKind::StorageFull => "disk_full",
            ErrorKind::ReadOnlyFilesystem => "read_only",
            ErrorKind::PermissionDenied => "permission",
            ErrorKind::NotFound => "not_found",
            _ => "io",
        }
    }
}

fn err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// `<path>.bak`: the content before the last change.
pub fn backup_path(path: &Path) -> PathBuf {
    sibling(path, ".bak")
}

pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Current content, `None` if the file does not exist.
pub fn read_current(path: &Path) -> Result<Option<Vec<u8>>, WriteError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err("read", path)(e)),
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Replace `path` with `bytes` atomically (no backup). The temp file is removed on failure.
pub fn replace_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let dir = parent(path);
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{seq}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(err("create_temp", &tmp))?;
        f.write_all(bytes).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(err("rename", path))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync_dir", dir))
}

/// Write `bytes` to `path` unless identical; keep the previous content in `<path>.bak`.
pub fn write_with_backup(path: &Path, bytes: &[u8]) -> Result<WriteOutcome, WriteError> {
    let current = read_current(path)?;
    if current.as_deref() == Some(bytes) {
        return Ok(WriteOutcome::Unchanged);
    }
    if let Some(old) = &current {
        replace_atomic(&backup_path(path), old).map_err(|mut e| {
            e.step = "backup";
            e
        })?;
    }
    replace_atomic(path, bytes)?;
    Ok(WriteOutcome::Written)
}

/// Remove `path` (after backing it up); absent already -> Unchanged.
pub fn remove_with_backup(path: &Path) -> Result<WriteOutcome, WriteError> {
    let Some(old) = read_current(path)? else {
        return Ok(WriteOutcome::Unchanged);
    };
    replace_atomic(&backup_path(path), &old).map_err(|mut e| {
        e.step = "backup";
        e
    })?;
    fs::remove_file(path).map_err(err("remove", path))?;
    sync_dir(parent(path))?;
    Ok(WriteOutcome::Removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_unchanged_backup_remove() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("registries.yaml");
        assert_eq!(
            write_with_backup(&p, b"one").unwrap(),
            WriteOutcome::Written
        );
        assert!(!backup_path(&p).exists());
        assert_eq!(
            write_with_backup(&p, b"one").unwrap(),
            WriteOutcome::Unchanged
        );
        assert_eq!(
            write_with_backup(&p, b"two").unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read(backup_path(&p)).unwrap(), b"one");
        assert_eq!(remove_with_backup(&p).unwrap(), WriteOutcome::Removed);
        assert!(!p.exists());
        assert_eq!(fs::read(backup_path(&p)).unwrap(), b"two");
        assert_eq!(remove_with_backup(&p).unwrap(), WriteOutcome::Unchanged);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["registries.yaml.bak".to_string()]);
    }

    #[test]
    fn missing_directory_fails_with_label() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope/registries.yaml");
        let e = write_with_backup(&p, b"x").unwrap_err();
        assert_eq!(e.step, "create_temp");
        assert_eq!(e.label(), "not_found");
    }
}
