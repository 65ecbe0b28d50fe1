//! The I/O half of the PostgreSQL back-end: each operation opens its own
//! short-lived superuser connection (a fence must not depend on a pooled
//! session that may be stuck), runs, and reports what it did and how long
//! it took.

use std::time::{Duration, Instant};

/// A connection opened by [`connect`].
pub use tokio_postgres::Client;
use tokio_postgres::NoTls;

use super::decide::{self, CatchUp, ReplicationRow, StandbyStatus, SyncStandby};
use super::{Lsn, PgError};

/// Bound for opening a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Open a connection and drive it on a background task.
pub async fn connect(conninfo: &str) -> Result<Client, PgError> {
    let fut = tokio_postgres::connect(conninfo, NoTls);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| PgError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(PgError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| PgError::Query { what, source }
}

/// Read one column; a type mismatch is an error, never a panic.
pub fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    idx: usize,
) -> Result<T, PgError> {
    row.try_get(idx).map_err(q("decode column"))
}

/// An optional `pg_lsn` column read as text.
pub fn lsn_opt(text: Option<String>) -> Result<Option<Lsn>, PgError> {
    text.map(|t| t.parse()).transpose()
}

/// How long each phase of a fence took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceReport {
    /// Connect to fence returning.
    pub total: Duration,
    pub connect: Duration,
    /// ALTER SYSTEM + pg_reload_conf.
    pub configure: Duration,
    /// Until this session and every walsender run with the fence settings.
    pub reload_confirm: Duration,
    /// Terminating (and waiting for) client backends.
    pub terminate: Duration,
    /// Whether the reload was seen to apply within its bound.
    pub reload_confirmed: bool,
    /// Client backends terminated.
    pub terminated: u64,
    /// Whether every terminated backend was seen gone within its bound.
    pub all_terminated: bool,
}

/// Bound on waiting for a configuration reload to reach all processes.
const RELOAD_BOUND: Duration = Duration::from_secs(2);
/// Bound on waiting for terminated client backends to exit.
const TERMINATE_BOUND: Duration = Duration::from_secs(3);

async fn alter_system(
    client: &Client,
    settings: &[(&str, String)],
    reset: &[&str],
) -> Result<(), PgError> {
    // ALTER SYSTEM cannot run in a transaction block, so one statement per
    // call. It writes postgresql.auto.conf, not WAL: it works without a standby.
    for (name, value) in settings {
        let escaped = value.replace('\'', "''");
        client
            .batch_execute(&format!("ALTER SYSTEM SET {name} = '{escaped}'"))
            .await
            .map_err(q("alter system"))?;
    }
    for name in reset {
        client
            .batch_execute(&format!("ALTER SYSTEM RESET {name}"))
            .await
            .map_err(q("alter system reset"))?;
    }
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(q("pg_reload_conf"))
}

