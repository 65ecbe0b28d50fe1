//! Planned switchover and failback with `continuum-agent switchover`, real
//! PostgreSQL (strict `remote_apply`), real witness and agent processes, a
//! writer committing throughout (docs/switchover.md):
//!
//! * A -> B and back B -> A: no acknowledged write lost, no write
//!   acknowledged by the old primary after the new one's first (never two
//!   primaries), and the old primary each time becomes a streaming replica
//!   of the new one without pg_rewind or a base backup;
//! * the old primary's agent killed (SIGKILL) in the middle of a handover:
//!   the system ends with exactly one writable primary holding the lease and
//!   every acknowledged write on it;
//! * `--rejoin rewind`: a primary killed with its whole region comes back,
//!   sees the newer epoch, stays fenced and rebuilds itself as a replica.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use continuum_tests::drill::{self, writer, Cluster, DrillOpts};

const TTL_MS: u64 = 2000;

fn opts() -> DrillOpts {
    DrillOpts {
        iterations: 1,
        witnesses: 1,
        ttl_ms: TTL_MS,
        warmup: Duration::from_millis(1500),
    }
}

fn settle() -> Duration {
    Duration::from_secs(40)
}

/// `application_name`s streaming from `region`'s database.
async fn streaming_from(cluster: &Cluster, region: usize) -> Vec<String> {
    let c = cluster.pg[region].connect().await.unwrap();
    c.query(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn in_recovery(cluster: &Cluster, region: usize) -> Option<bool> {
    let c = cluster.pg[region].connect().await.ok()?;
    let r = c.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
    Some(r.get(0))
}

/// Waits until `follower` streams from `primary` as a standby.
async fn wait_following(cluster: &Cluster, primary: usize, follower: usize) {
    let name = drill::REGION_NAMES[follower].to_string();
    let start = Instant::now();
    loop {
        if in_recovery(cluster, follower).await == Some(true)
            && streaming_from(cluster, primary).await.contains(&name)
        {
            return;
        }
        assert!(
            start.elapsed() < settle(),
            "{name} does not stream from {} as a standby\nagent log:\n{}\npg log:\n{}",
            drill::REGION_NAMES[primary],
            cluster.agent_log_tail(follower),
            cluster.pg[follower].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_and_failback_lose_nothing_and_need_no_rebuild() {
    let mut cluster = Cluster::new(1, TTL_MS, 20_000, "off").await.unwrap();
    cluster.start_agent(0).unwrap();
    cluster.start_agent(1).unwrap();
    cluster.wait_steady(0, 1, settle()).await.unwrap();
    let before = cluster.view().await.unwrap().max_epoch;

    let mut next_id = 1;
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let sw = drill::switchover_phase(&mut cluster, from, to, &mut next_id, &opts())
            .await
            .unwrap();
        eprintln!(
            "switchover {} -> {}: downtime (fence to first write) {:?} ms, client gap {:?} ms, {} acked; command said {}",
            drill::REGION_NAMES[from],
            drill::REGION_NAMES[to],
            sw.downtime_ms,
            sw.gap_ms,
            sw.acked,
            sw.output.trim()
        );
        assert!(
            sw.output.contains("\"switchover\":\"done\""),
            "{}",
            sw.output
        );
        assert!(sw.acked > 0, "the writer committed during the switchover");
        assert_eq!(sw.lost, 0, "acknowledged writes lost");
        assert_eq!(
            sw.split, 0,
            "the old primary acknowledged after the new one"
        );
        assert!(sw.gap_ms.is_some(), "both regions acknowledged writes");
        assert!(!sw.rebuilt, "the old primary needed pg_rewind");
        // The old primary is now a streaming replica of the new one, and the
        // new primary requires it again as its synchronous standby.
        wait_following(&cluster, to, from).await;
        cluster.wait_steady(to, from, settle()).await.unwrap();
        let log = cluster.agent_log(from);
        assert!(log.contains("no rebuild"), "follow without rebuild:\n{log}");
        assert!(!log.contains("rewinding before following"), "{log}");
    }
    let after = cluster.view().await.unwrap().max_epoch;
    assert_eq!(after.0, before.0 + 2, "one new epoch per switchover");
    // Running it again is a no-op.
    let again = tokio::task::block_in_place(|| cluster.switchover(0, 20)).unwrap();
    assert!(again.contains("nothing to do"), "{again}");
}

/// POST /failover/handover?to= on an agent's admin endpoint.
fn post_handover(cluster: &Cluster, region: usize, to: &str) -> (u16, String) {
    let url = cluster.admin_url(region);
    let hostport = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    write!(
        s,
        "POST /failover/handover?to={to} HTTP/1.0\r\nHost: {hostport}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (code, buf)
}

/// Which regions are primaries that acknowledge a write right now.
async fn writable(cluster: &Cluster) -> Vec<usize> {
    let mut out = Vec::new();
    for r in 0..2 {
        if cluster.accepts_write(r).await {
            out.push(r);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_primary_agent_killed_mid_handover_ends_safe() {
    let mut cluster = Cluster::new(1, TTL_MS, 4_000, "off").await.unwrap();
    cluster.start_agent(0).unwrap();
    cluster.start_agent(1).unwrap();
    cluster.wait_steady(0, 1, settle()).await.unwrap();

    let conninfos: Vec<String> = cluster.pg.iter().map(|p| p.conninfo()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer::run(conninfos, 0, 1, stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A standby refuses to hand over; the primary accepts.
    let (code, body) = tokio::task::block_in_place(|| post_handover(&cluster, 1, "region-a"));
    assert_eq!(code, 409, "{body}");
    let (code, body) = tokio::task::block_in_place(|| post_handover(&cluster, 0, "region-b"));
    assert_eq!(code, 202, "{body}");
    // Kill the old primary's agent as soon as it reports the handover.
    let start = Instant::now();
    loop {
        let st = cluster.admin_status(0).unwrap_or_default();
        if st["handover"]["to"] == "region-b" {
            eprintln!(
                "killing region-a's agent at handover state {}",
                st["handover"]
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no handover started: {st}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill_agent(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.start_agent(0).unwrap();

    // Whatever step it died at, one region ends up the only writable
    // primary holding a NEW epoch (the old one after the intent's timeout,
    // or the successor). Until then the old grant may still be live.
    let start = Instant::now();
    let winner = loop {
        let v = cluster.view().await;
        let holder = v
            .as_ref()
            .and_then(|v| v.holder.as_ref())
            .filter(|(_, e)| e.0 >= 2)
            .map(|(h, _)| h.as_str().to_string());
        let w = writable(&cluster).await;
        if let (Some(h), [one]) = (holder, w.as_slice()) {
            if h == drill::REGION_NAMES[*one] {
                break *one;
            }
        }
        assert!(w.len() < 2, "two writable primaries: {w:?}");
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "no single writable primary\nagent a:\n{}\nagent b:\n{}",
            cluster.agent_log_tail(0),
            cluster.agent_log_tail(1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let log = w.await.unwrap();
    eprintln!(
        "after the kill, {} is primary; {} acked writes",
        drill::REGION_NAMES[winner],
        log.acks.len()
    );
    assert_eq!(
        writable(&cluster).await,
        vec![winner],
        "exactly one primary\nagent a:\n{}\nagent b:\n{}",
        cluster.agent_log_tail(0),
        cluster.agent_log_tail(1)
    );
    let present = cluster.acked_present(winner, &log).await.unwrap();
    assert_eq!(present, log.acks.len() as i64, "acknowledged writes lost");
    // Acknowledgements never interleave between regions.
    let switches = log
        .acks
        .windows(2)
        .filter(|p| p[0].region != p[1].region)
        .count();
    assert!(switches <= 1, "{switches} switches between regions");
    assert!(
        log.acks.last().is_some_and(|a| a.region == winner),
        "the last acknowledged write came from the winner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_rejoins_by_itself_with_rejoin_rewind() {
    let mut cluster = Cluster::new(1, TTL_MS, 4_000, "rewind").await.unwrap();
    cluster.start_agent(0).unwrap();
    cluster.start_agent(1).unwrap();
    cluster.wait_steady(0, 1, settle()).await.unwrap();
    // Region A dies whole; B takes over.
    cluster.kill_agent(0);
    tokio::task::block_in_place(|| cluster.pg[0].kill9()).unwrap();
    let start = Instant::now();
    while !cluster.accepts_write(1).await {
        assert!(start.elapsed() < settle(), "{}", cluster.agent_log_tail(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = cluster.pg[1].connect().await.unwrap();
    c.execute("INSERT INTO drill_writes (id, region) VALUES (-1, 1)", &[])
        .await
        .unwrap();
    // A comes back as it was (a primary, possibly unfenced): its agent
    // fences it, sees the newer epoch and rebuilds it as B's standby.
    tokio::task::block_in_place(|| cluster.pg[0].start()).unwrap();
    cluster.start_agent(0).unwrap();
    wait_following(&cluster, 1, 0).await;
    // The agent logs the rebuild once pg_ctl saw the server up.
    let start = Instant::now();
    while !cluster.agent_log(0).contains("rebuilt as a standby") {
        assert!(start.elapsed() < settle(), "{}", cluster.agent_log(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = cluster.pg[0].connect().await.unwrap();
    let start = Instant::now();
    loop {
        let n: i64 = a
            .query_one("SELECT count(*) FROM drill_writes WHERE id = -1", &[])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(start.elapsed() < settle(), "B's write never reached A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It never acknowledged a write as primary again.
    assert_eq!(writable(&cluster).await, vec![1]);
}

/// A restarted agent (SIGKILL of the agent alone, its database running:
/// an upgrade, an OOM kill) continues its region's grant by renewal: the
/// primary is not fenced, no new epoch is granted, the standby does not
/// take over, and every acknowledged write stays on the one primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_primary_agent_adopts_its_lease_without_fencing() {
    let mut cluster = Cluster::new(1, TTL_MS, 4_000, "off").await.unwrap();
    cluster.start_agent(0).unwrap();
    cluster.start_agent(1).unwrap();
    cluster.wait_steady(0, 1, settle()).await.unwrap();
    let before = cluster.view().await.and_then(|v| v.holder).unwrap();
    assert_eq!(before.0.as_str(), "region-a");

    let conninfos: Vec<String> = cluster.pg.iter().map(|p| p.conninfo()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer::run(conninfos, 0, 1, stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;

    let log_before = cluster.agent_log(0).len();
    cluster.kill_agent(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.start_agent(0).unwrap();
    // Three TTLs: long past the killed process's deadline and the witness TTL.
    tokio::time::sleep(Duration::from_millis(3 * TTL_MS)).await;
    stop.store(true, Ordering::Relaxed);
    let log = w.await.unwrap();

    let after_restart = cluster.agent_log(0)[log_before..].to_string();
    let applied = |action: &str| {
        after_restart.lines().any(|l| {
            l.contains("failover action applied") && l.contains(&format!("\"action\":\"{action}\""))
        })
    };
    assert!(
        applied("adopt"),
        "the restarted agent adopts its grant:\n{after_restart}"
    );
    assert!(
        !applied("fence") && !applied("acquire"),
        "no fence, no new epoch after the restart:\n{after_restart}"
    );
    let now = cluster.view().await.and_then(|v| v.holder);
    assert_eq!(
        now.as_ref().map(|(h, e)| (h.as_str(), *e)),
        Some(("region-a", before.1)),
        "same holder, same epoch: no failover\nagent b:\n{}",
        cluster.agent_log_tail(1)
    );
    assert_eq!(
        writable(&cluster).await,
        vec![0],
        "region-a still the only primary"
    );
    assert!(!log.acks.is_empty());
    assert!(
        log.acks.iter().all(|a| a.region == 0),
        "every write acknowledged by region-a"
    );
    let on_standby = cluster.acked_present(1, &log).await.unwrap();
    assert_eq!(
        on_standby,
        log.acks.len() as i64,
        "strict remote_apply: every ack on the standby"
    );
    eprintln!(
        "agent restarted: epoch {} kept, {} writes acknowledged across the restart",
        before.1,
        log.acks.len()
    );
}
