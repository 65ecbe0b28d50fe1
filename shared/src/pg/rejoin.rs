//! Invariant 5 (no silent return): what a former primary's data directory
//! gets before its server starts again. Run locally by the agent next to the
//! data directory, with the server stopped.
//!
//! - [`fence_offline`]: start fenced (read-only default, no possible
//!   synchronous acknowledgement);
//! - [`follow_offline`]: start in recovery as a standby of the new primary:
//!   nothing can write at all. If it was fenced cleanly (no WAL past the new
//!   primary's fork point, e.g. a planned switchover) it simply follows the
//!   new timeline, no rebuild needed. If its WAL diverged it cannot stream and
//!   stays a read-only standby; once it has fetched the new timeline's history
//!   a further restart refuses to start at all ("requested timeline is not a
//!   child of this server's history") — still fail-safe, but rebuild it;
//! - [`rewind_as_standby`] / [`basebackup_as_standby`]: rebuild it onto the
//!   new primary's timeline. pg_rewind is a no-op when nothing diverged, so
//!   always rewinding is the simple rule; base backup is the fallback.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::decide;
use super::PgError;

const AUTO_CONF: &str = "postgresql.auto.conf";

fn cfg_err(path: &Path) -> impl FnOnce(std::io::Error) -> PgError + '_ {
    move |source| PgError::ConfigFile {
        path: path.display().to_string(),
        source,
    }
}

/// Rewrite postgresql.auto.conf in place (keeps the file's owner).
fn edit_auto_conf(data_dir: &Path, set: &[(&str, String)], remove: &[&str]) -> Result<(), PgError> {
    let path = data_dir.join(AUTO_CONF);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(cfg_err(&path)(e)),
    };
    let out = decide::rewrite_auto_conf(&text, set, remove);
    std::fs::write(&path, out).map_err(cfg_err(&path))
}

/// Make the stopped server start fenced.
pub fn fence_offline(data_dir: &Path) -> Result<(), PgError> {
    edit_auto_conf(data_dir, &decide::fence_settings(), &[])?;
    tracing::info!(action = "fence_offline", reason = "former primary", data_dir = %data_dir.display(), "fence written to config");
    Ok(())
}

/// Remove the fence settings from a stopped server's config.
pub fn unfence_offline(data_dir: &Path) -> Result<(), PgError> {
    let keys: Vec<&str> = decide::fence_settings().iter().map(|(k, _)| *k).collect();
    edit_auto_conf(data_dir, &[], &keys)
}

/// Make the stopped server start as a standby streaming from `primary_conninfo`
/// (which should carry `application_name`). Also fences it, so that should
/// someone remove standby.signal by hand it still does not acknowledge writes.
pub fn follow_offline(data_dir: &Path, primary_conninfo: &str) -> Result<(), PgError> {
    let mut set = decide::fence_settings().to_vec();
    set.push(("primary_conninfo", primary_conninfo.to_string()));
    edit_auto_conf(data_dir, &set, &[])?;
    let signal = data_dir.join("standby.signal");
    std::fs::write(&signal, b"").map_err(cfg_err(&signal))?;
    tracing::info!(action = "follow_offline", reason = "former primary rejoins as replica", data_dir = %data_dir.display(), "standby.signal written");
    Ok(())
}

/// How to run PostgreSQL's tools against a data directory.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Directory with pg_rewind, pg_basebackup (e.g. /usr/lib/postgresql/15/bin).
    pub bin_dir: PathBuf,
    /// Run as this uid/gid (the data directory's owner) when set.
    pub run_as: Option<(u32, u32)>,
    /// Bound on each tool run.
    pub timeout: Duration,
}

impl Tools {
    /// Runs one tool (with `LC_ALL=C`, so its output parses) and returns
    /// its output; a failure carries the output.
    pub async fn run(&self, tool: &'static str, args: &[String]) -> Result<String, PgError> {
        let mut cmd = tokio::process::Command::new(self.bin_dir.join(tool));
        cmd.args(args).env("LC_ALL", "C").kill_on_drop(true);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = tokio::time::timeout(self.timeout, cmd.output())
            .await
            .map_err(|_| PgError::Timeout {
                what: tool,
                after: self.timeout,
            })?
            .map_err(|e| PgError::Tool {
                tool,
                detail: e.to_string(),
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(PgError::Tool { tool, detail: text });
        }
        Ok(text)
    }
}

/// How a rebuild went.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub method: decide::RejoinAction,
    pub duration: Duration,
    pub output: String,
}

