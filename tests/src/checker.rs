//! The lease-history checker: records when each contender believed it held a
//! lease and checks the history against DESIGN.md invariants 1 and 2.
//!
//! Every contender runs in the test process, so all instants come from one
//! monotonic clock and intervals of different holders are comparable.
//!
//! An interval is the time a holder may act as primary: from the moment it
//! learned a majority granted (`granted_at`) to its conservative deadline, cut
//! short when it released. (The request was sent earlier, at `sent_at`, and the
//! deadline counts from there; but the holder cannot act before it knows.)
//!
//! Checks:
//! 1. no two different holders' intervals overlap;
//! 2. no epoch is held by two different holders;
//! 3. in order of interval start, epochs strictly increase across holders.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Mutex;

use continuum_shared::lease::{Epoch, HolderId, LeaseName};
use continuum_shared::quorum::Grant;
use tokio::time::Instant;

/// One stretch of time during which `holder` believed it held `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub holder: HolderId,
    pub epoch: Epoch,
    pub sent_at: Instant,
    pub start: Instant,
    pub end: Instant,
}

/// A broken invariant, with the intervals that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Two holders both believed they held the lease at the same instant.
    Overlap { first: Interval, second: Interval },
    /// The same epoch was held by two holders.
    EpochReused {
        epoch: Epoch,
        holders: Vec<HolderId>,
    },
    /// A later holder got an epoch not above an earlier holder's.
    EpochNotIncreasing { earlier: Interval, later: Interval },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Overlap { first, second } => write!(
                f,
                "overlap: {}@{} holds until {:?} after {}@{} started",
                first.holder,
                first.epoch,
                first.end.saturating_duration_since(second.start),
                second.holder,
                second.epoch
            ),
            Violation::EpochReused { epoch, holders } => {
                write!(f, "epoch {epoch} held by several holders: {holders:?}")
            }
            Violation::EpochNotIncreasing { earlier, later } => write!(
                f,
                "epoch went from {}@{} to {}@{}",
                earlier.holder, earlier.epoch, later.holder, later.epoch
            ),
        }
    }
}

/// What a clean history contained: enough to assert the test did something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Successful acquires and renewals recorded.
    pub intervals: usize,
    /// Distinct (holder, epoch) tenures.
    pub tenures: usize,
    /// Changes of holder, in order of start.
    pub handovers: usize,
    /// Distinct holders that held at least once.
    pub holders: usize,
    pub max_epoch: Epoch,
}

/// Checks a history (any order). Returns up to the first 20 violations.
pub fn check(history: &[Interval]) -> Result<Summary, Vec<Violation>> {
    let mut sorted: Vec<&Interval> = history.iter().filter(|i| i.end > i.start).collect();
    sorted.sort_by_key(|i| (i.start, i.epoch));
    let mut violations = Vec::new();

    // 2. One holder per epoch.
    let mut by_epoch: BTreeMap<Epoch, BTreeSet<&HolderId>> = BTreeMap::new();
    for i in history {
        by_epoch.entry(i.epoch).or_default().insert(&i.holder);
    }
    for (epoch, holders) in &by_epoch {
        if holders.len() > 1 {
            violations.push(Violation::EpochReused {
                epoch: *epoch,
                holders: holders.iter().map(|h| (*h).clone()).collect(),
            });
        }
    }

    // 1 and 3, in one sweep: per holder, the interval with the latest end and
    // the one with the highest epoch seen so far.
    let mut latest_end: BTreeMap<&HolderId, &Interval> = BTreeMap::new();
    let mut highest: BTreeMap<&HolderId, &Interval> = BTreeMap::new();
    let mut summary = Summary::default();
    let mut last_holder: Option<&HolderId> = None;
    let mut tenures: BTreeSet<(&HolderId, Epoch)> = BTreeSet::new();
    for &cur in &sorted {
        for (h, prev) in &latest_end {
            if **h != cur.holder && prev.end > cur.start {
                violations.push(Violation::Overlap {
                    first: (*prev).clone(),
                    second: cur.clone(),
                });
            }
        }
        for (h, prev) in &highest {
            if **h != cur.holder && prev.epoch >= cur.epoch {
                violations.push(Violation::EpochNotIncreasing {
                    earlier: (*prev).clone(),
                    later: cur.clone(),
                });
            }
        }
        let e = latest_end.entry(&cur.holder).or_insert(cur);
        if cur.end > e.end {
            *e = cur;
        }
        let e = highest.entry(&cur.holder).or_insert(cur);
        if cur.epoch > e.epoch {
            *e = cur;
        }
        if last_holder.is_some_and(|h| *h != cur.holder) {
            summary.handovers += 1;
        }
        last_holder = Some(&cur.holder);
        tenures.insert((&cur.holder, cur.epoch));
        summary.max_epoch = summary.max_epoch.max(cur.epoch);
        if violations.len() >= 20 {
            break;
        }
    }
    violations.truncate(20);
    if !violations.is_empty() {
        return Err(violations);
    }
    summary.intervals = sorted.len();
    summary.tenures = tenures.len();
    summary.holders = latest_end.len();
    Ok(summary)
}

