//! Reading the region's database into a [`DbState`], and recording the epoch
//! in it. The epoch lives in a one-row table, `continuum.epoch`, written by
//! the primary under the lease and replicated to the standby, so a former
//! primary can tell that a newer epoch exists (invariant 5).

use continuum_shared::failover::DbState;
use continuum_shared::lease::{Epoch, HolderId};
use continuum_shared::pg::backend as pg;
use continuum_shared::pg::decide::{is_fenced, FENCE_STANDBY_NAME};

/// The standby named by a `synchronous_standby_names` value such as
/// `FIRST 1 ("b")`; `None` when empty, the fence placeholder, or not a
/// single valid holder id.
pub fn required_standby(names: &str) -> Option<HolderId> {
    if names.contains(FENCE_STANDBY_NAME) {
        return None;
    }
    let inner = match (names.find('('), names.rfind(')')) {
        (Some(open), Some(close)) if open < close => &names[open + 1..close],
        _ => names,
    };
    let mut list = inner.split(',').map(|s| s.trim().trim_matches('"'));
    let first = list.next().filter(|s| !s.is_empty())?;
    if list.next().is_some() {
        return None;
    }
    HolderId::new(first).ok()
}

/// One round trip's worth of facts about the database, on `conn`'s
/// long-lived session.
pub async fn database(
    conn: &ObserveConn,
    conninfo: &str,
    peer: &HolderId,
) -> Result<DbState, String> {
    let peer = peer.as_str().to_string();
    conn.run(
        conninfo,
        observation(move |c| {
            let peer = peer.clone();
            Box::pin(async move { database_on(c, &peer).await.map_err(ObserveError::Query) })
        }),
    )
    .await
    .map_err(|e| e.to_string())
}

/// The session the decision loop observes the database on, kept across
/// ticks: a new connection every tick is a new backend process forked on
/// the server ten times a second. A session that died (the fence
/// terminates every client backend, ours included; a restart) is replaced
/// within the same call, so an observation right after a fence still sees
/// the server. Actions keep their own short-lived connections (a fence
/// must not depend on a session that may be stuck).
#[derive(Clone, Default)]
pub struct ObserveConn {
    client: std::sync::Arc<tokio::sync::Mutex<Option<pg::Client>>>,
}

/// Why an observation on [`ObserveConn`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError<E: std::fmt::Display> {
    /// No session: the server refused or did not answer the connection.
    #[error(transparent)]
    Connect(continuum_shared::pg::PgError),
    /// The observation itself failed on an open session.
    #[error("{0}")]
    Query(E),
}

/// What an observation on [`ObserveConn`] returns (boxed: it borrows the
/// session, and must stay `Send` for the controller's tasks).
pub type ObserveFuture<'c, T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, ObserveError<E>>> + Send + 'c>>;

/// Names the closure type of an observation (closures returning a future
/// that borrows their argument need the signature spelled out).
pub fn observation<T, E, F>(f: F) -> F
where
    E: std::fmt::Display,
    F: for<'c> Fn(&'c pg::Client) -> ObserveFuture<'c, T, E>,
{
    f
}

impl ObserveConn {
    /// Runs `f` on the kept session, connecting first if there is none; if
    /// `f` fails because the session closed, once more on a new one.
    pub async fn run<T, E: std::fmt::Display>(
        &self,
        conninfo: &str,
        f: impl for<'c> Fn(&'c pg::Client) -> ObserveFuture<'c, T, E>,
    ) -> Result<T, ObserveError<E>> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                match f(c).await {
                    Ok(v) => return Ok(v),
                    Err(e) if !c.is_closed() => return Err(e),
                    Err(_) => {}
                }
            }
        }
        *slot = None;
        let c = pg::connect(conninfo).await.map_err(ObserveError::Connect)?;
        let out = f(&c).await;
        *slot = Some(c);
        out
    }
}

/// [`database`] on an open connection; the peer streams as `peer_app`.
/// `required_standby` is the holder id written in `synchronous_standby_names`
/// (the direct runner's standbys stream as their region id).
pub async fn database_on(client: &pg::Client, peer_app: &str) -> Result<DbState, String> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    current_setting('synchronous_standby_names'), \
                    current_setting('default_transaction_read_only'), \
                    (SELECT count(*) FROM pg_stat_replication \
                      WHERE application_name = $1 AND state = 'streaming'), \
                    to_regclass('continuum.epoch') IS NOT NULL, \
                    pg_last_wal_replay_lsn()::text",
            &[&peer_app],
        )
        .await
        .map_err(|e| e.to_string())?;
    let in_recovery: bool = row.try_get(0).map_err(|e| e.to_string())?;
    let names: String = row.try_get(1).map_err(|e| e.to_string())?;
    let read_only: String = row.try_get(2).map_err(|e| e.to_string())?;
    let attached: i64 = row.try_get(3).map_err(|e| e.to_string())?;
    let has_epoch: bool = row.try_get(4).map_err(|e| e.to_string())?;
    let replay: Option<String> = row.try_get(5).map_err(|e| e.to_string())?;
    let replay_lsn = match replay {
        Some(t) if in_recovery => Some(
            t.parse::<continuum_shared::pg::Lsn>()
                .map_err(|e| e.to_string())?
                .0,
        ),
        _ => None,
    };
    let epoch = if has_epoch {
        let r = client
            .query_opt("SELECT epoch FROM continuum.epoch WHERE id = 1", &[])
            .await
            .map_err(|e| e.to_string())?;
        match r {
            Some(r) => {
                let e: i64 = r.try_get(0).map_err(|e| e.to_string())?;
                Epoch(
                    u64::try_from(e)
                        .map_err(|_| format!("negative epoch {e} in continuum.epoch"))?,
                )
            }
            None => Epoch(0),
        }
    } else {
        Epoch(0)
    };
    Ok(DbState {
        primary: !in_recovery,
        fenced: !in_recovery && is_fenced(&names, &read_only),
        epoch,
        required_standby: if in_recovery {
            None
        } else {
            required_standby(&names)
        },
        peer_attached: attached > 0,
        replay_lsn,
    })
}

/// Record `epoch` as this database's epoch (only ever upwards).
pub async fn record_epoch(conninfo: &str, epoch: Epoch, region: &HolderId) -> Result<(), String> {
    let client = pg::connect(conninfo).await.map_err(|e| e.to_string())?;
    let e = i64::try_from(epoch.0).map_err(|_| format!("epoch {epoch} too large"))?;
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS continuum; \
             CREATE TABLE IF NOT EXISTS continuum.epoch ( \
               id int PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL, \
               region text NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(|e| e.to_string())?;
    client
        .execute(
            "INSERT INTO continuum.epoch (id, epoch, region) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, region = excluded.region, \
               recorded_at = now() WHERE continuum.epoch.epoch < excluded.epoch",
            &[&e, &region.as_str()],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_required_standby() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            ("FIRST 1 (\"b\")", Some("b")),
            ("FIRST 1 (b)", Some("b")),
            ("b", Some("b")),
            ("FIRST 1 (\"continuum-fenced-no-such-standby\")", None),
            ("ANY 1 (a, b)", None),
            ("FIRST 1 (\"B_x\")", None),
            ("FIRST 1 (", None),
        ];
        for (names, want) in cases {
            let got = required_standby(names);
            assert_eq!(got.as_ref().map(|h| h.as_str()), *want, "{names:?}");
        }
    }
}