/// Wait until this session sees `synchronous_standby_names = want` (the
/// postmaster reloads before it signals its children, so later backends start
/// with it too) and, if `no_sync_left`, no walsender still counts as
/// synchronous.
async fn confirm_reload(client: &Client, want: &str, no_sync_left: bool) -> Result<bool, PgError> {
    let start = Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT current_setting('synchronous_standby_names'), \
                 (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync','quorum','potential'))",
                &[],
            )
            .await
            .map_err(q("confirm reload"))?;
        let names: String = col(&row, 0)?;
        let sync_left: i64 = col(&row, 1)?;
        if names == want && (!no_sync_left || sync_left == 0) {
            return Ok(true);
        }
        if start.elapsed() > RELOAD_BOUND {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Stop the server acknowledging writes, at once. Idempotent. Works while the
/// synchronous standby is gone. After it returns, no commit is acknowledged
/// to any client (see the module documentation for the three levels).
/// Walsenders stay up so a standby keeps receiving WAL until it promotes.
pub async fn fence(conninfo: &str) -> Result<FenceReport, PgError> {
    let t0 = Instant::now();
    let client = connect(conninfo).await?;
    let connect_d = t0.elapsed();

    let t1 = Instant::now();
    let settings = decide::fence_settings();
    alter_system(&client, &settings, &[]).await?;
    let configure = t1.elapsed();

    let t2 = Instant::now();
    let reload_confirmed = confirm_reload(&client, &decide::fenced_standby_names(), true).await?;
    let reload_confirm = t2.elapsed();

    let t3 = Instant::now();
    // Signal every client backend at once, then poll tightly until they are
    // gone (pg_terminate_backend's own wait polls each pid in 100 ms steps).
    // Backends that connect meanwhile already run fenced.
    // Filter first, signal in the projection: never our own session.
    let targets: Vec<i32> = client
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map_err(q("terminate backends"))?
        .iter()
        .map(|r| Ok((col::<i32>(r, 0)?, col::<bool>(r, 1)?)))
        .collect::<Result<Vec<_>, PgError>>()?
        .into_iter()
        .filter_map(|(pid, signalled)| signalled.then_some(pid))
        .collect();
    let mut all_gone = targets.is_empty();
    while !all_gone {
        let left: Vec<i32> = client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&targets],
            )
            .await
            .map_err(q("wait for terminated backends"))?
            .iter()
            .map(|r| col(r, 0))
            .collect::<Result<_, _>>()?;
        all_gone = left.is_empty();
        if all_gone || t3.elapsed() > TERMINATE_BOUND {
            break;
        }
        if t3.elapsed() > TERMINATE_BOUND / 2 {
            // Signal again; harmless if it is already exiting.
            client
                .query(
                    "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid",
                    &[&left],
                )
                .await
                .map_err(q("terminate backends again"))?;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let terminated = targets.len() as u64;
    let terminate = t3.elapsed();
    let report = FenceReport {
        total: t0.elapsed(),
        connect: connect_d,
        configure,
        reload_confirm,
        terminate,
        reload_confirmed,
        terminated,
        all_terminated: all_gone,
    };
    tracing::info!(
        action = "fence",
        reason = "lease lost or former primary",
        total_ms = report.total.as_secs_f64() * 1e3,
        terminated = report.terminated,
        reload_confirmed = report.reload_confirmed,
        "database fenced"
    );
    Ok(report)
}

/// Lift the fence (planned switchback), naming the synchronous standby to
/// require from now on (None: asynchronous; record that at the witness
/// first, invariant 3).
pub async fn unfence(conninfo: &str, sync_standby: Option<&str>) -> Result<(), PgError> {
    let client = connect(conninfo).await?;
    let names = decide::synchronous_standby_names(sync_standby);
    alter_system(
        &client,
        &[("synchronous_standby_names", names.clone())],
        &["default_transaction_read_only"],
    )
    .await?;
    if !confirm_reload(&client, &names, false).await? {
        return Err(PgError::Timeout {
            what: "unfence reload",
            after: RELOAD_BOUND,
        });
    }
    tracing::info!(action = "unfence", reason = "planned switchback", sync_standby = ?sync_standby, "database unfenced");
    Ok(())
}

/// Set the required synchronous standby (None: asynchronous). Weakening
/// durability must be recorded at the witness before this call (invariant 3).
pub async fn set_synchronous_standby(conninfo: &str, standby: Option<&str>) -> Result<(), PgError> {
    let client = connect(conninfo).await?;
    let names = decide::synchronous_standby_names(standby);
    alter_system(
        &client,
        &[("synchronous_standby_names", names.clone())],
        &[],
    )
    .await?;
    if !confirm_reload(&client, &names, false).await? {
        return Err(PgError::Timeout {
            what: "synchronous_standby_names reload",
            after: RELOAD_BOUND,
        });
    }
    tracing::info!(action = "set_synchronous_standby", reason = "durability change", standby = ?standby, "synchronous standby set");
    Ok(())
}

/// Whether live settings show the fence in place.
pub async fn is_fenced(conninfo: &str) -> Result<bool, PgError> {
    let client = connect(conninfo).await?;
    let row = client
        .query_one(
            "SELECT current_setting('synchronous_standby_names'), current_setting('default_transaction_read_only')",
            &[],
        )
        .await
        .map_err(q("read fence settings"))?;
    Ok(decide::is_fenced(col(&row, 0)?, col(&row, 1)?))
}

/// The handover steps' precondition, from a row whose first three columns
/// are `pg_is_in_recovery()`, `synchronous_standby_names` and
/// `default_transaction_read_only`: a primary, fenced; `unfenced` says why
/// an unfenced one is refused.
fn require_fenced_primary(row: &tokio_postgres::Row, unfenced: &str) -> Result<(), PgError> {
    if col::<bool>(row, 0)? {
        return Err(PgError::Refused("the server is a standby".into()));
    }
    if !decide::is_fenced(col(row, 1)?, col(row, 2)?) {
        return Err(PgError::Refused(format!(
            "the server is not fenced: {unfenced}"
        )));
    }
    Ok(())
}

/// A fenced primary's WAL insert position (where its next record goes).
/// A planned handover over a connection records it as the final position
/// the successor must replay past: the shutdown checkpoint lands after it.
pub async fn fenced_wal_end(conninfo: &str) -> Result<Lsn, PgError> {
    let client = connect(conninfo).await?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), \
             current_setting('default_transaction_read_only'), \
             CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END",
            &[],
        )
        .await
        .map_err(q("read WAL end"))?;
    require_fenced_primary(&row, "its WAL end still moves")?;
    lsn_opt(col(&row, 3)?)?.ok_or_else(|| PgError::BadLsn("NULL".into()))
}