/// Rewind the stopped former primary onto the new primary's timeline and
/// configure it to follow it (needs wal_log_hints or data checksums; pg_rewind
/// runs crash recovery first if the server was killed). pg_rewind copies the
/// source's configuration files, so the caller re-applies any local settings.
pub async fn rewind_as_standby(
    tools: &Tools,
    data_dir: &Path,
    source_conninfo: &str,
    primary_conninfo: &str,
) -> Result<RebuildReport, PgError> {
    let t0 = Instant::now();
    // A server killed while standby.signal was present cannot be crash-
    // recovered in single-user mode (which pg_rewind does first).
    for signal in ["standby.signal", "recovery.signal"] {
        let path = data_dir.join(signal);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cfg_err(&path)(e)),
        }
    }
    // pg_rewind reads the source's timeline from its control file, which a
    // just-promoted server updates only at its next checkpoint.
    let source = super::backend::connect(source_conninfo).await?;
    source
        .batch_execute("CHECKPOINT")
        .await
        .map_err(|source| PgError::Query {
            what: "checkpoint on rewind source",
            source,
        })?;
    drop(source);
    let confs = save_confs(data_dir)?;
    let output = tools
        .run(
            "pg_rewind",
            &[
                format!("--target-pgdata={}", data_dir.display()),
                format!("--source-server={source_conninfo}"),
            ],
        )
        .await?;
    restore_confs(&confs)?;
    unfence_offline(data_dir)?;
    write_standby(data_dir, primary_conninfo)?;
    let report = RebuildReport {
        method: decide::RejoinAction::RewindAsStandby,
        duration: t0.elapsed(),
        output,
    };
    tracing::info!(
        action = "rewind_as_standby",
        reason = "former primary rejoins",
        ms = report.duration.as_secs_f64() * 1e3,
        "rewound"
    );
    Ok(report)
}

/// Replace the stopped server's data directory with a fresh base backup of
/// the new primary, configured to follow it. Destroys local data.
pub async fn basebackup_as_standby(
    tools: &Tools,
    data_dir: &Path,
    source_conninfo: &str,
    primary_conninfo: &str,
) -> Result<RebuildReport, PgError> {
    let t0 = Instant::now();
    let confs = save_confs(data_dir)?;
    let entries = std::fs::read_dir(data_dir).map_err(cfg_err(data_dir))?;
    for entry in entries {
        let path = entry.map_err(cfg_err(data_dir))?.path();
        let res = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(cfg_err(&path))?;
    }
    let output = tools
        .run(
            "pg_basebackup",
            &[
                format!("--pgdata={}", data_dir.display()),
                format!("--dbname={source_conninfo}"),
                "--wal-method=stream".into(),
                "--checkpoint=fast".into(),
            ],
        )
        .await?;
    restore_confs(&confs)?;
    unfence_offline(data_dir)?;
    write_standby(data_dir, primary_conninfo)?;
    Ok(RebuildReport {
        method: decide::RejoinAction::BasebackupAsStandby,
        duration: t0.elapsed(),
        output,
    })
}

fn write_standby(data_dir: &Path, primary_conninfo: &str) -> Result<(), PgError> {
    edit_auto_conf(
        data_dir,
        &[("primary_conninfo", primary_conninfo.to_string())],
        &[],
    )?;
    let signal = data_dir.join("standby.signal");
    std::fs::write(&signal, b"").map_err(cfg_err(&signal))
}

/// The data directory's own top-level `*.conf` files (port, sockets, HBA,
/// local settings): pg_rewind and pg_basebackup replace them with the
/// source's, so a rebuild puts them back.
fn save_confs(data_dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, PgError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(data_dir).map_err(cfg_err(data_dir))? {
        let path = entry.map_err(cfg_err(data_dir))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "conf") {
            let body = std::fs::read(&path).map_err(cfg_err(&path))?;
            out.push((path, body));
        }
    }
    Ok(out)
}

fn restore_confs(confs: &[(PathBuf, Vec<u8>)]) -> Result<(), PgError> {
    for (path, body) in confs {
        std::fs::write(path, body).map_err(cfg_err(path))?;
    }
    Ok(())
}

/// Give the data directory back to the server's account after this process
/// (root) wrote files in it. No-op unless `tools.run_as` is set.
pub fn fix_owner(tools: &Tools, data_dir: &Path) -> Result<(), PgError> {
    let Some((uid, gid)) = tools.run_as else {
        return Ok(());
    };
    fn walk(p: &Path, uid: u32, gid: u32) -> Result<(), PgError> {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(cfg_err(p))?;
        let meta = std::fs::symlink_metadata(p).map_err(cfg_err(p))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(p).map_err(cfg_err(p))? {
                walk(&e.map_err(cfg_err(p))?.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    walk(data_dir, uid, gid)
}
