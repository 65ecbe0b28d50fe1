//! The database a region names, as the controller drives it:
//!
//! * **`cnpg`**: the region's CloudNativePG Cluster, changed by merge
//!   patches that the operator carries out ([`super::cnpg`]);
//! * **`postgres`**: a PostgreSQL server that CNPG does not manage, driven
//!   over a superuser connection with the back-end `continuum-agent failover`
//!   uses (`continuum_shared::pg`). Fence: the fence settings reloaded, then
//!   every client session terminated (writes stop at once, not after a smart
//!   shutdown). Promote: wait until replay reached all received WAL, then
//!   `pg_promote`. Epoch: the one-row table `continuum.epoch`, written by the
//!   primary and replicated, so a returning former primary sees the newer
//!   epoch (invariant 5). The standby streams with `application_name` = its
//!   region name.
//!
//! Every PostgreSQL call is bounded: a stuck server must hold neither the
//! decision loop nor the fence guard past its turn.

use std::time::Duration;

use continuum_shared::failover::DbState;
use continuum_shared::lease::{Epoch, HolderId};
use continuum_shared::pg::backend as pg;
use continuum_shared::pg::PgError;

use super::cnpg::{self, ClusterHandle, CnpgError, Names};
use super::dbfacts::{self, DbFacts};
use crate::failover::observe;

/// One region's database.
#[derive(Clone)]
pub enum Database {
    // Boxed: an `Api` handle is ~300 bytes, a connection string far less.
    Cnpg(Box<ClusterHandle>),
    Postgres(Postgres),
}

/// A PostgreSQL server reached over a superuser connection string.
#[derive(Clone)]
pub struct Postgres {
    conninfo: String,
    /// Bound of one observation (several per TTL).
    observe_bound: Duration,
    /// Bound of one action (fence, promote, settings).
    action_bound: Duration,
}

/// Why a database action failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Cnpg(#[from] CnpgError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("recording the epoch: {0}")]
    Epoch(String),
    #[error("observing the database: {0}")]
    Observe(String),
    #[error("no answer from the database within {0:?}")]
    Timeout(Duration),
}

impl DbError {
    /// Metric label (`action_errors{error}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Cnpg(e) => e.label(),
            Self::Pg(e) => e.label(),
            Self::Epoch(_) => "record_epoch",
            Self::Observe(_) => "observe",
            Self::Timeout(_) => "timeout",
        }
    }
}

async fn bounded<T>(
    bound: Duration,
    fut: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(bound, fut)
        .await
        .map_err(|_| DbError::Timeout(bound))?
}

impl Postgres {
    /// Bounds follow the lease: an observation takes at most half a TTL
    /// (within 0.2-2 s), an action at most one TTL (at least 2 s, as the
    /// direct runner).
    pub fn new(conninfo: String, ttl: Duration) -> Self {
        Self {
            conninfo,
            observe_bound: (ttl / 2).clamp(Duration::from_millis(200), Duration::from_secs(2)),
            action_bound: ttl.max(Duration::from_secs(2)),
        }
    }

    /// The decision's view of the server and its facts, over one
    /// connection. The required standby is what the server runs with,
    /// mapped to a region through the application names.
    pub async fn observe(&self, names: &Names) -> Result<(DbState, DbFacts), DbError> {
        bounded(self.observe_bound, async {
            let client = pg::connect(&self.conninfo).await?;
            let state = observe::database_on(&client, &names.peer_cluster)
                .await
                .map_err(DbError::Observe)?;
            let facts = dbfacts::read_on(&client, &names.peer_cluster).await?;
            let applied = dbfacts::applied_standby(&facts, names);
            Ok((
                dbfacts::with_facts(state, Some(&facts), Some(&applied)),
                facts,
            ))
        })
        .await
    }

    /// Promotes once replay has caught up with all received WAL.
    pub async fn promote(&self) -> Result<pg::PromotionReport, DbError> {
        bounded(self.action_bound, async {
            Ok(pg::promote(&self.conninfo, pg::PromoteOptions::default()).await?)
        })
        .await
    }
}