/// What [`stop_to_follow`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    pub data_directory: String,
    /// The postmaster that was asked to shut down.
    pub postmaster_pid: u32,
    pub took: Duration,
}

/// Planned handover without the server's host: makes the fenced primary
/// start as a standby of `primary_conninfo` the next time it starts
/// (`primary_conninfo` by ALTER SYSTEM, an empty `standby.signal` written by
/// `COPY`), then asks its postmaster for a fast shutdown (SIGINT, sent by
/// `COPY ... TO PROGRAM`: superuser or `pg_execute_server_program`). Its
/// walsenders send every record up to the shutdown checkpoint to the
/// connected standby and wait for it to confirm before the postmaster exits.
/// Whatever supervises the server (kubelet, systemd) starts it again, and it
/// streams from the new primary without a rebuild: its WAL is a prefix of
/// the successor's. Refuses a standby or an unfenced primary.
pub async fn stop_to_follow(conninfo: &str, primary_conninfo: &str) -> Result<StopReport, PgError> {
    let t0 = Instant::now();
    let client = connect(conninfo).await?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), \
             current_setting('default_transaction_read_only'), \
             current_setting('data_directory'), pg_read_file('postmaster.pid')",
            &[],
        )
        .await
        .map_err(q("read server state"))?;
    require_fenced_primary(
        &row,
        "a primary stops for a handover only after it stopped acknowledging writes",
    )?;
    let data_directory: String = col(&row, 3)?;
    let pid_file: String = col(&row, 4)?;
    let pid = decide::postmaster_pid(&pid_file)
        .ok_or_else(|| PgError::Refused("postmaster.pid holds no pid".into()))?;
    alter_system(
        &client,
        &[("primary_conninfo", primary_conninfo.to_string())],
        &[],
    )
    .await?;
    let signal_file = format!("{}/standby.signal", data_directory.trim_end_matches('/'));
    client
        .batch_execute(&format!(
            "COPY (SELECT WHERE false) TO {}",
            decide::sql_literal(&signal_file)
        ))
        .await
        .map_err(q("write standby.signal"))?;
    // The postmaster terminates this session as part of the shutdown: an
    // admin-shutdown error or a closed connection is the expected answer.
    match client
        .batch_execute(&format!(
            "COPY (SELECT WHERE false) TO PROGRAM 'kill -INT {pid}'"
        ))
        .await
    {
        Ok(()) => {}
        Err(e)
            if e.is_closed()
                || e.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN) => {}
        Err(e) => {
            return Err(PgError::Query {
                what: "ask the postmaster for a fast shutdown",
                source: e,
            })
        }
    }
    let report = StopReport {
        data_directory,
        postmaster_pid: pid,
        took: t0.elapsed(),
    };
    tracing::info!(
        action = "stop_for_handover",
        reason = "planned handover: restart as the successor's standby",
        postmaster_pid = pid,
        took_ms = report.took.as_secs_f64() * 1e3,
        "standby.signal and primary_conninfo written; fast shutdown requested"
    );
    Ok(report)
}

