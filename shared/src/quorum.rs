//! The quorum client: holds a lease only with a majority of witnesses, and
//! tells its user a conservative local deadline (DESIGN.md invariants 1-3).
//!
//! The protocol is PaxosLease-shaped without a log: each witness arbitrates
//! alone (grants iff free and the proposed epoch exceeds every epoch it granted
//! before), and a proposer holds the lease iff a strict majority granted the
//! *same* epoch. Two majorities share a witness, and that witness grants to one
//! holder at a time, so two proposers never both hold. Like PaxosLease, the
//! proposer's timer starts *before* it sends: every witness counts the TTL from
//! when it received the request, which is after `t_send`, so
//! `t_send + TTL x (1 - max_drift) - margin` ends before any witness of the
//! majority can grant the lease to someone else, even if its clock runs fast.
//!
//! Decisions (what a set of replies means, the deadline) are pure functions,
//! tested by tables; the I/O is a concurrent fan-out over [`LeaseTransport`]s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::lease::{
    Acquire, Epoch, HolderId, LeaseMeta, LeaseName, LeaseView, Release, Request, Response,
    UpdateMeta,
};
use crate::transport::{LeaseTransport, TransportError};

pub mod keeper;
#[cfg(any(test, feature = "reference-model"))]
pub mod model;

pub use keeper::{LeaseKeeper, LeaseState};

/// How the client computes its deadline and retries.
#[derive(Debug, Clone)]
pub struct QuorumConfig {
    /// Largest rate difference between this host's monotonic clock and any
    /// witness's, as a fraction. The default 1% is ~100x what an unsynced
    /// quartz oscillator drifts (<= 100 ppm), so it also absorbs VM clock
    /// slew; the cost is TTL/100 of lease time.
    pub max_drift: f64,
    /// Subtracted from every deadline: covers the time between the holder's
    /// deadline check and its fence taking effect (timer wake-up latency, a
    /// scheduler stall, the database refusing the next commit). Default 200 ms;
    /// must stay well under the TTL (see [`QuorumConfig::validate`]).
    pub margin: Duration,
    /// Acquire rounds to try when witnesses answer `EpochTooLow` (each round
    /// proposes the highest epoch learned + 1). Bounded so that two dueling
    /// proposers back off to their callers instead of spinning.
    pub max_rounds: u32,
    /// UNSAFE, tests only: deadline = reply time + full TTL, no drift, no
    /// margin. Exists so a test can show the history checker catches a broken
    /// deadline rule. Never set it elsewhere.
    #[doc(hidden)]
    pub unsafe_deadline_from_reply: bool,
}

impl Default for QuorumConfig {
    fn default() -> Self {
        Self {
            max_drift: 0.01,
            margin: Duration::from_millis(200),
            max_rounds: 3,
            unsafe_deadline_from_reply: false,
        }
    }
}

impl QuorumConfig {
    /// Refuses settings under which a grant of `ttl` would leave the holder
    /// less than half its TTL of usable lease time.
    pub fn validate(&self, ttl: Duration) -> Result<(), QuorumError> {
        if !(0.0..0.5).contains(&self.max_drift) {
            return Err(QuorumError::Config(format!(
                "max_drift {} must be in [0, 0.5)",
                self.max_drift
            )));
        }
        let usable = ttl.mul_f64(1.0 - self.max_drift);
        if self.margin.saturating_mul(2) >= usable {
            return Err(QuorumError::Config(format!(
                "margin {:?} leaves less than half of TTL {ttl:?} usable",
                self.margin
            )));
        }
        if self.max_rounds == 0 {
            return Err(QuorumError::Config("max_rounds must be at least 1".into()));
        }
        Ok(())
    }
}

/// The conservative local deadline of a grant (invariant 2). `sent` is when
/// the request left (before any witness could start its TTL), `replied` when
/// the majority answer arrived (used only by the unsafe test switch).
pub fn conservative_deadline(
    cfg: &QuorumConfig,
    sent: Instant,
    replied: Instant,
    ttl: Duration,
) -> Instant {
    if cfg.unsafe_deadline_from_reply {
        return replied + ttl;
    }
    let usable = ttl.mul_f64(1.0 - cfg.max_drift).saturating_sub(cfg.margin);
    sent + usable
}

