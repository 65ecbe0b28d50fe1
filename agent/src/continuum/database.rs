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
    /// The observation's kept session (shared by clones of this handle).
    observe_conn: observe::ObserveConn,
    /// `primary_conninfo` (with this region's `application_name`) the server
    /// gets when a planned handover turns it into the peer's standby; `None`:
    /// no switchover for this region.
    follow_conninfo: Option<String>,
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
            observe_conn: observe::ObserveConn::default(),
            follow_conninfo: None,
            observe_bound: (ttl / 2).clamp(Duration::from_millis(200), Duration::from_secs(2)),
            action_bound: ttl.max(Duration::from_secs(2)),
        }
    }

    /// The decision's view of the server and its facts, over one
    /// connection. The required standby is what the server runs with,
    /// mapped to a region through the application names.
    pub async fn observe(&self, names: &Names) -> Result<(DbState, DbFacts), DbError> {
        bounded(self.observe_bound, async {
            let peer = names.peer_cluster.clone();
            let read = observe::observation(move |c| {
                let peer = peer.clone();
                Box::pin(async move {
                    let state = observe::database_on(c, &peer)
                        .await
                        .map_err(|e| observe::ObserveError::Query(DbError::Observe(e)))?;
                    let facts = dbfacts::read_on(c, &peer)
                        .await
                        .map_err(|e| observe::ObserveError::Query(DbError::Pg(e)))?;
                    Ok((state, facts))
                })
            });
            let (state, facts) =
                self.observe_conn
                    .run(&self.conninfo, read)
                    .await
                    .map_err(|e| match e {
                        observe::ObserveError::Connect(p) => DbError::Pg(p),
                        observe::ObserveError::Query(d) => d,
                    })?;
            let applied = dbfacts::applied_standby(&facts, names);
            Ok((
                dbfacts::with_facts(state, Some(&facts), Some(&applied)),
                facts,
            ))
        })
        .await
    }

    /// Enables planned handovers: `conninfo` is how this server streams
    /// from the peer, `application_name` what the peer requires it as.
    pub fn with_follow(mut self, conninfo: &str, application_name: &str) -> Self {
        self.follow_conninfo = Some(continuum_shared::pg::decide::with_application_name(
            conninfo,
            application_name,
        ));
        self
    }

    /// Whether a planned handover can turn this server into the peer's
    /// standby (`primaryConninfoSecretRef` is set).
    pub fn can_follow(&self) -> bool {
        self.follow_conninfo.is_some()
    }

    /// Handover: the fenced server's WAL end, the successor's final position.
    pub async fn final_position(&self) -> Result<u64, DbError> {
        bounded(self.observe_bound, async {
            Ok(pg::fenced_wal_end(&self.conninfo).await?.0)
        })
        .await
    }

    /// Handover: arrange to start as the peer's standby, then fast shutdown.
    pub async fn stop_to_follow(&self) -> Result<pg::StopReport, DbError> {
        let Some(follow) = self.follow_conninfo.as_deref() else {
            return Err(DbError::Pg(PgError::Refused(
                "no primaryConninfoSecretRef: this region cannot follow the peer".into(),
            )));
        };
        bounded(self.action_bound, async {
            Ok(pg::stop_to_follow(&self.conninfo, follow).await?)
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

/// The old primary's next step in a planned handover of a `postgres`
/// region, once it holds the lease with the intent recorded (fence, record
/// the final WAL position, stop to follow the peer, release). Pure: the
/// controller observes, applies the step and observes again, so a restarted
/// agent picks up where the last one stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgHandoverStep {
    /// Stop acknowledging writes first.
    Fence,
    /// Record the fenced server's WAL end in the intent (`final_lsn`).
    RecordFinal,
    /// Write the standby configuration and shut down (fast).
    Stop,
    /// Give the lease up: the successor may take it.
    Release,
    Wait(&'static str),
}

/// What [`pg_handover_step`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct PgHandoverView<'a> {
    /// The intent at the witnesses carries the final position.
    pub final_recorded: bool,
    /// The server's state; `None` when it did not answer.
    pub db: Option<&'a DbState>,
    /// The server refused the connection outright (its postmaster is gone),
    /// as opposed to answering slowly or "shutting down".
    pub server_gone: bool,
    /// The stop was asked for longer ago than the stop bound, and the server
    /// still neither went away nor came back.
    pub stop_overdue: bool,
}

/// See [`PgHandoverStep`]. The successor takes the lease only after the
/// release and only once it replayed past the final position; the stopped
/// server's walsender waits for it to confirm every record up to the
/// shutdown checkpoint before the postmaster exits. So the release waits
/// for proof that the old server ended: refused connections, or the server
/// back in recovery (restarted by its supervisor as the peer's standby). A
/// server that stays unanswerable past the stop bound is released anyway:
/// it was fenced before it was stopped, so the only risk left is a rebuild,
/// never a lost or doubly acknowledged write.
pub fn pg_handover_step(v: PgHandoverView<'_>) -> PgHandoverStep {
    match v.db {
        Some(d) if d.primary && !d.fenced => PgHandoverStep::Fence,
        Some(d) if d.primary && !v.final_recorded => PgHandoverStep::RecordFinal,
        Some(d) if d.primary => PgHandoverStep::Stop,
        Some(_) if v.final_recorded => PgHandoverStep::Release,
        Some(_) => PgHandoverStep::Wait(
            "handover: the server is in recovery before its final WAL position was recorded",
        ),
        None if !v.final_recorded => PgHandoverStep::Wait(
            "handover: the server is not answering; its final WAL position is not recorded yet",
        ),
        None if v.server_gone || v.stop_overdue => PgHandoverStep::Release,
        None => PgHandoverStep::Wait("handover: waiting for the server to finish its shutdown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_handover_steps() {
        let db = |primary: bool, fenced: bool| DbState {
            primary,
            fenced,
            epoch: Epoch(1),
            required_standby: None,
            peer_attached: true,
            replay_lsn: None,
        };
        let (open, fenced, standby) = (db(true, false), db(true, true), db(false, false));
        use PgHandoverStep as S;
        // (final recorded, db, gone, overdue, want, name)
        type Row<'a> = (bool, Option<&'a DbState>, bool, bool, S, &'a str);
        let cases: &[Row] = &[
            (false, Some(&open), false, false, S::Fence, "open primary"),
            (
                true,
                Some(&open),
                false,
                false,
                S::Fence,
                "unfenced again: fence first",
            ),
            (false, Some(&fenced), false, false, S::RecordFinal, "fenced"),
            (true, Some(&fenced), false, false, S::Stop, "final recorded"),
            (
                true,
                Some(&fenced),
                true,
                true,
                S::Stop,
                "still answering as primary",
            ),
            (
                true,
                Some(&standby),
                false,
                false,
                S::Release,
                "back as a standby",
            ),
            (
                false,
                Some(&standby),
                false,
                false,
                S::Wait(""),
                "standby without final",
            ),
            (
                false,
                None,
                true,
                true,
                S::Wait(""),
                "gone before the final position",
            ),
            (true, None, true, false, S::Release, "postmaster gone"),
            (
                true,
                None,
                false,
                true,
                S::Release,
                "unanswered past the stop bound",
            ),
            (true, None, false, false, S::Wait(""), "shutting down"),
        ];
        for (final_recorded, db, gone, overdue, want, name) in cases {
            let got = pg_handover_step(PgHandoverView {
                final_recorded: *final_recorded,
                db: *db,
                server_gone: *gone,
                stop_overdue: *overdue,
            });
            match (got, want) {
                (S::Wait(_), S::Wait(_)) => {}
                _ => assert_eq!(got, *want, "{name}"),
            }
        }
    }

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
