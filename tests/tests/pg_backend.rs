//! The direct-PostgreSQL failover back-end against real PostgreSQL: strict
//! synchronous replication, fencing under a live writer, region kill and
//! promotion with zero lost acknowledged writes, and a former primary that
//! never acknowledges a write again (invariants 2, 4, 5).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use continuum_shared::pg::backend::{self, PromoteOptions};
use continuum_shared::pg::decide::CatchUp;
use continuum_tests::pg_proc::PgRegion;

const OP_BOUND: Duration = Duration::from_secs(1);

fn pair(a: &str, b: &str) -> (PgRegion, PgRegion) {
    let primary = PgRegion::primary(a, b).expect("primary");
    let standby = PgRegion::standby_of(&primary, b).expect("standby");
    (primary, standby)
}

async fn create_table(primary: &PgRegion) {
    let c = primary.connect().await.unwrap();
    // Blocks until the standby applied it: remote_apply.
    tokio::time::timeout(
        Duration::from_secs(20),
        c.batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)"),
    )
    .await
    .expect("create table acknowledged by the standby")
    .unwrap();
}

async fn ids_on(region: &PgRegion) -> BTreeSet<i64> {
    let c = region.connect().await.unwrap();
    c.query("SELECT id FROM acked", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// One acknowledged insert: its id and when the attempt started and returned.
#[derive(Debug, Clone, Copy)]
struct Ack {
    id: i64,
    started: Instant,
}

#[derive(Default)]
struct Log {
    acks: Vec<Ack>,
    failures: u64,
}

/// Inserts `id` and asserts the commit is acknowledged within `bound`.
async fn insert_acked(c: &tokio_postgres::Client, id: i64, bound: Duration, why: &str) {
    let n = tokio::time::timeout(
        bound,
        c.execute("INSERT INTO acked (id) VALUES ($1)", &[&id]),
    )
    .await
    .expect(why)
    .unwrap();
    assert_eq!(n, 1, "{why}");
}

/// Commits inserts in a loop, one new id per attempt, reconnecting after
/// errors, recording every acknowledged id. `read_write` makes each session
/// override the read-only default (a client that ignores the fence's second
/// level, to test the first).
fn spawn_writer(
    conninfo: String,
    first_id: i64,
    read_write: bool,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut id = first_id;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::SeqCst) {
            if client.is_none() {
                match tokio::time::timeout(OP_BOUND, backend::connect(&conninfo)).await {
                    Ok(Ok(c)) => {
                        if read_write
                            && c.batch_execute("SET default_transaction_read_only = off")
                                .await
                                .is_err()
                        {
                            continue;
                        }
                        client = Some(c);
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            id += 1;
            let started = Instant::now();
            let res = tokio::time::timeout(
                OP_BOUND,
                c.execute("INSERT INTO acked (id) VALUES ($1)", &[&id]),
            )
            .await;
            match res {
                Ok(Ok(1)) => log.lock().unwrap().acks.push(Ack { id, started }),
                Ok(Ok(_)) => panic!("insert touched an unexpected number of rows"),
                Ok(Err(_)) | Err(_) => {
                    log.lock().unwrap().failures += 1;
                    // Timed-out or failed: this session is done (its commit, if
                    // any, was never acknowledged).
                    client = None;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_apply_is_strict_commit_waits_for_the_standby() {
    let (primary, mut standby) = pair("strict-a", "strict-b");
    create_table(&primary).await;
    let facts = backend::primary_facts(&primary.conninfo()).await.unwrap();
    assert!(facts.strict, "{facts:?}");
    assert_eq!(
        facts.sync_standby().map(|s| s.application_name.as_str()),
        Some("strict-b")
    );
    assert!(facts.confirmed_lsn().is_some());

    tokio::task::block_in_place(|| standby.kill9()).unwrap();
    let acked = Arc::new(AtomicBool::new(false));
    let c = primary.connect().await.unwrap();
    let flag = acked.clone();
    let commit = tokio::spawn(async move {
        let r = c.execute("INSERT INTO acked (id) VALUES (42)", &[]).await;
        flag.store(true, Ordering::SeqCst);
        r
    });
    // With the standby gone, the commit must not be acknowledged (no async fallback).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !acked.load(Ordering::SeqCst),
        "commit acknowledged while the synchronous standby was down"
    );
    let facts = backend::primary_facts(&primary.conninfo()).await.unwrap();
    assert!(facts.sync_standby().is_none());

    tokio::task::block_in_place(|| standby.start()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), commit)
        .await
        .expect("commit completes once the standby is back")
        .unwrap();
    assert_eq!(r.unwrap(), 1);
    // remote_apply: acknowledged means already visible on the standby.
    assert!(ids_on(&standby).await.contains(&42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_stops_acknowledgements_and_every_ack_is_on_the_standby() {
    let (mut primary, standby) = pair("fence-a", "fence-b");
    create_table(&primary).await;
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Log::default()));
    let rogue_log = Arc::new(Mutex::new(Log::default()));
    let w1 = spawn_writer(primary.conninfo(), 0, false, stop.clone(), log.clone());
    let w2 = spawn_writer(
        primary.conninfo(),
        1_000_000_000,
        true,
        stop.clone(),
        rogue_log.clone(),
    );
    // Let both commit for a while.
    let t = Instant::now();
    while (log.lock().unwrap().acks.len() < 20 || rogue_log.lock().unwrap().acks.len() < 20)
        && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let report = backend::fence(&primary.conninfo()).await.unwrap();
    let fenced_at = Instant::now();
    eprintln!("fence report: {report:?}");
    // Writers keep trying for longer than one operation bound.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    w1.await.unwrap();
    w2.await.unwrap();

    let on_standby = ids_on(&standby).await;
    for (who, log) in [("writer", &log), ("read-write writer", &rogue_log)] {
        let log = log.lock().unwrap();
        assert!(log.acks.len() >= 20, "{who} committed before the fence");
        let after: Vec<_> = log.acks.iter().filter(|a| a.started > fenced_at).collect();
        assert!(
            after.is_empty(),
            "{who}: acknowledged after fence returned: {after:?}"
        );
        let lost: Vec<_> = log
            .acks
            .iter()
            .filter(|a| !on_standby.contains(&a.id))
            .collect();
        assert!(
            lost.is_empty(),
            "{who}: acknowledged but not on the standby: {lost:?}"
        );
        assert!(log.failures > 0, "{who} kept trying after the fence");
    }
    assert!(backend::is_fenced(&primary.conninfo()).await.unwrap());
    let facts = backend::primary_facts(&primary.conninfo()).await.unwrap();
    assert!(facts.fenced && facts.sync_standby().is_none(), "{facts:?}");

    // New session with defaults: refused outright.
    let c = primary.connect().await.unwrap();
    let err = c
        .execute("INSERT INTO acked (id) VALUES (-1)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );

    // The fence survives a crash: killed and restarted without any agent,
    // the server comes back fenced (invariant 5).
    tokio::task::block_in_place(|| {
        primary.kill9()?;
        primary.start()
    })
    .unwrap();
    assert!(backend::is_fenced(&primary.conninfo()).await.unwrap());
    let c = primary.connect().await.unwrap();
    let err = c
        .execute("INSERT INTO acked (id) VALUES (-3)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );

    // Planned switchback: unfence restores acknowledged writes.
    backend::unfence(&primary.conninfo(), Some("fence-b"))
        .await
        .unwrap();
    let c = primary.connect().await.unwrap();
    insert_acked(
        &c,
        -2,
        Duration::from_secs(10),
        "acknowledged after unfence",
    )
    .await;
    assert!(ids_on(&standby).await.contains(&-2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_kill_promote_loses_no_acked_write_and_old_primary_stays_fenced() {
    let (mut primary, standby) = pair("kill-a", "kill-b");
    create_table(&primary).await;
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Log::default()));
    let w = spawn_writer(primary.conninfo(), 0, false, stop.clone(), log.clone());
    let t = Instant::now();
    while log.lock().unwrap().acks.len() < 200 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let killed_at = Instant::now();
    let pids = primary.pids();
    assert!(pids.len() > 3, "postmaster and its children: {pids:?}");
    tokio::task::block_in_place(|| primary.kill9()).unwrap();
    assert!(primary.pids().is_empty());

    let (status, verdict) = backend::standby_status(&standby.conninfo()).await.unwrap();
    assert!(status.in_recovery);
    eprintln!("standby after kill: {status:?} -> {verdict:?}");
    let report = backend::promote(&standby.conninfo(), PromoteOptions::default())
        .await
        .unwrap();
    let promoted_in = killed_at.elapsed();
    eprintln!("promotion report: {report:?}; kill to promoted: {promoted_in:?}");
    assert!(!report.already_primary);
    assert!(report.lsn_at_promotion.is_some());
    stop.store(true, Ordering::SeqCst);
    w.await.unwrap();

    // Zero lost acknowledged writes.
    let on_b = ids_on(&standby).await;
    let acks = log.lock().unwrap().acks.clone();
    assert!(acks.len() >= 200);
    let lost: Vec<_> = acks
        .iter()
        .filter(|a| !on_b.contains(&a.id))
        .map(|a| a.id)
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "region kill: {} acknowledged writes, {} lost, {} failed attempts",
        acks.len(),
        lost.len(),
        log.lock().unwrap().failures
    );

    // Promoting again is a no-op.
    let again = backend::promote(&standby.conninfo(), PromoteOptions::default())
        .await
        .unwrap();
    assert!(again.already_primary);
    let (_, verdict) = backend::standby_status(&standby.conninfo()).await.unwrap();
    assert_eq!(verdict, CatchUp::NotStandby);

    // B is strict towards A, which is gone: the controller records "no
    // synchronous standby" at the witness, then weakens durability.
    backend::set_synchronous_standby(&standby.conninfo(), None)
        .await
        .unwrap();
    let b = standby.connect().await.unwrap();
    insert_acked(
        &b,
        -10,
        Duration::from_secs(5),
        "promoted standby accepts writes",
    )
    .await;

    // A comes back by itself (no agent): still configured as primary, but
    // nobody can acknowledge its commits.
    tokio::task::block_in_place(|| primary.start()).unwrap();
    let a = primary.connect().await.unwrap();
    let in_recovery: bool = a
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);
    let r = tokio::time::timeout(
        Duration::from_millis(1500),
        a.execute("INSERT INTO acked (id) VALUES (-20)", &[]),
    )
    .await;
    assert!(
        r.is_err(),
        "returned former primary acknowledged a write: {r:?}"
    );
    // The agent fences it.
    backend::fence(&primary.conninfo()).await.unwrap();
    let a = primary.connect().await.unwrap();
    let err = a
        .execute("INSERT INTO acked (id) VALUES (-21)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );

    // Rejoin without rebuild: restarted as a fenced standby of B, it cannot write at all.
    tokio::task::block_in_place(|| primary.follow_fenced(&standby)).unwrap();
    let a = primary.connect().await.unwrap();
    let in_recovery: bool = a
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "former primary came back as primary");
    let err = a
        .execute("INSERT INTO acked (id) VALUES (-22)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );

    // Rebuild with pg_rewind: A follows B again and B is strict again.
    let rebuilt = primary.rewind_onto(&standby).await.unwrap();
    eprintln!("rewind took {:?}", rebuilt.duration);
    backend::set_synchronous_standby(&standby.conninfo(), Some("kill-a"))
        .await
        .unwrap();
    insert_acked(
        &b,
        -30,
        Duration::from_secs(20),
        "B's commit acknowledged by the rebuilt A",
    )
    .await;
    let on_a = ids_on(&primary).await;
    assert!(on_a.contains(&-30) && on_a.contains(&-10));
    assert!(
        !on_a.contains(&-20),
        "A's unacknowledged local commit was rewound away"
    );
    let facts = backend::primary_facts(&standby.conninfo()).await.unwrap();
    assert_eq!(
        facts.sync_standby().map(|s| s.application_name.as_str()),
        Some("kill-a")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_waits_for_replay_and_old_primary_rebuilds_by_basebackup() {
    let (mut primary, standby) = pair("catch-a", "catch-b");
    create_table(&primary).await;
    let b = standby.connect().await.unwrap();
    b.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    // Asynchronous for this test only, so WAL arrives that the paused standby
    // has not replayed (with remote_apply the commits would wait instead).
    backend::set_synchronous_standby(&primary.conninfo(), None)
        .await
        .unwrap();
    let a = primary.connect().await.unwrap();
    a.batch_execute("INSERT INTO acked SELECT generate_series(1, 500)")
        .await
        .unwrap();
    let facts = backend::primary_facts(&primary.conninfo()).await.unwrap();
    assert!(!facts.strict && facts.sync_standby().is_none(), "{facts:?}");
    backend::fence(&primary.conninfo()).await.unwrap();

    // Received but not replayed: behind.
    let t = Instant::now();
    let verdict = loop {
        let (_, v) = backend::standby_status(&standby.conninfo()).await.unwrap();
        if matches!(v, CatchUp::Behind { .. }) || t.elapsed() > Duration::from_secs(10) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(matches!(verdict, CatchUp::Behind { .. }), "{verdict:?}");

    // Invariant 4: no promotion while behind.
    let short = PromoteOptions {
        catch_up_timeout: Duration::from_millis(300),
        ..PromoteOptions::default()
    };
    let err = backend::promote(&standby.conninfo(), short)
        .await
        .unwrap_err();
    assert_eq!(err.label(), "not_caught_up", "{err}");
    let (status, _) = backend::standby_status(&standby.conninfo()).await.unwrap();
    assert!(status.in_recovery, "refused promotion left it a standby");

    // Replay resumes while promote() waits: it promotes once caught up.
    let resume = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .unwrap();
    });
    let report = backend::promote(&standby.conninfo(), PromoteOptions::default())
        .await
        .unwrap();
    resume.await.unwrap();
    eprintln!("promotion after catch-up wait: {report:?}");
    assert!(report.catch_up_polls > 1, "{report:?}");
    assert!(report.lsn_at_promotion >= report.received_at_promotion);
    let on_b = ids_on(&standby).await;
    assert!((1..=500).all(|i| on_b.contains(&i)));

    // Rebuild the old primary from a base backup; B requires it again.
    let rebuilt = primary.basebackup_onto(&standby).await.unwrap();
    eprintln!("basebackup rebuild took {:?}", rebuilt.duration);
    backend::set_synchronous_standby(&standby.conninfo(), Some("catch-a"))
        .await
        .unwrap();
    let b = standby.connect().await.unwrap();
    insert_acked(
        &b,
        -1,
        Duration::from_secs(20),
        "acknowledged by the rebuilt standby",
    )
    .await;
    assert!(ids_on(&primary).await.contains(&-1));
    let a = primary.connect().await.unwrap();
    let in_recovery: bool = a
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery);
}

/// Planned switchover: fence, clean stop, promote, and the old primary
/// follows the new one without any rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_old_primary_follows_without_rebuild() {
    let (mut primary, standby) = pair("sw-a", "sw-b");
    create_table(&primary).await;
    let a = primary.connect().await.unwrap();
    a.batch_execute("INSERT INTO acked SELECT generate_series(1, 100)")
        .await
        .unwrap();
    backend::fence(&primary.conninfo()).await.unwrap();
    // Fast shutdown sends the remaining WAL (up to the shutdown checkpoint).
    tokio::task::block_in_place(|| primary.stop()).unwrap();
    let report = backend::promote(&standby.conninfo(), PromoteOptions::default())
        .await
        .unwrap();
    eprintln!("switchover promotion: {report:?}");
    assert!(!report.already_primary);

    tokio::task::block_in_place(|| primary.follow_fenced(&standby)).unwrap();
    backend::set_synchronous_standby(&standby.conninfo(), Some("sw-a"))
        .await
        .unwrap();
    let b = standby.connect().await.unwrap();
    insert_acked(
        &b,
        -1,
        Duration::from_secs(20),
        "the old primary follows the new timeline and acknowledges",
    )
    .await;
    let on_a = ids_on(&primary).await;
    assert!(on_a.contains(&-1) && (1..=100).all(|i| on_a.contains(&i)));
    let facts = backend::primary_facts(&standby.conninfo()).await.unwrap();
    assert_eq!(
        facts.sync_standby().map(|s| s.application_name.as_str()),
        Some("sw-a")
    );
}

/// The partition case of invariant 2: the synchronous standby is unreachable,
/// commits hang, and the fence still completes and ends them unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_works_while_the_standby_is_gone() {
    let (primary, mut standby) = pair("gone-a", "gone-b");
    create_table(&primary).await;
    tokio::task::block_in_place(|| standby.kill9()).unwrap();
    let c = primary.connect().await.unwrap();
    let hanging =
        tokio::spawn(async move { c.execute("INSERT INTO acked (id) VALUES (7)", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!hanging.is_finished());

    let report = tokio::time::timeout(Duration::from_secs(10), backend::fence(&primary.conninfo()))
        .await
        .expect("fence does not wait for the standby")
        .unwrap();
    eprintln!("fence with standby gone: {report:?}");
    assert!(
        report.all_terminated && report.terminated >= 1,
        "{report:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .expect("the hanging commit ends when its backend is terminated")
        .unwrap();
    assert!(r.is_err(), "hanging commit was acknowledged: {r:?}");
    assert!(backend::is_fenced(&primary.conninfo()).await.unwrap());
}

/// The decision loop's kept session (`observe::ObserveConn`): one backend
/// serves every observation (no connection per tick), and when a fence
/// terminates it, the very next observation still answers, on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observation_session_is_kept_and_replaced_after_a_fence() {
    use continuum_agent::failover::observe::{self, ObserveConn, ObserveError};
    let (primary, _standby) = pair("a", "b");
    let conn = ObserveConn::default();
    let pid = |conn: &ObserveConn| {
        let conn = conn.clone();
        let info = primary.conninfo();
        async move {
            conn.run(
                &info,
                observe::observation(|c| {
                    Box::pin(async move {
                        let row = c
                            .query_one("SELECT pg_backend_pid()", &[])
                            .await
                            .map_err(ObserveError::Query)?;
                        Ok::<i32, ObserveError<tokio_postgres::Error>>(row.get(0))
                    })
                }),
            )
            .await
            .expect("observation")
        }
    };
    let first = pid(&conn).await;
    for _ in 0..20 {
        assert_eq!(pid(&conn).await, first, "the same session every tick");
    }
    let peer = continuum_shared::lease::HolderId::new("b").unwrap();
    let before = observe::database(&conn, &primary.conninfo(), &peer)
        .await
        .expect("database");
    assert!(before.primary && !before.fenced && before.peer_attached);
    // The fence terminates every client backend, the kept one included.
    backend::fence(&primary.conninfo()).await.expect("fence");
    let after = observe::database(&conn, &primary.conninfo(), &peer)
        .await
        .expect("answers right after the fence");
    assert!(after.primary && after.fenced);
    assert_ne!(
        pid(&conn).await,
        first,
        "a new session replaced the terminated one"
    );
}