/// A lease held at a majority. Act as primary only while
/// [`Grant::is_held_at`] is true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: LeaseName,
    pub holder: HolderId,
    pub epoch: Epoch,
    /// TTL the majority granted (the smallest of their answers).
    pub ttl: Duration,
    /// When the successful request was sent: the deadline counts from here.
    pub sent_at: Instant,
    /// When the majority answer arrived: the holder knows it holds from here.
    pub granted_at: Instant,
    /// Past this instant the holder must act as if it had lost the lease.
    pub deadline: Instant,
    /// How many witnesses granted (at least a majority).
    pub granted_by: usize,
}

impl Grant {
    pub fn is_held_at(&self, now: Instant) -> bool {
        now < self.deadline
    }
}

/// What a majority of witnesses say about a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MajorityView {
    /// A live holder that a majority agree on (same holder, same epoch).
    pub holder: Option<(HolderId, Epoch)>,
    /// True when a majority of the answering witnesses see no live holder.
    pub expired_at_majority: bool,
    /// Highest epoch any answering witness ever granted.
    pub max_epoch: Epoch,
    /// Metadata with the highest `(meta_epoch, seq)` among the answers; a
    /// majority-acknowledged update is always among them (quorum intersection).
    pub meta: Option<(Epoch, LeaseMeta)>,
    /// How many witnesses answered.
    pub answered: usize,
}

/// Why a quorum operation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    #[error("lease {name} is held by {holder} at epoch {epoch} ({witnesses} witness(es) say so)")]
    Held {
        name: LeaseName,
        holder: HolderId,
        epoch: Epoch,
        witnesses: usize,
    },
    #[error("lease {name}: {granted} of {total} witnesses agreed, {needed} needed ({detail})")]
    NoMajority {
        name: LeaseName,
        granted: usize,
        needed: usize,
        total: usize,
        detail: String,
    },
    #[error("lease {name}: only {answered} of {total} witnesses answered, {needed} needed")]
    Unreachable {
        name: LeaseName,
        answered: usize,
        needed: usize,
        total: usize,
    },
    #[error("the grant of lease {0} is past its deadline")]
    Expired(LeaseName),
    #[error("quorum client configuration: {0}")]
    Config(String),
}

impl QuorumError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            QuorumError::Held { .. } => "held",
            QuorumError::NoMajority { .. } => "no_majority",
            QuorumError::Unreachable { .. } => "unreachable",
            QuorumError::Expired(_) => "expired",
            QuorumError::Config(_) => "config",
        }
    }
}

/// One witness's answer (or its absence).
#[derive(Debug)]
pub struct Reply {
    pub witness: usize,
    pub result: Result<Response, TransportError>,
}

/// The replies to one Acquire or Renew at `epoch`, summarized.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Witnesses that granted exactly the proposed epoch.
    pub granted: Vec<usize>,
    /// Smallest TTL among the grants.
    pub min_ttl_ms: Option<u64>,
    /// Witnesses that refused because someone holds it: (witness, holder, epoch).
    pub held: Vec<(usize, HolderId, Epoch)>,
    /// Witnesses whose highest epoch is at or above the proposal.
    pub too_low: usize,
    /// Witnesses that answered anything (refusals and errors included).
    pub answered: usize,
    /// Highest epoch mentioned in any answer.
    pub max_epoch_seen: Epoch,
    /// Short reasons for non-grants, for the error message.
    pub other: Vec<String>,
}

/// Summarizes replies to an Acquire/Renew proposing `epoch`.
pub fn tally(epoch: Epoch, replies: &[Reply]) -> Tally {
    let mut t = Tally::default();
    for r in replies {
        let resp = match &r.result {
            Ok(resp) => resp,
            Err(e) => {
                t.other.push(format!("w{}: {}", r.witness, e.label()));
                continue;
            }
        };
        t.answered += 1;
        match resp {
            Response::Granted { epoch: e, ttl_ms } if *e == epoch => {
                t.granted.push(r.witness);
                t.min_ttl_ms = Some(t.min_ttl_ms.map_or(*ttl_ms, |m| m.min(*ttl_ms)));
            }
            Response::Granted { epoch: e, .. } => {
                t.max_epoch_seen = t.max_epoch_seen.max(*e);
                t.other
                    .push(format!("w{}: granted other epoch {e}", r.witness));
            }
            Response::Held {
                holder, epoch: e, ..
            } => {
                t.max_epoch_seen = t.max_epoch_seen.max(*e);
                t.held.push((r.witness, holder.clone(), *e));
            }
            Response::EpochTooLow { max_epoch } => {
                t.max_epoch_seen = t.max_epoch_seen.max(*max_epoch);
                t.too_low += 1;
            }
            Response::NotHolder { holder, epoch: e } => {
                t.max_epoch_seen = t.max_epoch_seen.max(*e);
                let who = holder.as_ref().map_or("nobody", |h| h.as_str());
                t.other
                    .push(format!("w{}: not holder (holder {who} at {e})", r.witness));
            }
            Response::Error { code, .. } => t.other.push(format!("w{}: error {code}", r.witness)),
            other => t
                .other
                .push(format!("w{}: unexpected {other:?}", r.witness)),
        }
    }
    t.max_epoch_seen = t.max_epoch_seen.max(epoch);
    t
}