async fn standby_status_on(client: &Client) -> Result<StandbyStatus, PgError> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text",
            &[],
        )
        .await
        .map_err(q("standby status"))?;
    Ok(StandbyStatus {
        in_recovery: col(&row, 0)?,
        received: lsn_opt(col(&row, 1)?)?,
        replayed: lsn_opt(col(&row, 2)?)?,
    })
}

/// A standby's received and replayed positions and its catch-up verdict.
pub async fn standby_status(conninfo: &str) -> Result<(StandbyStatus, CatchUp), PgError> {
    let client = connect(conninfo).await?;
    let status = standby_status_on(&client).await?;
    let verdict = decide::catch_up(&status);
    Ok((status, verdict))
}

/// Bounds for a promotion.
#[derive(Debug, Clone, Copy)]
pub struct PromoteOptions {
    /// Longest wait for replay to reach the received position.
    pub catch_up_timeout: Duration,
    /// Pause between catch-up polls.
    pub poll_interval: Duration,
    /// pg_promote's own wait, seconds.
    pub promote_wait_secs: i32,
}

impl Default for PromoteOptions {
    fn default() -> Self {
        PromoteOptions {
            catch_up_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(5),
            promote_wait_secs: 30,
        }
    }
}

/// What a promotion did (invariant 4: the LSN it promoted at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotionReport {
    /// The server was already out of recovery: nothing was done.
    pub already_primary: bool,
    /// Replayed (= received) position when promotion was requested.
    pub lsn_at_promotion: Option<Lsn>,
    /// Received position at that moment (None: nothing streamed since start).
    pub received_at_promotion: Option<Lsn>,
    /// First WAL insert position as primary.
    pub primary_lsn_after: Option<Lsn>,
    pub catch_up_wait: Duration,
    pub catch_up_polls: u32,
    pub promote: Duration,
    pub total: Duration,
}

