//! Stopping and starting a local PostgreSQL server and reading its control
//! file, for the agent that manages the data directory (direct back-end:
//! planned handover, rejoin). Every call is bounded by [`Tools::timeout`].

use std::path::{Path, PathBuf};

use super::decide::{self, ControlData};
use super::rejoin::Tools;
use super::PgError;

/// A server's data directory and how to run its tools.
#[derive(Debug, Clone)]
pub struct LocalServer {
    pub tools: Tools,
    pub data_dir: PathBuf,
    /// Server log for `pg_ctl start -l`.
    pub log_file: PathBuf,
}

/// Whether the postmaster recorded in `postmaster.pid` is alive (Linux
/// /proc; a zombie counts as gone).
pub fn postmaster_running(data_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return false;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return false;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl LocalServer {
    fn pgdata(&self) -> String {
        format!("--pgdata={}", self.data_dir.display())
    }

    /// `pg_controldata` of the data directory.
    pub async fn controldata(&self) -> Result<ControlData, PgError> {
        let out = self.tools.run("pg_controldata", &[self.pgdata()]).await?;
        decide::parse_controldata(&out).ok_or_else(|| PgError::Tool {
            tool: "pg_controldata",
            detail: format!(
                "unexpected output: {}",
                out.lines().take(3).collect::<Vec<_>>().join(" | ")
            ),
        })
    }

    /// Fast shutdown, waiting until it is down: sessions are aborted, a
    /// shutdown checkpoint is written, and each walsender sends a connected
    /// standby every record up to it (and waits for its confirmation)
    /// before exiting. A server already stopped is fine.
    pub async fn stop_fast(&self) -> Result<(), PgError> {
        if !postmaster_running(&self.data_dir) {
            return Ok(());
        }
        let secs = self.tools.timeout.as_secs().max(1).to_string();
        self.tools
            .run(
                "pg_ctl",
                &[
                    "stop".into(),
                    self.pgdata(),
                    "--mode=fast".into(),
                    "--wait".into(),
                    format!("--timeout={secs}"),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Start the server (as configured on disk) and wait until it accepts
    /// connections. A running server is left alone.
    pub async fn start(&self) -> Result<(), PgError> {
        if postmaster_running(&self.data_dir) {
            return Ok(());
        }
        let secs = self.tools.timeout.as_secs().max(1).to_string();
        self.tools
            .run(
                "pg_ctl",
                &[
                    "start".into(),
                    self.pgdata(),
                    format!("--log={}", self.log_file.display()),
                    "--wait".into(),
                    format!("--timeout={secs}"),
                ],
            )
            .await
            .map(|_| ())
    }
}
