//! Direct PostgreSQL back-end for the failover controller: fence a primary,
//! read a standby's replay position, promote it once caught up, read which
//! standby is synchronous, and keep a returning former primary fenced.
//!
//! Used by the region-kill drill and by deployments without CloudNativePG.
//! Decisions (catch-up, which standby is synchronous, what a returning
//! primary does, how a config file is rewritten) live in [`decide`] and are
//! pure; [`backend`] and [`rejoin`] do the I/O and nothing else.
//!
//! The fence works at three levels so that after [`backend::fence`] returns no
//! new commit is acknowledged:
//! 1. `synchronous_standby_names` names a standby nobody has, so any commit
//!    (in flight or new) waits for an acknowledgement that never comes;
//! 2. `default_transaction_read_only = on`, so new sessions refuse writes;
//! 3. every client backend is terminated (and waited for), which aborts the
//!    waits of (1) without acknowledging them to the client.
//!
//! None of these writes WAL or needs a commit, so fencing works while the
//! synchronous standby is unreachable (the very case it exists for).
//! A client that sets `synchronous_commit = local` itself has opted out of
//! synchronous durability and is out of this fence's reach.

pub mod backend;
pub mod decide;
pub mod lsn;
pub mod rejoin;
pub mod server;

use std::time::Duration;

pub use lsn::Lsn;

/// What can go wrong talking to or operating a PostgreSQL server.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("connect to PostgreSQL timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("invalid LSN {0:?}")]
    BadLsn(String),
    #[error("server is not a standby (not in recovery)")]
    NotStandby,
    #[error("standby not caught up after {waited:?}: received {received}, replayed {replayed}")]
    NotCaughtUp {
        waited: Duration,
        received: String,
        replayed: String,
    },
    #[error("pg_promote did not complete within {0} s")]
    PromoteFailed(i32),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("{path}: {source}")]
    ConfigFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
}

impl PgError {
    /// Stable metric label for this error kind.
    pub fn label(&self) -> &'static str {
        match self {
            PgError::Connect(_) => "connect",
            PgError::ConnectTimeout(_) => "connect_timeout",
            PgError::Query { .. } => "query",
            PgError::BadLsn(_) => "bad_lsn",
            PgError::NotStandby => "not_standby",
            PgError::NotCaughtUp { .. } => "not_caught_up",
            PgError::PromoteFailed(_) => "promote_failed",
            PgError::Timeout { .. } => "timeout",
            PgError::ConfigFile { .. } => "config_file",
            PgError::Tool { .. } => "tool",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_snake_case() {
        let io = || std::io::Error::other("x");
        let errs = [
            PgError::ConnectTimeout(Duration::ZERO),
            PgError::BadLsn("x".into()),
            PgError::NotStandby,
            PgError::NotCaughtUp {
                waited: Duration::ZERO,
                received: "0/0".into(),
                replayed: "0/0".into(),
            },
            PgError::PromoteFailed(1),
            PgError::Timeout {
                what: "x",
                after: Duration::ZERO,
            },
            PgError::ConfigFile {
                path: "p".into(),
                source: io(),
            },
            PgError::Tool {
                tool: "pg_rewind",
                detail: "d".into(),
            },
        ];
        let mut labels: Vec<_> = errs.iter().map(PgError::label).collect();
        assert!(labels
            .iter()
            .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        labels.sort_unstable();
        let n = labels.len();
        labels.dedup();
        assert_eq!(labels.len(), n);
    }
}
