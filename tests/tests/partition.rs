//! The partition matrix (root only; skipped with a printed reason otherwise):
//! region A (primary), region B (strict synchronous standby) and the
//! witnesses each in their own network namespace, partitions made with
//! nftables rules that silently drop packets. Every case runs a writer that
//! records each acknowledged commit, and the checker asserts that no
//! acknowledged write is lost and that A acknowledged nothing once B held
//! the lease (no interval with two primaries). The last case disables the
//! agent's fence (debug-build test hook) and asserts the checker flags it.
//!
//! Cases run one at a time (they share the machine's two cores and the
//! namespaces' fixed link addresses), each bounded to well under a minute.
//! Build the agent and witness first when running this file alone:
//! `cargo build -p continuum-agent -p continuum-witness &&
//!  cargo test -p continuum-tests --test partition -- --nocapture`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use continuum_tests::netns;
use continuum_tests::partition::{
    CaseReport, Cluster, ClusterOpts, IF_FROM_W, IF_TO_PEER, IF_TO_W, LIBFAKETIME,
};

const TTL_MS: u64 = 2000;
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// None when the matrix can run here; otherwise prints why it is skipped.
async fn guard() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    let reason = REASON.get_or_init(|| {
        netns::unavailable_reason().or_else(|| {
            continuum_tests::drill::build_sibling_binaries()
                .err()
                .map(|e| format!("cannot build the agent and witness: {e:#}"))
        })
    });
    if let Some(r) = reason {
        continuum_tests::skip::skip("partition test", r);
        return None;
    }
    Some(SERIAL.lock().await)
}

fn ttl() -> Duration {
    Duration::from_millis(TTL_MS)
}

fn print(case: &str, r: &CaseReport) {
    eprintln!(
        "partition {case}: acked={} lost={} overlap={} survivor={} acks_a_after_fault={} acks_b={} \
         a_fenced_ms={:?} a_fence_logged_ms={:?} b_acquired_ms={:?} b_promoted_ms={:?}",
        r.verdict.acked,
        r.verdict.lost.len(),
        r.verdict.overlap.len(),
        r.survivor,
        r.acks_a_after_fault,
        r.acks_b,
        r.a_fenced_ms.map(|x| x.round()),
        r.a_fence_logged_ms.map(|x| x.round()),
        r.b_acquired_ms.map(|x| x.round()),
        r.b_promoted_ms.map(|x| x.round()),
    );
}

