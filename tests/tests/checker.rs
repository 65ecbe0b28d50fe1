//! Lease-history checker tests: many contenders acquire, renew and release one
//! lease through the quorum client while witnesses are killed and restarted
//! and messages are delayed and dropped; the recorded history must satisfy
//! invariants 1 and 2 (see `continuum_tests::checker`).
//!
//! Plus the demonstrations that the checker is not vacuous: it FAILS when the
//! client's deadline rule is broken, and when the witness's restart rule is
//! switched off.

use std::sync::Arc;
use std::time::Duration;

use continuum_shared::lease::HolderId;
use continuum_shared::quorum::model::ModelWitness;
use continuum_shared::quorum::{QuorumClient, QuorumConfig};
use continuum_shared::transport::{BoxFuture, LeaseTransport};
use continuum_tests::checker::harness::*;
use continuum_tests::checker::workload::{contender, Counts};
use continuum_tests::checker::{History, Violation};
use continuum_tests::faults::{kill_randomly, Crashable, FaultConfig, FaultyTransport};
use continuum_tests::witness_proc::WitnessOpts;
use tokio::time::Instant;

type Transports = Vec<Arc<dyn LeaseTransport>>;

fn cfg() -> QuorumConfig {
    QuorumConfig {
        margin: Duration::from_millis(50),
        ..Default::default()
    }
}

fn faults() -> FaultConfig {
    FaultConfig {
        max_delay: Duration::from_millis(40),
        drop_request: 0.05,
        drop_reply: 0.05,
        reply_delay: Duration::ZERO,
    }
}