/// Promote a standby: wait (bounded, tight polling) until it has replayed
/// all WAL it received, then pg_promote and poll until out of recovery. Idempotent: a server
/// already out of recovery is reported as such, not promoted again.
pub async fn promote(conninfo: &str, opts: PromoteOptions) -> Result<PromotionReport, PgError> {
    let t0 = Instant::now();
    let client = connect(conninfo).await?;
    let wait_start = Instant::now();
    let mut polls = 0u32;
    let status = loop {
        let status = standby_status_on(&client).await?;
        polls += 1;
        match decide::catch_up(&status) {
            CatchUp::NotStandby => {
                tracing::info!(
                    action = "promote",
                    reason = "already out of recovery",
                    "nothing to promote"
                );
                return Ok(PromotionReport {
                    already_primary: true,
                    lsn_at_promotion: None,
                    received_at_promotion: None,
                    primary_lsn_after: None,
                    catch_up_wait: wait_start.elapsed(),
                    catch_up_polls: polls,
                    promote: Duration::ZERO,
                    total: t0.elapsed(),
                });
            }
            CatchUp::CaughtUp { .. } => break status,
            CatchUp::Behind { .. } | CatchUp::Unknown => {
                if wait_start.elapsed() >= opts.catch_up_timeout {
                    let show =
                        |l: Option<Lsn>| l.map_or_else(|| "none".to_string(), |l| l.to_string());
                    return Err(PgError::NotCaughtUp {
                        waited: wait_start.elapsed(),
                        received: show(status.received),
                        replayed: show(status.replayed),
                    });
                }
                tokio::time::sleep(opts.poll_interval).await;
            }
        }
    };
    let catch_up_wait = wait_start.elapsed();

    let t1 = Instant::now();
    // pg_promote(wait => true) polls in 100 ms steps; ask without waiting and
    // poll tightly instead.
    let signalled = client
        .query_one("SELECT pg_promote(false)", &[])
        .await
        .map_err(q("pg_promote"))?;
    let signalled: bool = col(&signalled, 0)?;
    if !signalled {
        return Err(PgError::PromoteFailed(opts.promote_wait_secs));
    }
    let bound = Duration::from_secs(u64::try_from(opts.promote_wait_secs).unwrap_or(0));
    loop {
        let in_recovery = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(q("wait for promotion"))?;
        let in_recovery: bool = col(&in_recovery, 0)?;
        if !in_recovery {
            break;
        }
        if t1.elapsed() > bound {
            return Err(PgError::PromoteFailed(opts.promote_wait_secs));
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
    let promote_d = t1.elapsed();
    let after = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(q("current lsn after promotion"))?;
    let after: Option<String> = col(&after, 0)?;
    let report = PromotionReport {
        already_primary: false,
        lsn_at_promotion: status.replayed,
        received_at_promotion: status.received,
        primary_lsn_after: lsn_opt(after)?,
        catch_up_wait,
        catch_up_polls: polls,
        promote: promote_d,
        total: t0.elapsed(),
    };
    tracing::info!(
        action = "promote",
        reason = "standby caught up",
        lsn = %report.lsn_at_promotion.map(|l| l.to_string()).unwrap_or_default(),
        catch_up_ms = report.catch_up_wait.as_secs_f64() * 1e3,
        promote_ms = report.promote.as_secs_f64() * 1e3,
        "standby promoted"
    );
    Ok(report)
}

/// Primary-side facts the agent records at the witness (invariant 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryFacts {
    pub in_recovery: bool,
    pub current_lsn: Option<Lsn>,
    pub synchronous_commit: String,
    pub synchronous_standby_names: String,
    /// remote_apply with a non-empty standby list.
    pub strict: bool,
    pub fenced: bool,
    /// Standbys that are synchronous right now.
    pub sync_standbys: Vec<SyncStandby>,
}

impl PrimaryFacts {
    /// The one synchronous standby, if exactly one is.
    pub fn sync_standby(&self) -> Option<&SyncStandby> {
        match self.sync_standbys.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// LSN every synchronous standby has applied (what is safe to promote to).
    pub fn confirmed_lsn(&self) -> Option<Lsn> {
        self.sync_standbys.iter().map(|s| s.replay).min().flatten()
    }
}

/// Read which standby is synchronous and what it confirmed.
pub async fn primary_facts(conninfo: &str) -> Result<PrimaryFacts, PgError> {
    let client = connect(conninfo).await?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
             current_setting('synchronous_commit'), current_setting('synchronous_standby_names'), \
             current_setting('default_transaction_read_only')",
            &[],
        )
        .await
        .map_err(q("primary settings"))?;
    let rows = client
        .query(
            "SELECT coalesce(application_name, ''), coalesce(state, ''), coalesce(sync_state, ''), \
             flush_lsn::text, replay_lsn::text FROM pg_stat_replication",
            &[],
        )
        .await
        .map_err(q("pg_stat_replication"))?;
    let mut repl = Vec::with_capacity(rows.len());
    for r in &rows {
        repl.push(ReplicationRow {
            application_name: col(r, 0)?,
            state: col(r, 1)?,
            sync_state: col(r, 2)?,
            flush: lsn_opt(col(r, 3)?)?,
            replay: lsn_opt(col(r, 4)?)?,
        });
    }
    let synchronous_commit: String = col(&row, 2)?;
    let names: String = col(&row, 3)?;
    let read_only: String = col(&row, 4)?;
    Ok(PrimaryFacts {
        in_recovery: col(&row, 0)?,
        current_lsn: lsn_opt(col(&row, 1)?)?,
        strict: decide::strict_sync(&synchronous_commit, &names),
        fenced: decide::is_fenced(&names, &read_only),
        synchronous_commit,
        synchronous_standby_names: names,
        sync_standbys: decide::sync_standbys(&repl),
    })
}

/// The server's newest timeline and that timeline's history file (empty
/// when it never forked), for [`super::decide::follows_without_rewind`].
pub async fn timeline_history(conninfo: &str) -> Result<(u32, String), PgError> {
    let client = connect(conninfo).await?;
    let row = client
        .query_opt(
            "SELECT name, pg_read_file('pg_wal/' || name) FROM pg_ls_waldir() \
             WHERE name ~ '^[0-9A-F]{8}\\.history$' ORDER BY name DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(q("timeline history"))?;
    if let Some(row) = row {
        let name: String = col(&row, 0)?;
        let text: String = col(&row, 1)?;
        let tli = name
            .get(..8)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| PgError::BadLsn(name.clone()))?;
        return Ok((tli, text));
    }
    let row = client
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .map_err(q("timeline id"))?;
    let tli: i32 = col(&row, 0)?;
    Ok((u32::try_from(tli).unwrap_or(1), String::new()))
}
