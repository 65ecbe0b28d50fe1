//! The embedded store across `kill -9`: what a witness acknowledged before
//! it was killed still binds it after the restart (DESIGN.md, invariant 1).
//!
//! Needs the binary: `cargo build -p continuum-witness`.

mod witness_cases;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use continuum_shared::lease::{Epoch, Response};
use continuum_tests::witness_proc::{TestClient, WitnessOpts, WitnessProc};
use witness_cases::*;

/// Grants and releases a lease as fast as possible, recording the highest
/// epoch the witness acknowledged, until the witness dies.
async fn grant_stream(c: TestClient, lease: &'static str, acked: Arc<AtomicU64>) {
    let mut epoch = 1;
    loop {
        match c.send(&acquire(lease, "eu-1", epoch, 60_000)).await {
            Ok((200, Response::Granted { epoch: e, .. })) => {
                acked.fetch_max(e.0, Ordering::SeqCst);
                if c.send(&release(lease, "eu-1", epoch)).await.is_err() {
                    return;
                }
            }
            Ok((_, Response::EpochTooLow { max_epoch })) => epoch = max_epoch.0,
            // Still held from before the last kill (restart rule): free it.
            Ok((_, Response::Held { epoch: held, .. })) => {
                if c.send(&release(lease, "eu-1", held.0)).await.is_err() {
                    return;
                }
                epoch = held.0;
            }
            Ok(other) => panic!("unexpected answer {other:?}"),
            Err(_) => return, // killed
        }
        epoch += 1;
    }
}

#[tokio::test]
async fn max_epoch_never_goes_back_across_kill9_during_grants() {
    let mut w = WitnessProc::start(WitnessOpts::default()).unwrap();
    for round in 0..3 {
        let c = w.client().unwrap();
        let leases: [&'static str; 3] = ["kill/a", "kill/b", "kill/c"];
        let acked: Vec<Arc<AtomicU64>> = leases.iter().map(|_| Arc::default()).collect();
        let before: Vec<u64> = {
            let mut v = Vec::new();
            for l in leases {
                v.push(view(&c, l).await.max_epoch.0);
            }
            v
        };
        let tasks: Vec<_> = leases
            .iter()
            .zip(&acked)
            .map(|(l, a)| tokio::spawn(grant_stream(c.clone(), l, a.clone())))
            .collect();
        // Let grants flow, then kill in the middle of them.
        let start = Instant::now();
        while acked.iter().map(|a| a.load(Ordering::SeqCst)).sum::<u64>()
            < before.iter().sum::<u64>() + 30
        {
            assert!(start.elapsed() < Duration::from_secs(30), "no grants flow");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(7 * round + 3)).await;
        w.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        w.restart().unwrap();
        let c = w.client().unwrap();
        for (l, a) in leases.iter().zip(&acked) {
            let acked = a.load(Ordering::SeqCst);
            let v = view(&c, l).await;
            assert!(
                v.max_epoch.0 >= acked,
                "round {round} {l}: acknowledged epoch {acked} but max_epoch after restart is {}",
                v.max_epoch
            );
            let (s, r) = c.send(&acquire(l, "us-1", acked, 1000)).await.unwrap();
            assert_eq!(
                s, 409,
                "round {round} {l}: epoch {acked} granted twice: {r:?}"
            );
        }
    }
}

/// A holder's grant stays binding after `kill -9` + restart for its full
/// persisted TTL: a competitor is refused, the holder can renew; once the
/// holder stops renewing the competitor gets it.
#[tokio::test]
async fn restart_rule_keeps_the_holder_after_kill9() {
    let mut w = WitnessProc::start(WitnessOpts::default()).unwrap();
    let c = w.client().unwrap();
    let lease = "restart/rule";
    let (s, _) = c.send(&acquire(lease, "eu-1", 1, 3000)).await.unwrap();
    assert_eq!(s, 200);
    // Renewals are in memory only; one with a longer TTL is persisted.
    assert_eq!(c.send(&renew(lease, "eu-1", 1, 3000)).await.unwrap().0, 200);
    assert_eq!(c.send(&renew(lease, "eu-1", 1, 4000)).await.unwrap().0, 200);
    w.kill9();
    w.restart().unwrap();
    let c = w.client().unwrap();
    let (s, r) = c.send(&acquire(lease, "us-1", 2, 3000)).await.unwrap();
    assert_eq!(s, 409, "competitor granted right after restart: {r:?}");
    assert!(
        matches!(
            r,
            Response::Held {
                epoch: Epoch(1),
                ..
            }
        ),
        "{r:?}"
    );
    let (s, r) = c.send(&renew(lease, "eu-1", 1, 1000)).await.unwrap();
    assert_eq!(
        (s, r),
        (
            200,
            Response::Granted {
                epoch: Epoch(1),
                ttl_ms: 1000
            }
        ),
        "the holder keeps renewing across the restart"
    );
    // The holder stops; the competitor eventually wins with a higher epoch.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, r) = c.send(&acquire(lease, "us-1", 2, 3000)).await.unwrap();
        if s == 200 {
            assert_eq!(
                r,
                Response::Granted {
                    epoch: Epoch(2),
                    ttl_ms: 3000
                }
            );
            break;
        }
        assert!(matches!(r, Response::Held { .. }), "{r:?}");
        assert!(Instant::now() < deadline, "lease never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The unsafe test switch really disables the restart rule (debug builds):
/// the checker test relies on it to prove it catches the rule's absence.
#[tokio::test]
async fn unsafe_switch_disables_the_restart_rule_in_debug_builds() {
    if !cfg!(debug_assertions) {
        return; // the switch is compiled out of release builds
    }
    let mut w = WitnessProc::start(WitnessOpts::default().unsafe_skip_restart_rule()).unwrap();
    let c = w.client().unwrap();
    let lease = "restart/unsafe";
    assert_eq!(
        c.send(&acquire(lease, "eu-1", 1, 60_000)).await.unwrap().0,
        200
    );
    w.kill9();
    w.restart().unwrap();
    let c = w.client().unwrap();
    let (s, r) = c.send(&acquire(lease, "us-1", 2, 60_000)).await.unwrap();
    assert_eq!(
        (s, r),
        (
            200,
            Response::Granted {
                epoch: Epoch(2),
                ttl_ms: 60_000
            }
        ),
        "without the restart rule the promise to eu-1 is forgotten"
    );
    let (s, _) = c.send(&acquire(lease, "us-1", 1, 60_000)).await.unwrap();
    assert_eq!(s, 409, "epochs still never go back");
}
