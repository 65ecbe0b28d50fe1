//! Node registry pivot (DaemonSet mode, seed 002 step 04).
//!
//! Every node runs `continuum-agent node-pivot`. It watches the cutover status
//! ConfigMap (default `self-sovereign-cutover-status`, key `registriesYamlActive`)
//! and keeps `/etc/rancher/k3s/registries.yaml` at the version it names:
//!
//! - `v2`: rendered from the declared mirror map ([`render`]) and written
//!   atomically ([`writer`]).
//! - `v1`: the declared v1 file (`--v1-file`) if given, else the pre-pivot
//!   snapshot `registries.yaml.continuum-v1`, refreshed on every v1 -> v2 flip
//!   (an empty snapshot means "there was no file": v1 removes it).
//! - empty or missing key: the cutover has not started; nothing is touched.
//! - anything else: an error is reported and nothing is written.
//!
//! `registries.yaml.bak` always holds the content before the last change.
//! k3s reads the file only at start, so every change sets the node annotation
//! `continuum.openova.io/registries-yaml-restart-needed: "true"` (cleared by
//! whoever restarts k3s; the optional locked k3s restart is not implemented).

pub mod cmd;
pub mod controller;
pub mod render;
pub mod writer;

use std::path::{Path, PathBuf};

use writer::{WriteError, WriteOutcome};

/// Node annotation: the version this node's file is at (`v1`, `v2`, `error`).
pub const ANNOTATION_VERSION: &str = "continuum.openova.io/registries-yaml";
/// Node annotation: `"true"` once the file changed since the agent started reporting.
pub const ANNOTATION_RESTART_NEEDED: &str = "continuum.openova.io/registries-yaml-restart-needed";
/// Node annotation: last error (empty when fine).
pub const ANNOTATION_ERROR: &str = "continuum.openova.io/registries-yaml-error";

/// Default status ConfigMap (seed 002: bp-self-sovereign-cutover chart).
pub const DEFAULT_STATUS_CONFIGMAP: &str = "self-sovereign-cutover-status";
pub const DEFAULT_STATUS_KEY: &str = "registriesYamlActive";

/// The version the status key asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    V1,
    V2,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// Pure: what the key's value asks for. `Ok(None)` = not started (touch nothing).
pub fn decide(value: Option<&str>) -> Result<Option<Target>, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some("v1") => Ok(Some(Target::V1)),
        Some("v2") => Ok(Some(Target::V2)),
        Some(other) => Err(format!(
            "unknown registriesYamlActive value {other:?} (expected v1 or v2)"
        )),
    }
}

/// Where the files live.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `/etc/rancher/k3s/registries.yaml`.
    pub target: PathBuf,
    /// Declared v1 content; `None`: use the pre-pivot snapshot.
    pub v1_file: Option<PathBuf>,
}

impl Paths {
    pub fn snapshot(&self) -> PathBuf {
        writer::sibling(&self.target, ".continuum-v1")
    }
}

/// Why a pivot step failed. `label()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum PivotError {
    #[error("{0}")]
    UnknownValue(String),
    #[error("render: {0}")]
    Render(#[from] render::RenderError),
    #[error("write: {0}")]
    Write(#[from] WriteError),
    #[error("reading {path}: {source}")]
    Input {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no v1 known: no --v1-file and no pre-pivot snapshot {0}")]
    NoV1(PathBuf),
}

impl PivotError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownValue(_) => "unknown_value",
            Self::Render(e) => e.label(),
            Self::Write(e) => e.label(),
            Self::Input { .. } => "input",
            Self::NoV1(_) => "no_v1",
        }
    }
}