/// Runs the load, applies `fault`, waits until B promoted and acknowledged
/// writes for a moment (bounded), and evaluates.
async fn failover_case(
    opts: ClusterOpts,
    fault: impl FnOnce(&Cluster) -> anyhow::Result<()>,
) -> (Cluster, CaseReport) {
    let cluster = Cluster::start(opts).await.unwrap();
    let load = cluster.start_load(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    fault(&cluster).unwrap();
    let bound = ttl() * 4 + Duration::from_secs(15);
    let mut promoted: Option<Instant> = None;
    while fault_at.elapsed() < bound {
        if promoted.is_none() && matches!(cluster.pg[1].state().await, Some((false, _))) {
            promoted = Some(Instant::now());
        }
        // Let B acknowledge writes for a while after its promotion.
        if promoted.is_some_and(|p| p.elapsed() > Duration::from_secs(2)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = cluster.evaluate(load, fault_at).await.unwrap();
    (cluster, report)
}

/// Asserts a safe failover: no loss, no overlap, B took over, and A's fence
/// came before B's lease acquisition and promotion.
fn assert_safe_failover(case: &str, cluster: &Cluster, r: &CaseReport) {
    print(case, r);
    let diag = || cluster.diagnostics();
    assert_eq!(r.survivor, 1, "{case}: B never promoted\n{}", diag());
    assert!(
        r.verdict.lost.is_empty(),
        "{case}: lost acknowledged writes {:?}\n{}",
        r.verdict.lost,
        diag()
    );
    assert!(
        r.verdict.overlap.is_empty(),
        "{case}: A acknowledged {:?} after B took over\n{}",
        r.verdict.overlap,
        diag()
    );
    assert!(
        r.acks_b > 0,
        "{case}: B never acknowledged a write\n{}",
        diag()
    );
    let fenced = r
        .a_fenced_ms
        .unwrap_or_else(|| panic!("{case}: A was never seen fenced\n{}", diag()));
    let acquired = r
        .b_acquired_ms
        .unwrap_or_else(|| panic!("{case}: B never logged its acquisition\n{}", diag()));
    let promoted = r
        .b_promoted_ms
        .unwrap_or_else(|| panic!("{case}: B never seen promoted\n{}", diag()));
    assert!(
        fenced < acquired,
        "{case}: A fenced at {fenced} ms, after B acquired the lease at {acquired} ms"
    );
    assert!(
        fenced < promoted,
        "{case}: A fenced at {fenced} ms, after B promoted at {promoted} ms"
    );
}

/// Case 1: A cut from B, both still see the witness. A records "no
/// synchronous standby" and goes on alone; B never promotes, not even when A
/// later dies, because the witnesses no longer name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_from_b_no_failover_and_b_refuses_after_a_dies() {
    let Some(_serial) = guard().await else {
        return;
    };
    let cluster = Cluster::start(ClusterOpts::default()).await.unwrap();
    let load = cluster.start_load(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    netns::cut(&cluster.ns[0], IF_TO_PEER[0], &cluster.ns[1], IF_TO_PEER[1]).unwrap();
    tokio::time::sleep(ttl() * 3 + Duration::from_secs(3)).await;
    let r = cluster.evaluate(load, fault_at).await.unwrap();
    print("1 a-cut-from-b", &r);
    let diag = cluster.diagnostics();
    assert_eq!(r.survivor, 0, "B promoted although A was alive\n{diag}");
    assert!(r.verdict.ok(), "{:?}\n{diag}", r.verdict);
    assert!(r.b_acquired_ms.is_none(), "B took the lease\n{diag}");
    assert!(
        r.acks_a_after_fault > 0,
        "A stopped acknowledging writes alone\n{diag}"
    );
    let fault_wall = cluster.wall(fault_at);
    let dropped = cluster.events(0).iter().any(|e| {
        e.at > fault_wall
            && e.action == "update_meta"
            && e.message == "failover action applied"
            && e.detail.contains("None")
    });
    assert!(
        dropped,
        "A never recorded 'no synchronous standby' at the witnesses\n{diag}"
    );

    // Now A dies: B must still refuse, its data may lack A's last writes.
    let killed = Instant::now();
    cluster.ns[0].kill_all();
    tokio::time::sleep(ttl() * 3 + Duration::from_secs(3)).await;
    let state = cluster.pg[1].state().await;
    assert_eq!(
        state.map(|s| s.0),
        Some(true),
        "B left recovery after A died\n{}",
        cluster.diagnostics()
    );
    let killed_wall = cluster.wall(killed);
    let acquired = cluster.events(1).iter().any(|e| {
        e.at > killed_wall && e.action == "acquire" && e.message == "failover action applied"
    });
    assert!(
        !acquired,
        "B acquired the lease after A died\n{}",
        cluster.diagnostics()
    );
}

/// Case 2: A cut from the witnesses but not from B: A fences before B
/// promotes, nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_from_witnesses_fences_before_b_promotes() {
    let Some(_serial) = guard().await else {
        return;
    };
    let (cluster, r) = failover_case(ClusterOpts::default(), |c| {
        netns::cut(&c.ns[0], IF_TO_W[0], &c.ns_w, IF_FROM_W[0])
    })
    .await;
    assert_safe_failover("2 a-cut-from-witnesses", &cluster, &r);
}

/// Case 3: A isolated from everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_isolated_fences_before_b_promotes() {
    let Some(_serial) = guard().await else {
        return;
    };
    let (cluster, r) = failover_case(ClusterOpts::default(), |c| {
        netns::cut(&c.ns[0], IF_TO_W[0], &c.ns_w, IF_FROM_W[0])?;
        netns::cut(&c.ns[0], IF_TO_PEER[0], &c.ns[1], IF_TO_PEER[1])
    })
    .await;
    assert_safe_failover("3 a-isolated", &cluster, &r);
}

/// Case 4: one of three witnesses unreachable for everyone: no failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_minority_lost_no_failover() {
    let Some(_serial) = guard().await else {
        return;
    };
    let opts = ClusterOpts {
        witnesses: 3,
        ..ClusterOpts::default()
    };
    let cluster = Cluster::start(opts).await.unwrap();
    let load = cluster.start_load(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    cluster
        .ns_w
        .drop_tcp_port(cluster.witness_ports[2])
        .unwrap();
    tokio::time::sleep(ttl() * 3 + Duration::from_secs(3)).await;
    let r = cluster.evaluate(load, fault_at).await.unwrap();
    print("4 witness-minority-lost", &r);
    let diag = cluster.diagnostics();
    assert_eq!(r.survivor, 0, "B promoted\n{diag}");
    assert!(r.verdict.ok(), "{:?}\n{diag}", r.verdict);
    assert!(r.b_acquired_ms.is_none(), "B took the lease\n{diag}");
    assert!(
        r.a_fenced_ms.is_none(),
        "A fenced itself with a majority reachable\n{diag}"
    );
    assert!(
        r.acks_a_after_fault > 0,
        "A stopped acknowledging writes\n{diag}"
    );
}

/// Case 5: the A<->witnesses link flaps every TTL/2 for a few seconds:
/// whatever happens, never two primaries and no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_link_never_two_primaries() {
    let Some(_serial) = guard().await else {
        return;
    };
    let cluster = Cluster::start(ClusterOpts::default()).await.unwrap();
    let load = cluster.start_load(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    let (a, w) = (&cluster.ns[0], &cluster.ns_w);
    for _ in 0..6 {
        netns::cut(a, IF_TO_W[0], w, IF_FROM_W[0]).unwrap();
        tokio::time::sleep(ttl() / 2).await;
        netns::heal(a, IF_TO_W[0], w, IF_FROM_W[0]).unwrap();
        tokio::time::sleep(ttl() / 2).await;
    }
    tokio::time::sleep(ttl() * 3 + Duration::from_secs(2)).await;
    let r = cluster.evaluate(load, fault_at).await.unwrap();
    print("5 flapping", &r);
    let diag = cluster.diagnostics();
    assert!(
        r.verdict.lost.is_empty(),
        "lost {:?}\n{diag}",
        r.verdict.lost
    );
    assert!(
        r.verdict.overlap.is_empty(),
        "two primaries: A acknowledged {:?} after B took over\n{diag}",
        r.verdict.overlap
    );
    assert!(r.verdict.acked > 0, "no write acknowledged at all\n{diag}");
    if r.survivor == 1 {
        let fenced = r
            .a_fenced_ms
            .expect("B took over but A was never seen fenced");
        let acquired = r
            .b_acquired_ms
            .expect("B promoted without logging an acquisition");
        assert!(
            fenced < acquired,
            "A fenced at {fenced} ms, after B acquired at {acquired} ms"
        );
    }
}

/// Case 6: A's clock drifts by the configured max_drift (0.01), applied to
/// the whole agent process with libfaketime (its monotonic clock, sleeps and
/// timers all run at the given rate); A is then cut from the witnesses.
async fn drift_case(rate: &str, case: &str) {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        continuum_tests::skip::skip(
            "clock drift case",
            &format!("{LIBFAKETIME} missing (apt-get install faketime)"),
        );
        return;
    }
    let mut opts = ClusterOpts::default();
    opts.agent_env[0] = vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), format!("+0 x{rate}")),
    ];
    let (cluster, r) = failover_case(opts, |c| {
        netns::cut(&c.ns[0], IF_TO_W[0], &c.ns_w, IF_FROM_W[0])
    })
    .await;
    assert_safe_failover(case, &cluster, &r);
}