impl Database {
    /// Stops the database acknowledging writes; returns what was done.
    pub async fn fence(&self) -> Result<String, DbError> {
        match self {
            Self::Cnpg(c) => {
                c.fence().await?;
                Ok(format!("{} set", cnpg::ANNOTATION_FENCED))
            }
            Self::Postgres(p) => {
                let r =
                    bounded(p.action_bound, async { Ok(pg::fence(&p.conninfo).await?) }).await?;
                Ok(format!(
                    "read-only, {} session(s) terminated in {:?}",
                    r.terminated, r.total
                ))
            }
        }
    }

    /// Lifts the fence, requiring `standby` (or none) from now on.
    pub async fn unfence(&self, standby: Option<&HolderId>, names: &Names) -> Result<(), DbError> {
        match self {
            Self::Cnpg(c) => {
                c.patch(&cnpg::unfence_patch(standby, names)).await?;
                Ok(())
            }
            Self::Postgres(p) => {
                let app = standby.map(|s| names.application_name_of(s));
                bounded(p.action_bound, async {
                    Ok(pg::unfence(&p.conninfo, app).await?)
                })
                .await
            }
        }
    }

    /// Requires `standby` (or none) on every commit.
    pub async fn set_standby(
        &self,
        standby: Option<&HolderId>,
        names: &Names,
    ) -> Result<(), DbError> {
        match self {
            Self::Cnpg(c) => {
                c.patch(&cnpg::set_standby_patch(standby, names)).await?;
                Ok(())
            }
            Self::Postgres(p) => {
                let app = standby.map(|s| names.application_name_of(s));
                bounded(p.action_bound, async {
                    Ok(pg::set_synchronous_standby(&p.conninfo, app).await?)
                })
                .await
            }
        }
    }

    /// Records `epoch` in the database (only ever upwards).
    pub async fn record_epoch(&self, epoch: Epoch, region: &HolderId) -> Result<String, DbError> {
        match self {
            Self::Cnpg(c) => {
                c.record_epoch(epoch).await?;
                Ok(format!(
                    "epoch {epoch} recorded as {}",
                    cnpg::ANNOTATION_EPOCH
                ))
            }
            Self::Postgres(p) => {
                bounded(p.action_bound, async {
                    observe::record_epoch(&p.conninfo, epoch, region)
                        .await
                        .map_err(DbError::Epoch)
                })
                .await?;
                Ok(format!("epoch {epoch} recorded in continuum.epoch"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_follow_the_ttl() {
        let p = Postgres::new(String::new(), Duration::from_secs(1));
        assert_eq!(p.observe_bound, Duration::from_millis(500));
        assert_eq!(p.action_bound, Duration::from_secs(2));
        let p = Postgres::new(String::new(), Duration::from_secs(30));
        assert_eq!(p.observe_bound, Duration::from_secs(2));
        assert_eq!(p.action_bound, Duration::from_secs(30));
        let p = Postgres::new(String::new(), Duration::from_millis(100));
        assert_eq!(p.observe_bound, Duration::from_millis(200));
    }

    #[test]
    fn error_labels() {
        assert_eq!(DbError::Timeout(Duration::ZERO).label(), "timeout");
        assert_eq!(DbError::Epoch("x".into()).label(), "record_epoch");
        assert_eq!(DbError::Pg(PgError::NotStandby).label(), "not_standby");
        assert_eq!(
            DbError::Cnpg(CnpgError::NotFound("c".into())).label(),
            "cluster_not_found"
        );
    }

    /// A server that never answers is bounded, not waited for.
    #[tokio::test]
    async fn unreachable_server_fails_within_its_bound() {
        // A listening socket that never speaks PostgreSQL's protocol.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let p = Postgres::new(
            format!("host=127.0.0.1 port={port} user=x dbname=x"),
            Duration::from_millis(400),
        );
        let names = Names {
            region: HolderId::new("a").expect("id"),
            peer: HolderId::new("b").expect("id"),
            local_cluster: "a".into(),
            peer_cluster: "b".into(),
        };
        let err = p.observe(&names).await.expect_err("no server");
        assert_eq!(err.label(), "timeout", "{err}");
        drop(l);
    }
}