/// A shared, append-only history of one lease, written by every contender.
#[derive(Debug)]
pub struct History {
    pub lease: LeaseName,
    intervals: Mutex<Vec<Interval>>,
}

impl History {
    pub fn new(lease: LeaseName) -> Self {
        Self {
            lease,
            intervals: Mutex::new(Vec::new()),
        }
    }

    /// Records a successful acquire or renewal.
    pub fn granted(&self, g: &Grant) {
        let i = Interval {
            holder: g.holder.clone(),
            epoch: g.epoch,
            sent_at: g.sent_at,
            start: g.granted_at,
            end: g.deadline,
        };
        self.intervals.lock().expect("history lock").push(i);
    }

    /// Records that `holder` stopped acting as primary at `at` (it is about to
    /// release): its intervals at `epoch` end there.
    pub fn stopped(&self, holder: &HolderId, epoch: Epoch, at: Instant) {
        for i in self.intervals.lock().expect("history lock").iter_mut() {
            if i.holder == *holder && i.epoch == epoch && i.end > at {
                i.end = at.max(i.start);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Interval> {
        self.intervals.lock().expect("history lock").clone()
    }

    pub fn check(&self) -> Result<Summary, Vec<Violation>> {
        check(&self.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn iv(base: Instant, holder: &str, epoch: u64, start_ms: u64, end_ms: u64) -> Interval {
        Interval {
            holder: HolderId::new(holder).unwrap(),
            epoch: Epoch(epoch),
            sent_at: base + Duration::from_millis(start_ms.saturating_sub(5)),
            start: base + Duration::from_millis(start_ms),
            end: base + Duration::from_millis(end_ms),
        }
    }

    #[test]
    fn good_histories_pass() {
        let t = Instant::now();
        let cases: Vec<(&str, Vec<Interval>, usize)> = vec![
            ("empty", vec![], 0),
            (
                "one holder renewing",
                vec![
                    iv(t, "a", 1, 0, 100),
                    iv(t, "a", 1, 30, 130),
                    iv(t, "a", 1, 60, 160),
                ],
                0,
            ),
            (
                "clean handovers",
                vec![
                    iv(t, "a", 1, 0, 100),
                    iv(t, "b", 2, 100, 200),
                    iv(t, "a", 5, 250, 300),
                ],
                2,
            ),
            (
                "same holder, new epoch",
                vec![iv(t, "a", 1, 0, 100), iv(t, "a", 2, 150, 200)],
                0,
            ),
            (
                "gap in renewals",
                vec![
                    iv(t, "a", 1, 0, 100),
                    iv(t, "a", 1, 120, 220),
                    iv(t, "b", 3, 230, 300),
                ],
                1,
            ),
            (
                "any order",
                vec![iv(t, "b", 2, 100, 200), iv(t, "a", 1, 0, 100)],
                1,
            ),
        ];
        for (what, h, handovers) in cases {
            let s = check(&h).unwrap_or_else(|v| panic!("{what}: {v:?}"));
            assert_eq!(s.handovers, handovers, "{what}");
            assert_eq!(s.intervals, h.len(), "{what}");
        }
    }

    #[test]
    fn bad_histories_fail_with_the_right_violation() {
        let t = Instant::now();
        let cases: Vec<(&str, Vec<Interval>, &str)> = vec![
            (
                "overlap by 1 ms",
                vec![iv(t, "a", 1, 0, 101), iv(t, "b", 2, 100, 200)],
                "overlap",
            ),
            (
                "renewal overlaps a newer holder",
                vec![
                    iv(t, "a", 1, 0, 100),
                    iv(t, "b", 2, 120, 200),
                    iv(t, "a", 1, 110, 210),
                ],
                "overlap",
            ),
            (
                "contained",
                vec![iv(t, "a", 1, 0, 300), iv(t, "b", 2, 100, 200)],
                "overlap",
            ),
            (
                "epoch reused",
                vec![iv(t, "a", 3, 0, 100), iv(t, "b", 3, 200, 300)],
                "reused",
            ),
            (
                "epoch went down",
                vec![iv(t, "a", 4, 0, 100), iv(t, "b", 2, 200, 300)],
                "increasing",
            ),
            (
                "epoch went down later",
                vec![
                    iv(t, "a", 4, 0, 100),
                    iv(t, "b", 5, 150, 180),
                    iv(t, "c", 4, 200, 300),
                ],
                "increasing",
            ),
        ];
        for (what, h, kind) in cases {
            let v = check(&h).expect_err(what);
            let found = v.iter().any(|v| match v {
                Violation::Overlap { .. } => kind == "overlap",
                Violation::EpochReused { .. } => kind == "reused",
                Violation::EpochNotIncreasing { .. } => kind == "increasing",
            });
            assert!(found, "{what}: wanted {kind}, got {v:?}");
        }
    }

    #[test]
    fn a_release_ends_the_interval() {
        let t = Instant::now();
        let hist = History::new(LeaseName::new("l").unwrap());
        hist.intervals.lock().unwrap().push(iv(t, "a", 1, 0, 500));
        hist.intervals.lock().unwrap().push(iv(t, "b", 2, 100, 600));
        assert!(hist.check().is_err());
        hist.stopped(
            &HolderId::new("a").unwrap(),
            Epoch(1),
            t + Duration::from_millis(90),
        );
        let s = hist.check().unwrap();
        assert_eq!(s.handovers, 1);
    }
}

/// Contender workload: many holders fighting over one lease through the
/// quorum client, recording every grant in a [`History`].
pub mod workload {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use continuum_shared::lease::{HolderId, LeaseName};
    use continuum_shared::quorum::{QuorumClient, QuorumConfig};
    use continuum_shared::transport::LeaseTransport;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tokio::time::{sleep, sleep_until, Instant};

    use super::History;

    /// What the contenders did, so a test can assert it did something.
    #[derive(Debug, Default)]
    pub struct Counts {
        pub acquired: AtomicU64,
        pub renewed: AtomicU64,
        pub refused: AtomicU64,
        pub renew_failed: AtomicU64,
        pub released: AtomicU64,
        pub lapsed: AtomicU64,
    }

    impl Counts {
        pub fn get(c: &AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }
        fn inc(c: &AtomicU64) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl std::fmt::Display for Counts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "acquired={} renewed={} refused={} renew_failed={} released={} lapsed={}",
                Self::get(&self.acquired),
                Self::get(&self.renewed),
                Self::get(&self.refused),
                Self::get(&self.renew_failed),
                Self::get(&self.released),
                Self::get(&self.lapsed)
            )
        }
    }

    /// One contender's loop until `until`: acquire; renew every TTL/3 a
    /// random number of times; then release (mostly) or let it lapse.
    #[allow(clippy::too_many_arguments)]
    pub async fn contender(
        holder: HolderId,
        lease: LeaseName,
        transports: Vec<Arc<dyn LeaseTransport>>,
        cfg: QuorumConfig,
        ttl: Duration,
        until: Instant,
        seed: u64,
        history: Arc<History>,
        counts: Arc<Counts>,
    ) -> anyhow::Result<()> {
        let client = QuorumClient::new(transports, cfg)?;
        let mut rng = StdRng::seed_from_u64(seed);
        while Instant::now() < until {
            let mut g = match client.acquire(&lease, &holder, ttl).await {
                Ok(g) => g,
                Err(_) => {
                    Counts::inc(&counts.refused);
                    sleep(ttl.mul_f64(rng.random::<f64>() / 4.0)).await;
                    continue;
                }
            };
            history.granted(&g);
            Counts::inc(&counts.acquired);
            let renewals = rng.random_range(0..5);
            let mut lost = false;
            let mut done = 0;
            while done < renewals && Instant::now() < until {
                sleep_until(g.sent_at + ttl / 3).await;
                if Instant::now() >= g.deadline {
                    lost = true;
                    break;
                }
                match client.renew(&g).await {
                    Ok(ng) => {
                        history.granted(&ng);
                        Counts::inc(&counts.renewed);
                        g = ng;
                        done += 1;
                    }
                    Err(_) => {
                        // The old deadline stands; retry shortly until it passes.
                        Counts::inc(&counts.renew_failed);
                        sleep(ttl / 20).await;
                        if Instant::now() >= g.deadline {
                            lost = true;
                            break;
                        }
                    }
                }
            }
            if !lost && rng.random_bool(0.75) {
                history.stopped(&g.holder, g.epoch, Instant::now());
                client.release(&g).await;
                Counts::inc(&counts.released);
            } else {
                // Let it lapse: the holder stops acting at its deadline and
                // may only contend again after it (acquire drops stale grants).
                sleep_until(g.deadline).await;
                Counts::inc(&counts.lapsed);
            }
            sleep(ttl.mul_f64(rng.random::<f64>() / 10.0)).await;
        }
        Ok(())
    }
}

/// Shared by the checker tests: HTTPS transports, process crashers, the
/// contender run and its assertions.
pub mod harness {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crate::faults::{kill_randomly, Crashable, FaultConfig, FaultyTransport};
    use crate::pki::Pki;
    use crate::witness_proc::WitnessProc;
    use continuum_shared::quorum::QuorumConfig;
    use continuum_shared::transport::https::{HttpsTransport, TlsMaterial};
    use continuum_shared::transport::{
        witness_transport, BoxFuture, LeaseTransport, WitnessProtocol,
    };
    use tokio::time::Instant;

    use super::workload::{contender, Counts};
    use super::History;
    use crate::witness_proc::WitnessOpts;
    use continuum_shared::lease::LeaseName;

    /// Contenders per run.
    pub const CONTENDERS: usize = 6;

    pub fn lease() -> LeaseName {
        LeaseName::new("continuum/checker/db").expect("valid name")
    }

    pub fn tls(pki: &Pki) -> TlsMaterial {
        TlsMaterial {
            ca_pem: pki.ca_pem.clone().into_bytes(),
            cert_pem: pki.client.cert_pem.clone().into_bytes(),
            key_pem: pki.client.key_pem.clone().into_bytes(),
        }
    }

    pub fn https(w: &WitnessProc) -> HttpsTransport {
        HttpsTransport::new(&w.api_url(), &tls(w.pki()), Duration::from_secs(1)).unwrap()
    }

    /// A witness (or etcd) process the killer may crash.
    pub struct ProcCrash<P: Send>(
        pub Arc<Mutex<P>>,
        pub fn(&mut P),
        pub fn(&mut P) -> anyhow::Result<()>,
    );

    impl<P: Send + 'static> Crashable for ProcCrash<P> {
        fn kill9(&mut self) -> anyhow::Result<()> {
            (self.1)(&mut self.0.lock().unwrap());
            Ok(())
        }
        fn restart(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
            let p = Arc::clone(&self.0);
            let f = self.2;
            Box::pin(async move {
                tokio::task::spawn_blocking(move || f(&mut p.lock().unwrap())).await?
            })
        }
    }

    pub fn witness_crash(w: Arc<Mutex<WitnessProc>>) -> ProcCrash<WitnessProc> {
        ProcCrash(w, WitnessProc::kill9, WitnessProc::restart)
    }

    pub struct RunResult {
        pub history: Arc<History>,
        pub counts: Arc<Counts>,
        pub kills: u64,
        pub dropped: u64,
    }

    /// Contenders against `urls` (each contender its own clients,
    /// wrapped in fault injection) while `crash` members are killed at random.
    pub async fn run<C: Crashable>(
        pki: &Pki,
        urls: &[String],
        crash: &mut [C],
        ttl: Duration,
        run_for: Duration,
        kill_every: (Duration, Duration),
    ) -> RunResult {
        let history = Arc::new(History::new(lease()));
        let counts = Arc::new(Counts::default());
        let until = Instant::now() + run_for;
        let faults = FaultConfig {
            max_delay: Duration::from_millis(30),
            drop_request: 0.03,
            drop_reply: 0.05,
            reply_delay: Duration::ZERO,
        };
        let cfg = QuorumConfig {
            margin: Duration::from_millis(50),
            ..Default::default()
        };
        let mut faulty = Vec::new();
        let mut tasks = Vec::new();
        for c in 0..CONTENDERS {
            // Half the contenders speak the pipelined lease stream, half
            // HTTPS: both protocols face the same faults in every run.
            let protocol = if c % 2 == 0 {
                WitnessProtocol::Stream
            } else {
                WitnessProtocol::Https
            };
            let ts: Vec<Arc<FaultyTransport<Arc<dyn LeaseTransport>>>> = urls
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    let t =
                        witness_transport(protocol, u, &tls(pki), Duration::from_secs(1)).unwrap();
                    Arc::new(FaultyTransport::new(
                        t,
                        faults.clone(),
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
                continuum_shared::lease::HolderId::new(format!("c{c}")).unwrap(),
                lease(),
                ts,
                cfg.clone(),
                ttl,
                until,
                1000 + c as u64,
                Arc::clone(&history),
                Arc::clone(&counts),
            )));
        }
        let kills = kill_randomly(crash, until, kill_every, Duration::from_millis(300), 11)
            .await
            .unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let dropped = faulty.iter().map(|f| f.stats.dropped()).sum();
        RunResult {
            history,
            counts,
            kills,
            dropped,
        }
    }

    /// Starts `n` witnesses sharing one PKI.
    pub async fn witnesses(
        n: usize,
        opts: impl Fn(Arc<Pki>) -> WitnessOpts + Send + 'static,
    ) -> (Arc<Pki>, Vec<Arc<std::sync::Mutex<WitnessProc>>>) {
        tokio::task::spawn_blocking(move || {
            let pki = Arc::new(Pki::generate().unwrap());
            let ws = (0..n)
                .map(|_| {
                    Arc::new(std::sync::Mutex::new(
                        WitnessProc::start(opts(pki.clone())).unwrap(),
                    ))
                })
                .collect();
            (pki, ws)
        })
        .await
        .unwrap()
    }

    /// Asserts the history is clean AND that the run did meaningful work.
    pub fn assert_clean(what: &str, history: &History, counts: &Counts, kills: u64, dropped: u64) {
        let summary = history.check().unwrap_or_else(|v| {
            panic!(
                "{what}: invariant violated: {}",
                v.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        });
        eprintln!("{what}: {summary:?} {counts} kills={kills} dropped={dropped}");
        assert!(
            Counts::get(&counts.acquired) >= 5,
            "{what}: too few grants: {counts}"
        );
        assert!(
            summary.handovers >= 3,
            "{what}: too few handovers: {summary:?}"
        );
        assert!(
            summary.holders >= 3,
            "{what}: too few distinct holders: {summary:?}"
        );
        assert!(
            Counts::get(&counts.renewed) >= 5,
            "{what}: too few renewals: {counts}"
        );
        assert!(
            Counts::get(&counts.refused) >= 10,
            "{what}: contenders never collided: {counts}"
        );
        assert!(kills >= 1, "{what}: no witness was killed");
        assert!(dropped >= 1, "{what}: no message was dropped");
    }
}
