//! Fault injection for lease tests: a [`LeaseTransport`] wrapper that delays
//! and drops requests and replies, and a killer that `kill -9`s and restarts
//! witness processes at random moments.
//!
//! The nasty case is a reply dropped *after* the witness applied the request:
//! the witness granted, the client thinks it did not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use continuum_shared::lease::{Request, Response};
use continuum_shared::transport::{BoxFuture, LeaseTransport, TransportError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the wrapper does to each call.
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// Random delay in `[0, max_delay]` before the request and again before
    /// the reply is handed back.
    pub max_delay: Duration,
    /// Probability that a request never reaches the witness.
    pub drop_request: f64,
    /// Probability that the witness's reply is lost after it applied the request.
    pub drop_reply: f64,
    /// A fixed extra delay on every reply (after the witness applied it):
    /// used to show that a deadline counted from the reply is unsafe.
    pub reply_delay: Duration,
}

/// Counts of what the wrapper did, for assertions that faults happened.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub calls: AtomicU64,
    pub dropped_requests: AtomicU64,
    pub dropped_replies: AtomicU64,
}

impl FaultStats {
    pub fn dropped(&self) -> u64 {
        self.dropped_requests.load(Ordering::Relaxed) + self.dropped_replies.load(Ordering::Relaxed)
    }
}

/// A transport that misbehaves on purpose.
pub struct FaultyTransport<T> {
    inner: T,
    cfg: FaultConfig,
    rng: Mutex<StdRng>,
    pub stats: FaultStats,
}

impl<T: LeaseTransport> FaultyTransport<T> {
    pub fn new(inner: T, cfg: FaultConfig, seed: u64) -> Self {
        Self {
            inner,
            cfg,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            stats: FaultStats::default(),
        }
    }

    fn roll(&self) -> (Duration, bool, Duration, bool) {
        let mut rng = self.rng.lock().expect("rng lock");
        let mut delay = || {
            if self.cfg.max_delay.is_zero() {
                Duration::ZERO
            } else {
                self.cfg.max_delay.mul_f64(rng.random::<f64>())
            }
        };
        let d1 = delay();
        let d2 = delay();
        let drop_req = rng.random_bool(self.cfg.drop_request.clamp(0.0, 1.0));
        let drop_rep = rng.random_bool(self.cfg.drop_reply.clamp(0.0, 1.0));
        (d1, drop_req, d2, drop_rep)
    }
}

impl<T: LeaseTransport> LeaseTransport for FaultyTransport<T> {
    fn call<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Result<Response, TransportError>> {
        Box::pin(async move {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            let (before, drop_req, after, drop_rep) = self.roll();
            tokio::time::sleep(before).await;
            if drop_req {
                self.stats.dropped_requests.fetch_add(1, Ordering::Relaxed);
                return Err(TransportError::Dropped);
            }
            let result = self.inner.call(req).await;
            tokio::time::sleep(after + self.cfg.reply_delay).await;
            if drop_rep {
                self.stats.dropped_replies.fetch_add(1, Ordering::Relaxed);
                return Err(TransportError::Dropped);
            }
            result
        })
    }

    fn endpoint(&self) -> String {
        format!("faulty+{}", self.inner.endpoint())
    }
}

/// Something the killer can crash and bring back (a witness or etcd process).
pub trait Crashable: Send {
    /// `kill -9` now.
    fn kill9(&mut self) -> anyhow::Result<()>;
    /// Start again on the same address and data.
    fn restart(&mut self) -> BoxFuture<'_, anyhow::Result<()>>;
}

/// Kills and restarts members of `targets` at random moments until `until`,
/// keeping each one down for a random time up to `max_down`. Returns how many
/// kills it did.
pub async fn kill_randomly<C: Crashable>(
    targets: &mut [C],
    until: tokio::time::Instant,
    every: (Duration, Duration),
    max_down: Duration,
    seed: u64,
) -> anyhow::Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kills = 0;
    if targets.is_empty() {
        return Ok(0);
    }
    loop {
        let wait = every.0 + (every.1.saturating_sub(every.0)).mul_f64(rng.random::<f64>());
        if tokio::time::Instant::now() + wait >= until {
            break;
        }
        tokio::time::sleep(wait).await;
        let i = rng.random_range(0..targets.len());
        targets[i].kill9()?;
        kills += 1;
        tokio::time::sleep(max_down.mul_f64(rng.random::<f64>())).await;
        targets[i].restart().await?;
    }
    Ok(kills)
}