fn read_input(path: &Path) -> Result<Vec<u8>, PivotError> {
    std::fs::read(path).map_err(|source| PivotError::Input {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a mounted Secret directory (one file per key; `..data` links skipped).
pub fn read_secret_dir(
    dir: Option<&Path>,
) -> Result<std::collections::BTreeMap<String, String>, PivotError> {
    let mut out = std::collections::BTreeMap::new();
    let Some(dir) = dir else { return Ok(out) };
    let input = |source| PivotError::Input {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(input)? {
        let entry = entry.map_err(input)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let p = entry.path();
        if p.is_file() {
            let v = read_input(&p)?;
            out.insert(name, String::from_utf8_lossy(&v).into_owned());
        }
    }
    Ok(out)
}

/// Bring the file to `target`. `v2` is the rendered v2 content (rendered by the
/// caller, so a bad map fails before anything is touched).
pub fn apply(paths: &Paths, target: Target, v2: &str) -> Result<WriteOutcome, PivotError> {
    match target {
        Target::V2 => {
            if paths.v1_file.is_none() {
                // Whatever is there and is not our own render is the current v1
                // (refreshed on every v1 -> v2 flip, so edits made while at v1 survive).
                let current = writer::read_current(&paths.target)?;
                let ours = current
                    .as_deref()
                    .is_some_and(|c| c.starts_with(render::HEADER.as_bytes()));
                if !ours {
                    let original = current.unwrap_or_default();
                    let snap = paths.snapshot();
                    if writer::read_current(&snap)?.as_deref() != Some(original.as_slice()) {
                        writer::replace_atomic(&snap, &original)?;
                    }
                }
            }
            Ok(writer::write_with_backup(&paths.target, v2.as_bytes())?)
        }
        Target::V1 => {
            let content = match &paths.v1_file {
                Some(f) => read_input(f)?,
                None => {
                    let snap = paths.snapshot();
                    match writer::read_current(&snap)? {
                        Some(c) => c,
                        None => {
                            // Never pivoted on this node: v1 is whatever is there.
                            let current = writer::read_current(&paths.target)?;
                            if current
                                .as_deref()
                                .is_some_and(|c| c.starts_with(render::HEADER.as_bytes()))
                            {
                                return Err(PivotError::NoV1(snap));
                            }
                            return Ok(WriteOutcome::Unchanged);
                        }
                    }
                }
            };
            if content.is_empty() {
                Ok(writer::remove_with_backup(&paths.target)?)
            } else {
                Ok(writer::write_with_backup(&paths.target, &content)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_table() {
        assert_eq!(decide(None), Ok(None));
        assert_eq!(decide(Some("")), Ok(None));
        assert_eq!(decide(Some("v1")), Ok(Some(Target::V1)));
        assert_eq!(decide(Some(" v2\n")), Ok(Some(Target::V2)));
        assert!(decide(Some("v3")).is_err());
        assert!(decide(Some("V2")).is_err());
    }

    #[test]
    fn snapshot_roundtrip_and_absent_original() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths {
            target: d.path().join("registries.yaml"),
            v1_file: None,
        };
        let v2 = format!("{}mirrors: {{}}\n", render::HEADER);
        // Never pivoted, no file: v1 is a no-op.
        assert_eq!(
            apply(&paths, Target::V1, &v2).unwrap(),
            WriteOutcome::Unchanged
        );
        // Original file absent -> v2 written -> v1 removes it again.
        assert_eq!(
            apply(&paths, Target::V2, &v2).unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(
            apply(&paths, Target::V2, &v2).unwrap(),
            WriteOutcome::Unchanged
        );
        assert_eq!(
            apply(&paths, Target::V1, &v2).unwrap(),
            WriteOutcome::Removed
        );
        assert!(!paths.target.exists());
        // Original content kept across flips.
        let d2 = tempfile::tempdir().unwrap();
        let paths = Paths {
            target: d2.path().join("registries.yaml"),
            v1_file: None,
        };
        std::fs::write(
            &paths.target,
            b"mirrors: {docker.io: {endpoint: [https://harbor.openova.io]}}\n",
        )
        .unwrap();
        apply(&paths, Target::V2, &v2).unwrap();
        apply(&paths, Target::V1, &v2).unwrap();
        apply(&paths, Target::V2, &v2).unwrap();
        apply(&paths, Target::V1, &v2).unwrap();
        assert_eq!(
            std::fs::read(&paths.target).unwrap(),
            b"mirrors: {docker.io: {endpoint: [https://harbor.openova.io]}}\n"
        );
        // An edit made while at v1 is the v1 restored after the next round trip.
        std::fs::write(&paths.target, b"mirrors: {}\n").unwrap();
        apply(&paths, Target::V2, &v2).unwrap();
        assert_eq!(std::fs::read(&paths.target).unwrap(), v2.as_bytes());
        apply(&paths, Target::V1, &v2).unwrap();
        assert_eq!(std::fs::read(&paths.target).unwrap(), b"mirrors: {}\n");
    }

    #[test]
    fn declared_v1_file_wins_and_lost_snapshot_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let declared = d.path().join("v1.yaml");
        std::fs::write(&declared, b"mirrors: {}\n").unwrap();
        let paths = Paths {
            target: d.path().join("registries.yaml"),
            v1_file: Some(declared),
        };
        let v2 = format!("{}mirrors: {{}}\n", render::HEADER);
        std::fs::write(&paths.target, b"something else\n").unwrap();
        apply(&paths, Target::V2, &v2).unwrap();
        assert!(!paths.snapshot().exists());
        apply(&paths, Target::V1, &v2).unwrap();
        assert_eq!(std::fs::read(&paths.target).unwrap(), b"mirrors: {}\n");
        // Our v2 on disk, no declared v1 and no snapshot: refuse rather than guess.
        let paths = Paths {
            target: paths.target.clone(),
            v1_file: None,
        };
        std::fs::write(&paths.target, v2.as_bytes()).unwrap();
        let e = apply(&paths, Target::V1, &v2).unwrap_err();
        assert_eq!(e.label(), "no_v1");
        assert_eq!(std::fs::read(&paths.target).unwrap(), v2.as_bytes());
    }
}