/// What to do after one acquire round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireStep {
    /// A majority granted: the lease is ours.
    Won,
    /// Release these (witness, epoch) grants of ours, then propose `next`.
    Retry {
        release: Vec<(usize, Epoch)>,
        next: Epoch,
    },
    /// Release these grants and report the failure.
    GiveUp {
        release: Vec<(usize, Epoch)>,
        error: QuorumError,
    },
}

/// Pure decision after an acquire round at `epoch` by `me` among `total`
/// witnesses. `last_round` forbids a retry.
///
/// Our own older grants still live at a witness (`Held` by `me`) are released
/// so that the next round can win there: `acquire` is only called by a holder
/// that holds nothing it relies on (see [`QuorumClient::acquire`]).
pub fn decide_acquire(
    name: &LeaseName,
    me: &HolderId,
    epoch: Epoch,
    total: usize,
    t: &Tally,
    last_round: bool,
) -> AcquireStep {
    let needed = total / 2 + 1;
    if t.granted.len() >= needed {
        return AcquireStep::Won;
    }
    let mut release: Vec<(usize, Epoch)> = t.granted.iter().map(|&w| (w, epoch)).collect();
    let mut mine_stale = 0;
    for (w, h, e) in &t.held {
        if h == me {
            release.push((*w, *e));
            mine_stale += 1;
        }
    }
    let others: Vec<&(usize, HolderId, Epoch)> =
        t.held.iter().filter(|(_, h, _)| h != me).collect();
    // Witnesses that could grant a higher epoch next round.
    let winnable = t.granted.len() + t.too_low + mine_stale;
    if !last_round && winnable >= needed && (t.too_low > 0 || mine_stale > 0) {
        return AcquireStep::Retry {
            release,
            next: t.max_epoch_seen.next(),
        };
    }
    let error = if let Some((_, holder, held_epoch)) = others.iter().max_by_key(|(_, _, e)| *e) {
        QuorumError::Held {
            name: name.clone(),
            holder: holder.clone(),
            epoch: *held_epoch,
            witnesses: others.iter().filter(|(_, h, _)| h == holder).count(),
        }
    } else if t.answered < needed {
        QuorumError::Unreachable {
            name: name.clone(),
            answered: t.answered,
            needed,
            total,
        }
    } else {
        QuorumError::NoMajority {
            name: name.clone(),
            granted: t.granted.len(),
            needed,
            total,
            detail: summary(t),
        }
    };
    AcquireStep::GiveUp { release, error }
}

fn summary(t: &Tally) -> String {
    let mut parts = Vec::new();
    if t.too_low > 0 {
        parts.push(format!("{} epoch too low", t.too_low));
    }
    parts.extend(t.other.iter().cloned());
    if parts.is_empty() {
        "no reason given".into()
    } else {
        parts.join(", ")
    }
}

/// Combines `Read` answers into a majority view; `None` without a majority
/// of answers.
pub fn combine_views(total: usize, views: &[LeaseView]) -> Option<MajorityView> {
    let needed = total / 2 + 1;
    if views.len() < needed {
        return None;
    }
    let free = views.iter().filter(|v| v.holder.is_none()).count();
    let mut counts: HashMap<(&HolderId, Epoch), usize> = HashMap::new();
    for v in views {
        if let Some(h) = &v.holder {
            *counts.entry((h, v.epoch)).or_default() += 1;
        }
    }
    let holder = counts
        .into_iter()
        .find(|(_, n)| *n >= needed)
        .map(|((h, e), _)| (h.clone(), e));
    let meta = views
        .iter()
        .filter_map(|v| v.meta.as_ref().map(|m| (v.meta_epoch, m)))
        .max_by_key(|(e, m)| (*e, m.seq))
        .map(|(e, m)| (e, m.clone()));
    Some(MajorityView {
        holder,
        expired_at_majority: free >= needed,
        max_epoch: views.iter().map(|v| v.max_epoch).max().unwrap_or_default(),
        meta,
        answered: views.len(),
    })
}