/// Slow by max_drift: the dangerous direction (A's lease looks longer to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_slow_by_max_drift_still_fences_first() {
    let Some(_serial) = guard().await else {
        return;
    };
    drift_case("0.99", "6 a-clock-slow-0.99").await;
}

/// Fast by max_drift: A fences a little earlier; still no loss or overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_fast_by_max_drift_still_fences_first() {
    let Some(_serial) = guard().await else {
        return;
    };
    drift_case("1.01", "6 a-clock-fast-1.01").await;
}

/// The checker must catch a broken fence: case 2 with A's fence disabled
/// (debug-build hook) shows A acknowledging writes after B took the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_flags_disabled_fencing() {
    let Some(_serial) = guard().await else {
        return;
    };
    if !cfg!(debug_assertions) {
        // The agent is built with the same profile; release builds have no hook.
        continuum_tests::skip::skip(
            "negative case",
            "the no-fence hook exists in debug builds only",
        );
        return;
    }
    let mut opts = ClusterOpts::default();
    opts.agent_env[0] = vec![("CONTINUUM_TEST_UNSAFE_NO_FENCE".into(), "1".into())];
    let (cluster, r) = failover_case(opts, |c| {
        netns::cut(&c.ns[0], IF_TO_W[0], &c.ns_w, IF_FROM_W[0])
    })
    .await;
    print("negative no-fence", &r);
    let diag = cluster.diagnostics();
    assert!(
        r.a_fenced_ms.is_none(),
        "the hook did not disable the fence\n{diag}"
    );
    assert!(
        !r.verdict.ok(),
        "with fencing disabled the checker found nothing: {:?}\n{diag}",
        r.verdict
    );
}
