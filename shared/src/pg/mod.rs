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
    #[error("refused: {0}")]
    Refused(String),
}

impl PgError {
    /// Nothing listens where the server should be (connection refused, or
    /// its unix socket gone): its postmaster has exited, as opposed to a
    /// server that answers slowly or says it is shutting down.
    pub fn is_refused(&self) -> bool {
        let PgError::Connect(e) = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                );
            }
            cause = c.source();
        }
        false
    }

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
            PgError::Refused(_) => "refused",
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
            PgError::Refused("x".into()),
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

    /// Refused means "the postmaster is gone"; silence does not.
    #[tokio::test]
    async fn refusal_is_told_from_silence() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let e = backend::connect(&format!("host=127.0.0.1 port={port} user=x"))
            .await
            .expect_err("nothing listens");
        assert!(e.is_refused(), "{e:?}");
        let dir = std::env::temp_dir().join(format!("continuum-no-pg-{}", std::process::id()));
        let e = backend::connect(&format!("host={} port=5432 user=x", dir.display()))
            .await
            .expect_err("no socket file");
        assert!(e.is_refused(), "{e:?}");
        assert!(!PgError::ConnectTimeout(Duration::ZERO).is_refused());
        assert!(!PgError::NotStandby.is_refused());
    }
}