struct ModelCrash(Arc<ModelWitness>);
impl Crashable for ModelCrash {
    fn kill9(&mut self) -> anyhow::Result<()> {
        self.0.crash();
        Ok(())
    }
    fn restart(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Runs the contenders against in-process model witnesses with crashes and
/// message faults. Fast and fully in-process: it checks the quorum client's
/// logic; the process tests below check the real witness.
async fn model_run(
    witnesses: usize,
    ttl: Duration,
    run_for: Duration,
) -> (Arc<History>, Arc<Counts>, u64, u64) {
    let models: Vec<Arc<ModelWitness>> = (0..witnesses)
        .map(|i| Arc::new(ModelWitness::new(i, ttl)))
        .collect();
    let history = Arc::new(History::new(lease()));
    let counts = Arc::new(Counts::default());
    let until = Instant::now() + run_for;
    let mut faulty = Vec::new();
    let mut tasks = Vec::new();
    for c in 0..CONTENDERS {
        let ts: Vec<Arc<FaultyTransport<Arc<ModelWitness>>>> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Arc::new(FaultyTransport::new(
                    Arc::clone(m),
                    faults(),
                    (c * 100 + i) as u64,
                ))
            })
            .collect();
        faulty.extend(ts.iter().cloned());
        let ts: Vec<Arc<dyn LeaseTransport>> = ts
            .into_iter()
            .map(|t| t as Arc<dyn LeaseTransport>)
            .collect();
        tasks.push(tokio::spawn(contender(
            HolderId::new(format!("c{c}")).unwrap(),
            lease(),
            ts,
            cfg(),
            ttl,
            until,
            c as u64,
            Arc::clone(&history),
            Arc::clone(&counts),
        )));
    }
    let mut crash: Vec<ModelCrash> = models.iter().map(|m| ModelCrash(Arc::clone(m))).collect();
    let kills = kill_randomly(&mut crash, until, (ttl / 2, ttl * 2), ttl / 4, 7)
        .await
        .unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let dropped = faulty.iter().map(|f| f.stats.dropped()).sum();
    (history, counts, kills, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_one_witness_with_crashes_and_faults() {
    let (h, c, k, d) = model_run(1, Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_clean("model x1", &h, &c, k, d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_three_witnesses_with_crashes_and_faults() {
    let (h, c, k, d) = model_run(3, Duration::from_millis(300), Duration::from_secs(5)).await;
    assert_clean("model x3", &h, &c, k, d);
}

/// Holder `a` takes the lease once through `ta` and stops renewing; holder `b`
/// polls through `tb` until it gets the lease. Returns the checker's verdict.
async fn handover(
    ta: Vec<Arc<dyn LeaseTransport>>,
    cfg_a: QuorumConfig,
    tb: Vec<Arc<dyn LeaseTransport>>,
    ttl: Duration,
    between: impl std::future::Future<Output = ()>,
) -> Result<continuum_tests::checker::Summary, Vec<Violation>> {
    let history = History::new(lease());
    let a = QuorumClient::new(ta, cfg_a).unwrap();
    let b = QuorumClient::new(tb, cfg()).unwrap();
    let ga = a
        .acquire(&lease(), &HolderId::new("a").unwrap(), ttl)
        .await
        .unwrap();
    history.granted(&ga);
    between.await;
    let give_up = Instant::now() + ttl * 10;
    loop {
        match b.acquire(&lease(), &HolderId::new("b").unwrap(), ttl).await {
            Ok(gb) => {
                history.granted(&gb);
                b.release(&gb).await;
                break;
            }
            Err(_) if Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("b never got the lease: {e}"),
        }
    }
    history.check()
}

fn has_overlap(v: &[Violation]) -> bool {
    v.iter().any(|v| matches!(v, Violation::Overlap { .. }))
}

/// Demonstration (a): with the deadline counted from the reply (full TTL, no
/// drift), a holder whose replies are slow believes it holds after the
/// witness already gave the lease away; the checker sees the overlap. The
/// same run with the real rule is clean.
#[tokio::test]
async fn model_checker_catches_a_broken_deadline_rule() {
    let ttl = Duration::from_millis(400);
    for broken in [true, false] {
        let w = Arc::new(ModelWitness::new(0, ttl));
        let slow = FaultConfig {
            reply_delay: Duration::from_millis(150),
            ..Default::default()
        };
        let ta: Vec<Arc<dyn LeaseTransport>> =
            vec![Arc::new(FaultyTransport::new(Arc::clone(&w), slow, 1))];
        let tb: Vec<Arc<dyn LeaseTransport>> = vec![w.clone()];
        let cfg_a = QuorumConfig {
            unsafe_deadline_from_reply: broken,
            ..cfg()
        };
        let verdict = handover(ta, cfg_a, tb, ttl, async {}).await;
        if broken {
            let v = verdict.expect_err("the checker must catch the reply-based deadline");
            assert!(has_overlap(&v), "{v:?}");
        } else {
            let s = verdict.expect("the conservative deadline is safe");
            assert_eq!(s.handovers, 1);
        }
    }
}

/// Demonstration (b), on the model: a witness that forgets its grants in a
/// crash and grants again at once lets two holders overlap; with the restart
/// rule it does not.
#[tokio::test]
async fn model_checker_catches_a_missing_restart_rule() {
    let ttl = Duration::from_millis(400);
    for rule in [false, true] {
        let w = Arc::new(ModelWitness::new(
            0,
            if rule { ttl } else { Duration::ZERO },
        ));
        let t: Vec<Arc<dyn LeaseTransport>> = vec![w.clone()];
        let crash = {
            let w = Arc::clone(&w);
            async move { w.crash() }
        };
        let verdict = handover(t.clone(), cfg(), t, ttl, crash).await;
        if rule {
            assert_eq!(verdict.expect("restart rule keeps it safe").handovers, 1);
        } else {
            assert!(has_overlap(
                &verdict.expect_err("the checker must catch it")
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Against real witness processes (HTTPS + client certificates, embedded store).
// ---------------------------------------------------------------------------

async fn process_run(n: usize) {
    let (pki, ws) = witnesses(n, |pki| WitnessOpts::default().with_pki(pki)).await;
    let urls: Vec<String> = ws.iter().map(|w| w.lock().unwrap().api_url()).collect();
    let mut crash: Vec<_> = ws.iter().map(|w| witness_crash(Arc::clone(w))).collect();
    let r = run(
        &pki,
        &urls,
        &mut crash,
        Duration::from_millis(1000),
        Duration::from_secs(12),
        (Duration::from_millis(1500), Duration::from_millis(3500)),
    )
    .await;
    assert_clean(
        &format!("witness x{n}"),
        &r.history,
        &r.counts,
        r.kills,
        r.dropped,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_witness_with_kill9_and_faults() {
    process_run(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_witnesses_with_kill9_and_faults() {
    process_run(3).await;
}

/// Demonstration (a) against a real witness: the reply-based deadline with
/// slow replies overlaps the next holder; the conservative deadline does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_catches_a_broken_deadline_rule() {
    let (_pki, ws) = witnesses(1, |pki| WitnessOpts::default().with_pki(pki)).await;
    let ttl = Duration::from_millis(1000);
    for broken in [true, false] {
        let slow = FaultConfig {
            reply_delay: Duration::from_millis(600),
            ..Default::default()
        };
        let (ta, tb): (Transports, Transports) = {
            let w = ws[0].lock().unwrap();
            (
                vec![Arc::new(FaultyTransport::new(https(&w), slow, 1))],
                vec![Arc::new(https(&w))],
            )
        };
        let cfg_a = QuorumConfig {
            unsafe_deadline_from_reply: broken,
            ..cfg()
        };
        let verdict = handover(ta, cfg_a, tb, ttl, async {}).await;
        if broken {
            let v = verdict.expect_err("the checker must catch the reply-based deadline");
            assert!(has_overlap(&v), "{v:?}");
            eprintln!("broken deadline rule caught: {}", v[0]);
        } else {
            assert_eq!(
                verdict
                    .expect("the conservative deadline is safe")
                    .handovers,
                1
            );
        }
    }
}

/// Demonstration (b) against a real witness: with the restart rule disabled
/// (debug build + CONTINUUM_TEST_UNSAFE_SKIP_RESTART_RULE=1), a kill -9 right
/// after a grant lets another holder in while the first still holds; with the
/// rule, the next holder waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_catches_a_missing_restart_rule() {
    let ttl = Duration::from_millis(2000);
    for rule in [false, true] {
        let (_pki, ws) = witnesses(1, move |pki| {
            let o = WitnessOpts::default().with_pki(pki);
            if rule {
                o
            } else {
                o.unsafe_skip_restart_rule()
            }
        })
        .await;
        let t: Vec<Arc<dyn LeaseTransport>> = vec![Arc::new(https(&ws[0].lock().unwrap()))];
        let w = Arc::clone(&ws[0]);
        let crash = async move {
            tokio::task::spawn_blocking(move || w.lock().unwrap().restart().unwrap())
                .await
                .unwrap();
        };
        let verdict = handover(t.clone(), cfg(), t, ttl, crash).await;
        if rule {
            assert_eq!(
                verdict.expect("the restart rule keeps it safe").handovers,
                1
            );
        } else {
            let v = verdict.expect_err("the checker must catch the missing restart rule");
            assert!(has_overlap(&v), "{v:?}");
            eprintln!("missing restart rule caught: {}", v[0]);
        }
    }
}

/// The HTTPS transport reaches a witness with the client certificate, and a
/// client with a certificate from another CA gets a transport error (the
/// witness refuses it at the TLS handshake), not a lease answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_transport_needs_a_valid_client_certificate() {
    use continuum_shared::lease::{Read, Request, Response};
    use continuum_shared::transport::https::{HttpsTransport, TlsMaterial};
    let (pki, ws) = witnesses(1, |pki| WitnessOpts::default().with_pki(pki)).await;
    let url = ws[0].lock().unwrap().api_url();
    let read = Request::Read(Read { name: lease() });
    let good = HttpsTransport::new(&url, &tls(&pki), Duration::from_secs(2)).unwrap();
    assert!(matches!(good.call(&read).await, Ok(Response::State(_))));
    let rogue = TlsMaterial {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        cert_pem: pki.rogue_client.cert_pem.clone().into_bytes(),
        key_pem: pki.rogue_client.key_pem.clone().into_bytes(),
    };
    let bad = HttpsTransport::new(&url, &rogue, Duration::from_secs(2)).unwrap();
    let err = bad.call(&read).await.expect_err("rogue client certificate");
    assert_eq!(err.label(), "connect", "{err}");
}