/// Talks to 1..N witnesses; holds a lease only with a strict majority.
pub struct QuorumClient {
    witnesses: Vec<Arc<dyn LeaseTransport>>,
    cfg: QuorumConfig,
    /// Highest epoch learned per lease: the next proposal is this + 1.
    known: Mutex<HashMap<LeaseName, Epoch>>,
}

impl std::fmt::Debug for QuorumClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuorumClient")
            .field("witnesses", &self.endpoints())
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// Which replies end a fan-out early.
#[derive(Clone, Copy)]
enum StopWhen {
    /// A majority granted this epoch.
    Granted(Epoch),
    /// A majority stored the metadata.
    MetaStored,
    /// A majority returned their view.
    States,
    /// Wait for every witness (bounded by the transport timeout).
    All,
}

impl QuorumClient {
    pub fn new(
        witnesses: Vec<Arc<dyn LeaseTransport>>,
        cfg: QuorumConfig,
    ) -> Result<Self, QuorumError> {
        if witnesses.is_empty() {
            return Err(QuorumError::Config("at least one witness is needed".into()));
        }
        Ok(Self {
            witnesses,
            cfg,
            known: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &QuorumConfig {
        &self.cfg
    }

    /// Witness count needed for any decision.
    pub fn majority(&self) -> usize {
        self.witnesses.len() / 2 + 1
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.witnesses.iter().map(|w| w.endpoint()).collect()
    }

    fn known_epoch(&self, name: &LeaseName) -> Epoch {
        self.known
            .lock()
            .map(|k| k.get(name).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    fn learn_epoch(&self, name: &LeaseName, epoch: Epoch) {
        if let Ok(mut k) = self.known.lock() {
            let e = k.entry(name.clone()).or_default();
            *e = (*e).max(epoch);
        }
    }

    /// Sends `req` to every witness concurrently; returns once `stop` holds
    /// or every witness answered. Calls still in flight keep running
    /// detached, so a witness that granted late is released by its TTL.
    async fn fan_out(&self, req: &Request, stop: StopWhen) -> Vec<Reply> {
        let mut set = JoinSet::new();
        for (i, w) in self.witnesses.iter().enumerate() {
            let w = Arc::clone(w);
            let req = req.clone();
            set.spawn(async move {
                let result = w.call(&req).await;
                Reply { witness: i, result }
            });
        }
        let needed = self.majority();
        let mut replies = Vec::with_capacity(self.witnesses.len());
        let mut hits = 0;
        while let Some(joined) = set.join_next().await {
            let Ok(reply) = joined else { continue };
            let hit = match (&reply.result, stop) {
                (Ok(Response::Granted { epoch, .. }), StopWhen::Granted(want)) => *epoch == want,
                (Ok(Response::MetaStored), StopWhen::MetaStored) => true,
                (Ok(Response::State(_)), StopWhen::States) => true,
                _ => false,
            };
            replies.push(reply);
            if hit {
                hits += 1;
                if hits >= needed {
                    set.detach_all();
                    break;
                }
            }
        }
        replies
    }

    /// Releases (witness, epoch) grants of `holder`, best effort and concurrently.
    async fn release_at(&self, name: &LeaseName, holder: &HolderId, which: &[(usize, Epoch)]) {
        let mut set = JoinSet::new();
        for &(i, epoch) in which {
            let Some(w) = self.witnesses.get(i) else {
                continue;
            };
            let w = Arc::clone(w);
            let req = Request::Release(Release {
                name: name.clone(),
                holder: holder.clone(),
                epoch,
            });
            set.spawn(async move { (i, epoch, w.call(&req).await) });
        }
        while let Some(joined) = set.join_next().await {
            if let Ok((i, epoch, Err(e))) = joined {
                tracing::debug!(lease = %name, witness = i, %epoch, error = %e, "release of a minority grant got no answer; it expires by TTL");
            }
        }
    }

    /// Takes the lease for `holder` with `ttl`, if a majority grants.
    ///
    /// The caller must not rely on any earlier grant of this holder for this
    /// lease: acquire releases this holder's stale grants it finds so the new
    /// epoch can win. (A holder whose renewal failed keeps its old grant until
    /// the old deadline passes, then calls acquire; [`LeaseKeeper`] does so.)
    pub async fn acquire(
        &self,
        name: &LeaseName,
        holder: &HolderId,
        ttl: Duration,
    ) -> Result<Grant, QuorumError> {
        self.cfg.validate(ttl)?;
        let total = self.witnesses.len();
        let mut epoch = self.known_epoch(name).next();
        for round in 1..=self.cfg.max_rounds {
            let req = Request::Acquire(Acquire {
                name: name.clone(),
                holder: holder.clone(),
                epoch,
                ttl_ms: ttl.as_millis() as u64,
            });
            // The timer starts before anything is sent (PaxosLease).
            let sent_at = Instant::now();
            let replies = self.fan_out(&req, StopWhen::Granted(epoch)).await;
            let replied_at = Instant::now();
            let t = tally(epoch, &replies);
            self.learn_epoch(name, t.max_epoch_seen);
            match decide_acquire(name, holder, epoch, total, &t, round == self.cfg.max_rounds) {
                AcquireStep::Won => {
                    let granted_ttl = t
                        .min_ttl_ms
                        .map_or(ttl, |ms| ttl.min(Duration::from_millis(ms)));
                    let grant = Grant {
                        name: name.clone(),
                        holder: holder.clone(),
                        epoch,
                        ttl: granted_ttl,
                        sent_at,
                        granted_at: replied_at,
                        deadline: conservative_deadline(
                            &self.cfg,
                            sent_at,
                            replied_at,
                            granted_ttl,
                        ),
                        granted_by: t.granted.len(),
                    };
                    tracing::info!(lease = %name, %holder, %epoch, granted_by = t.granted.len(), witnesses = total, round, "lease acquired: a majority granted the epoch");
                    return Ok(grant);
                }
                AcquireStep::Retry { release, next } => {
                    tracing::debug!(lease = %name, %holder, %epoch, next = %next, granted = t.granted.len(), too_low = t.too_low, "acquire round lost: retrying with a higher epoch");
                    self.release_at(name, holder, &release).await;
                    epoch = next;
                }
                AcquireStep::GiveUp { release, error } => {
                    self.release_at(name, holder, &release).await;
                    tracing::info!(lease = %name, %holder, %epoch, reason = %error, "lease not acquired");
                    return Err(error);
                }
            }
        }
        // decide_acquire never retries on the last round.
        Err(QuorumError::Config("max_rounds exhausted".into()))
    }

    /// Extends `grant`. On success the new grant replaces it; on failure the
    /// old grant (and its deadline) still stands and runs out by itself.
    pub async fn renew(&self, grant: &Grant) -> Result<Grant, QuorumError> {
        let total = self.witnesses.len();
        let req = Request::Renew(Acquire {
            name: grant.name.clone(),
            holder: grant.holder.clone(),
            epoch: grant.epoch,
            ttl_ms: grant.ttl.as_millis() as u64,
        });
        let sent_at = Instant::now();
        let replies = self.fan_out(&req, StopWhen::Granted(grant.epoch)).await;
        let replied_at = Instant::now();
        let t = tally(grant.epoch, &replies);
        self.learn_epoch(&grant.name, t.max_epoch_seen);
        let needed = self.majority();
        if t.granted.len() >= needed {
            let ttl = t
                .min_ttl_ms
                .map_or(grant.ttl, |ms| grant.ttl.min(Duration::from_millis(ms)));
            let deadline = conservative_deadline(&self.cfg, sent_at, replied_at, ttl);
            tracing::debug!(lease = %grant.name, holder = %grant.holder, epoch = %grant.epoch, granted_by = t.granted.len(), "lease renewed at a majority");
            return Ok(Grant {
                ttl,
                sent_at,
                granted_at: replied_at,
                deadline: deadline.max(grant.deadline),
                granted_by: t.granted.len(),
                ..grant.clone()
            });
        }
        let error = if t.answered < needed {
            QuorumError::Unreachable {
                name: grant.name.clone(),
                answered: t.answered,
                needed,
                total,
            }
        } else {
            QuorumError::NoMajority {
                name: grant.name.clone(),
                granted: t.granted.len(),
                needed,
                total,
                detail: summary(&t),
            }
        };
        tracing::warn!(lease = %grant.name, holder = %grant.holder, epoch = %grant.epoch, reason = %error, "renewal failed: the old deadline stands");
        Err(error)
    }

    /// Continues a grant of `holder` at `epoch` that an earlier process left
    /// (agent restart, leader change), by renewing it. Witnesses renew only
    /// their current holder at its current epoch, so success at a majority
    /// means nobody else took the lease; the deadline counts from this
    /// request's send time only, never from anything the earlier process did.
    pub async fn adopt(
        &self,
        name: &LeaseName,
        holder: &HolderId,
        epoch: Epoch,
        ttl: Duration,
    ) -> Result<Grant, QuorumError> {
        self.cfg.validate(ttl)?;
        let now = Instant::now();
        let stub = Grant {
            name: name.clone(),
            holder: holder.clone(),
            epoch,
            ttl,
            sent_at: now,
            granted_at: now,
            deadline: now,
            granted_by: 0,
        };
        self.learn_epoch(name, epoch);
        let grant = self.renew(&stub).await?;
        tracing::info!(lease = %name, %holder, %epoch, granted_by = grant.granted_by, "lease adopted: a majority renewed this region's grant");
        Ok(grant)
    }

    /// Gives the lease up at every witness (best effort; unanswered witnesses
    /// free it when the TTL runs out). Returns how many confirmed.
    pub async fn release(&self, grant: &Grant) -> usize {
        let req = Request::Release(Release {
            name: grant.name.clone(),
            holder: grant.holder.clone(),
            epoch: grant.epoch,
        });
        let replies = self.fan_out(&req, StopWhen::All).await;
        let released = replies
            .iter()
            .filter(|r| matches!(r.result, Ok(Response::Released)))
            .count();
        tracing::info!(lease = %grant.name, holder = %grant.holder, epoch = %grant.epoch, released, witnesses = self.witnesses.len(), "lease released");
        released
    }

    /// Reads the lease at a majority of witnesses.
    pub async fn read_majority(&self, name: &LeaseName) -> Result<MajorityView, QuorumError> {
        let req = Request::Read(crate::lease::Read { name: name.clone() });
        let replies = self.fan_out(&req, StopWhen::States).await;
        let views: Vec<LeaseView> = replies
            .into_iter()
            .filter_map(|r| match r.result {
                Ok(Response::State(v)) => Some(v),
                _ => None,
            })
            .collect();
        let total = self.witnesses.len();
        let view = combine_views(total, &views).ok_or_else(|| QuorumError::Unreachable {
            name: name.clone(),
            answered: views.len(),
            needed: self.majority(),
            total,
        })?;
        self.learn_epoch(name, view.max_epoch);
        Ok(view)
    }

    /// Records `meta` with the grant at a majority (invariant 3: the primary
    /// records before it weakens durability, so it must see `Ok` first).
    pub async fn update_meta(&self, grant: &Grant, meta: &LeaseMeta) -> Result<(), QuorumError> {
        if !grant.is_held_at(Instant::now()) {
            return Err(QuorumError::Expired(grant.name.clone()));
        }
        let req = Request::UpdateMeta(UpdateMeta {
            name: grant.name.clone(),
            holder: grant.holder.clone(),
            epoch: grant.epoch,
            meta: meta.clone(),
        });
        let replies = self.fan_out(&req, StopWhen::MetaStored).await;
        let stored = replies
            .iter()
            .filter(|r| matches!(r.result, Ok(Response::MetaStored)))
            .count();
        let needed = self.majority();
        if stored >= needed {
            tracing::info!(lease = %grant.name, epoch = %grant.epoch, seq = meta.seq, stored, "lease metadata recorded at a majority");
            return Ok(());
        }
        let answered = replies.iter().filter(|r| r.result.is_ok()).count();
        let total = self.witnesses.len();
        let error = if answered < needed {
            QuorumError::Unreachable {
                name: grant.name.clone(),
                answered,
                needed,
                total,
            }
        } else {
            QuorumError::NoMajority {
                name: grant.name.clone(),
                granted: stored,
                needed,
                total,
                detail: "metadata not stored at a majority".into(),
            }
        };
        tracing::warn!(lease = %grant.name, epoch = %grant.epoch, reason = %error, "lease metadata not recorded");
        Err(error)
    }
}

#[cfg(test)]
mod tests;
