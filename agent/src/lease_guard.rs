//! Keeping a held lease and fencing when it runs out, shared by the direct
//! PostgreSQL runner (`failover`) and the CNPG controller (`continuum`).
//!
//! Both run beside their decision loops so that a slow database or API call
//! can never stretch the time a region acts as primary (invariant 2):
//!
//! * [`renewer`] renews a grant about every TTL/3 until renewals fail past its
//!   conservative deadline, publishing each renewed grant (or `None`);
//! * [`fence_at_deadline`] calls the fence the instant the published grant's
//!   deadline passes without a renewal, and also when its publisher goes away
//!   (the loop stopped or leadership was lost) at the last deadline it knew;
//! * [`fence_at_deadline_unless_adopted`] does the same, except that once the
//!   publisher is gone it watches the witnesses until that deadline for a
//!   successor of this region (a new leader pod) that adopted the grant and
//!   recorded under it, and then stands down instead of fencing (the
//!   successor's own guard is armed by then). See [`successor_verdict`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use continuum_shared::lease::LeaseName;
use continuum_shared::quorum::{Grant, MajorityView, QuorumClient};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

/// Renews `grant` about every TTL/3 until renewals fail past its deadline,
/// or until another grant (a newer epoch) replaces it in `tx`.
pub async fn renewer(
    client: Arc<QuorumClient>,
    mut grant: Grant,
    tx: watch::Sender<Option<Grant>>,
) {
    let every = grant.ttl / 3;
    let retry = (grant.ttl / 20).max(Duration::from_millis(20));
    let mut next = grant.sent_at + every;
    loop {
        sleep_until(next).await;
        if tx.borrow().as_ref().map(|g| g.epoch) != Some(grant.epoch) {
            return;
        }
        match client.renew(&grant).await {
            Ok(g) => {
                next = g.sent_at + every;
                grant = g.clone();
                // Publish only while this epoch is still the current grant:
                // a release (planned handover) may have cleared it meanwhile.
                let current = tx.send_if_modified(|cur| {
                    let same = cur.as_ref().map(|c| c.epoch) == Some(g.epoch);
                    if same {
                        *cur = Some(g);
                    }
                    same
                });
                if !current {
                    return;
                }
            }
            Err(e) => {
                if Instant::now() >= grant.deadline {
                    tracing::warn!(epoch = %grant.epoch, reason = %e, "renewals failed until the deadline: lease lost");
                    tx.send_replace(None);
                    return;
                }
                next = Instant::now() + retry;
            }
        }
    }
}

/// Calls `fence(grant, reason)` the moment the grant published in `grant`
/// reaches its deadline unrenewed; then waits for the next grant. When the
/// publisher goes away, fences at the last deadline and returns.
pub async fn fence_at_deadline<F, Fut>(grant: watch::Receiver<Option<Grant>>, fence: F)
where
    F: Fn(Grant, &'static str) -> Fut,
    Fut: Future<Output = ()>,
{
    guard(grant, fence, None).await;
}

/// How a guard whose lease holder stopped recognises a successor: the
/// witnesses of the lease, and the highest metadata `seq` the holder ever
/// used for it (the holder stores it *before* sending each metadata write,
/// so a write still in flight when the holder stopped is counted too).
#[derive(Clone)]
pub struct SuccessorWatch {
    pub quorum: Arc<QuorumClient>,
    pub lease: LeaseName,
    pub last_seq: Arc<AtomicU64>,
    /// The runner's writer id (`LeaseMeta::writer`).
    pub writer: u64,
}

/// The guard stood down: a successor of this region adopted the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOver {
    pub grant_epoch: continuum_shared::lease::Epoch,
    /// The successor's metadata `seq` at the witnesses.
    pub successor_seq: u64,
    /// The highest `seq` this holder used.
    pub own_seq: u64,
}

/// What one majority read tells a guard whose holder stopped (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Another process of this region adopted the grant and recorded under
    /// it: it guards the lease now; do not fence.
    HandedOver { successor_seq: u64 },
    /// No evidence of a successor (yet): keep the fence armed.
    NoSuccessor(&'static str),
}

/// Whether `view` proves that another process of this region continues
/// `grant`: a majority sees this region as the live holder at the grant's
/// epoch (still the newest), and the metadata at that epoch was written by
/// a successor of this holder: it names this holder's writer id as the one
/// it adopted the grant from (`LeaseMeta::adopted_from`), and its `seq` is
/// above every `seq` this holder used (`own_seq`). Only a holder of the
/// grant can write metadata at its epoch (the witnesses check holder and
/// epoch), and a runner writes metadata only after its adoption renewed the
/// grant at a majority, i.e. with its own fence guard armed.
///
/// A record this holder's *predecessor* wrote (say, one still in flight
/// when this holder adopted) cannot pass for a successor's, whatever its
/// `seq`: it was written before this holder existed, so it cannot name this
/// holder's writer id. Records without writer ids (older agents) never
/// count: the guard then fences at the deadline, as it would without a
/// successor.
pub fn successor_verdict(
    view: &MajorityView,
    grant: &Grant,
    own_seq: u64,
    own_writer: u64,
) -> Verdict {
    let Some((holder, epoch)) = view.holder.as_ref() else {
        return Verdict::NoSuccessor("no live holder at a majority");
    };
    if *holder != grant.holder {
        return Verdict::NoSuccessor("another region holds the lease");
    }
    if *epoch != grant.epoch || view.max_epoch != grant.epoch {
        return Verdict::NoSuccessor("the live epoch is not this grant's");
    }
    match view.meta.as_ref() {
        Some((e, m)) if *e == grant.epoch => {
            if m.adopted_from != Some(own_writer) || m.writer == Some(own_writer) {
                Verdict::NoSuccessor(
                    "the newest record at this epoch is not a successor's of this holder",
                )
            } else if m.seq <= own_seq {
                Verdict::NoSuccessor("no record newer than this holder's at this epoch")
            } else {
                Verdict::HandedOver {
                    successor_seq: m.seq,
                }
            }
        }
        _ => Verdict::NoSuccessor("no record at this epoch"),
    }
}

/// [`fence_at_deadline`], except that when the publisher goes away it polls
/// the witnesses about every TTL/10 until the last deadline: if a successor
/// adopted the grant ([`successor_verdict`]), it returns without fencing;
/// otherwise it fences exactly at the deadline (a read still running then,
/// or answering after it, is ignored). Returns `Some` when it stood down.
pub async fn fence_at_deadline_unless_adopted<F, Fut>(
    grant: watch::Receiver<Option<Grant>>,
    fence: F,
    successor: SuccessorWatch,
) -> Option<HandedOver>
where
    F: Fn(Grant, &'static str) -> Fut,
    Fut: Future<Output = ()>,
{
    guard(grant, fence, Some(successor)).await
}

async fn guard<F, Fut>(
    mut grant: watch::Receiver<Option<Grant>>,
    fence: F,
    successor: Option<SuccessorWatch>,
) -> Option<HandedOver>
where
    F: Fn(Grant, &'static str) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let current = grant.borrow_and_update().clone();
        let Some(g) = current else {
            if grant.changed().await.is_err() {
                return None;
            }
            continue;
        };
        tokio::select! {
            changed = grant.changed() => if changed.is_err() {
                // Nobody renews any more: fence when the promise runs out,
                // unless a successor of this region took the grant over.
                if let Some(w) = &successor {
                    if let Some(h) = watch_for_successor(w, &g).await {
                        return Some(h);
                    }
                    fence(g, "lease holder stopped and no successor adopted the grant by the deadline").await;
                    return None;
                }
                sleep_until(g.deadline).await;
                fence(g, "lease holder stopped: deadline passed without renewal").await;
                return None;
            },
            _ = sleep_until(g.deadline) => {
                let same = grant.borrow().as_ref().is_some_and(|c| c.deadline == g.deadline);
                if same {
                    fence(g, "lease deadline passed without renewal").await;
                    // Arm again only for the next grant.
                    if grant.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

/// Polls the witnesses until `g.deadline`; `Some` as soon as a read that
/// answered before the deadline shows a successor.
async fn watch_for_successor(w: &SuccessorWatch, g: &Grant) -> Option<HandedOver> {
    let every = (g.ttl / 10).max(Duration::from_millis(20));
    loop {
        let started = Instant::now();
        if started >= g.deadline {
            return None;
        }
        let read = tokio::select! {
            biased;
            _ = sleep_until(g.deadline) => return None,
            r = w.quorum.read_majority(&w.lease) => r,
        };
        // An answer that arrived at or after the deadline proves nothing
        // about the time the fence was due.
        if Instant::now() >= g.deadline {
            return None;
        }
        let own_seq = w.last_seq.load(Ordering::SeqCst);
        match read {
            Ok(view) => match successor_verdict(&view, g, own_seq, w.writer) {
                Verdict::HandedOver { successor_seq } => {
                    return Some(HandedOver {
                        grant_epoch: g.epoch,
                        successor_seq,
                        own_seq,
                    })
                }
                Verdict::NoSuccessor(why) => {
                    tracing::debug!(lease = %w.lease, epoch = %g.epoch, reason = why, "no successor yet; fence stays armed");
                }
            },
            Err(e) => {
                tracing::debug!(lease = %w.lease, epoch = %g.epoch, error = %e, "successor check: no majority read");
            }
        }
        sleep_until((started + every).min(g.deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use continuum_shared::lease::{Epoch, HolderId, LeaseMeta};
    use continuum_shared::quorum::model::ModelWitness;
    use continuum_shared::quorum::QuorumConfig;
    use continuum_shared::transport::{BoxFuture, LeaseTransport, TransportError};
    use std::sync::atomic::AtomicUsize;

    fn h(s: &str) -> HolderId {
        HolderId::new(s).expect("holder id")
    }

    fn grant(epoch: u64) -> Grant {
        let now = Instant::now();
        Grant {
            name: LeaseName::new("continuum/db/app").expect("lease name"),
            holder: h("a"),
            epoch: Epoch(epoch),
            ttl: Duration::from_secs(5),
            sent_at: now,
            granted_at: now,
            deadline: now + Duration::from_secs(4),
            granted_by: 2,
        }
    }

    fn meta(seq: u64, writer: u64, adopted_from: Option<u64>) -> LeaseMeta {
        LeaseMeta {
            sync_standby: Some(h("b")),
            seq,
            writer: Some(writer),
            adopted_from,
            ..LeaseMeta::default()
        }
    }

    /// This holder's writer id in the table; 9 is its successor, 5 its
    /// predecessor (which adopted from 3).
    const ME: u64 = 7;

    #[test]
    fn successor_verdict_table() {
        let g = grant(3);
        let view = |holder: Option<(&str, u64)>, max: u64, meta_at: Option<(u64, LeaseMeta)>| {
            MajorityView {
                holder: holder.map(|(x, e)| (h(x), Epoch(e))),
                expired_at_majority: holder.is_none(),
                max_epoch: Epoch(max),
                meta: meta_at.map(|(e, m)| (Epoch(e), m)),
                answered: 3,
            }
        };
        let successor = |seq| meta(seq, 9, Some(ME));
        let stand_down = |seq| Verdict::HandedOver { successor_seq: seq };
        let keep = Verdict::NoSuccessor;
        let not_successor = "the newest record at this epoch is not a successor's of this holder";
        let unwritten = LeaseMeta {
            seq: 101,
            ..LeaseMeta::default()
        };
        let cases = [
            (
                "successor adopted from me and recorded after me",
                view(Some(("a", 3)), 3, Some((3, successor(101)))),
                100,
                stand_down(101),
            ),
            (
                "only my own last record",
                view(Some(("a", 3)), 3, Some((3, meta(100, ME, Some(5))))),
                100,
                keep(not_successor),
            ),
            (
                "my own record with a seq I have not published (cannot happen; still mine)",
                view(Some(("a", 3)), 3, Some((3, meta(150, ME, None)))),
                100,
                keep(not_successor),
            ),
            (
                "my predecessor's late write, seq above mine (clock skew)",
                view(Some(("a", 3)), 3, Some((3, meta(150, 5, Some(3))))),
                100,
                keep(not_successor),
            ),
            (
                "a record without writer id (older agent)",
                view(Some(("a", 3)), 3, Some((3, unwritten))),
                100,
                keep(not_successor),
            ),
            (
                "successor's record, yet not above my seq",
                view(Some(("a", 3)), 3, Some((3, successor(100)))),
                100,
                keep("no record newer than this holder's at this epoch"),
            ),
            (
                "adopted, nothing recorded yet at this epoch",
                view(Some(("a", 3)), 3, Some((2, successor(500)))),
                100,
                keep("no record at this epoch"),
            ),
            (
                "no metadata at all",
                view(Some(("a", 3)), 3, None),
                0,
                keep("no record at this epoch"),
            ),
            (
                "lease free at a majority",
                view(None, 3, Some((3, successor(101)))),
                100,
                keep("no live holder at a majority"),
            ),
            (
                "the other region holds",
                view(Some(("b", 4)), 4, Some((4, successor(101)))),
                100,
                keep("another region holds the lease"),
            ),
            (
                "this region, but a newer epoch",
                view(Some(("a", 4)), 4, Some((4, successor(101)))),
                100,
                keep("the live epoch is not this grant's"),
            ),
            (
                "this region at my epoch, yet a newer epoch granted somewhere",
                view(Some(("a", 3)), 4, Some((3, successor(101)))),
                100,
                keep("the live epoch is not this grant's"),
            ),
        ];
        for (name, v, own, want) in cases {
            assert_eq!(successor_verdict(&v, &g, own, ME), want, "{name}");
        }
    }

    /// A model witness whose reads can be slowed down and counted.
    struct Slow {
        inner: ModelWitness,
        delay_ms: Arc<AtomicU64>,
        reads: Arc<AtomicUsize>,
    }

    impl LeaseTransport for Slow {
        fn call<'a>(
            &'a self,
            req: &'a continuum_shared::lease::Request,
        ) -> BoxFuture<'a, Result<continuum_shared::lease::Response, TransportError>> {
            Box::pin(async move {
                if matches!(req, continuum_shared::lease::Request::Read(_)) {
                    self.reads.fetch_add(1, Ordering::SeqCst);
                    let ms = self.delay_ms.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Ok(self.inner.apply(req))
            })
        }

        fn endpoint(&self) -> String {
            self.inner.endpoint()
        }
    }

    struct World {
        client: Arc<QuorumClient>,
        delay_ms: Arc<AtomicU64>,
        reads: Arc<AtomicUsize>,
        lease: LeaseName,
    }

    fn world() -> World {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let witnesses: Vec<Arc<dyn LeaseTransport>> = (0..3)
            .map(|i| {
                Arc::new(Slow {
                    inner: ModelWitness::new(i, Duration::ZERO),
                    delay_ms: delay_ms.clone(),
                    reads: reads.clone(),
                }) as Arc<dyn LeaseTransport>
            })
            .collect();
        World {
            client: Arc::new(
                QuorumClient::new(witnesses, QuorumConfig::default()).expect("quorum client"),
            ),
            delay_ms,
            reads,
            lease: LeaseName::new("continuum/db/app").expect("lease name"),
        }
    }

    /// Runs the guard for `g` with its publisher gone at once; returns its
    /// outcome and when (if ever) it fenced.
    async fn run_guard(w: &World, g: Grant, own_seq: u64) -> (Option<HandedOver>, Option<Instant>) {
        let (tx, rx) = watch::channel(Some(g));
        let fenced = Arc::new(std::sync::Mutex::new(None));
        let f = fenced.clone();
        let task = tokio::spawn(fence_at_deadline_unless_adopted(
            rx,
            move |_g, _why| {
                let f = f.clone();
                async move {
                    if let Ok(mut x) = f.lock() {
                        *x = Some(Instant::now());
                    }
                }
            },
            SuccessorWatch {
                quorum: w.client.clone(),
                lease: w.lease.clone(),
                last_seq: Arc::new(AtomicU64::new(own_seq)),
                writer: ME,
            },
        ));
        tokio::task::yield_now().await;
        drop(tx);
        let out = task.await.expect("guard task");
        let at = *fenced.lock().expect("lock");
        (out, at)
    }

    #[tokio::test(start_paused = true)]
    async fn stands_down_for_a_successor_that_recorded() {
        let w = world();
        let ttl = Duration::from_secs(5);
        let a = h("a");
        let g = w.client.acquire(&w.lease, &a, ttl).await.expect("acquire");
        let mine = meta(LeaseMeta::next_seq(0, None), ME, None);
        w.client.update_meta(&g, &mine).await.expect("my meta");
        // The successor adopts and records a second later.
        let client = w.client.clone();
        let lease = w.lease.clone();
        let epoch = g.epoch;
        let own = mine.seq;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let g2 = client.adopt(&lease, &a, epoch, ttl).await.expect("adopt");
            client
                .update_meta(&g2, &meta(LeaseMeta::next_seq(0, Some(own)), 9, Some(ME)))
                .await
                .expect("successor meta");
        });
        let deadline = g.deadline;
        let (out, fenced) = run_guard(&w, g, own).await;
        let h = out.expect("stood down");
        assert!(h.successor_seq > h.own_seq);
        assert_eq!(fenced, None, "no fence");
        assert!(Instant::now() < deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn fences_at_the_deadline_without_a_successor() {
        let w = world();
        let g = w
            .client
            .acquire(&w.lease, &h("a"), Duration::from_secs(5))
            .await
            .expect("acquire");
        let seq = LeaseMeta::next_seq(0, None);
        w.client
            .update_meta(&g, &meta(seq, ME, None))
            .await
            .expect("meta");
        let deadline = g.deadline;
        let (out, fenced) = run_guard(&w, g, seq).await;
        assert_eq!(out, None);
        assert_eq!(fenced, Some(deadline), "fenced exactly at the deadline");
        // It kept looking about every TTL/10 meanwhile (3 witnesses a read).
        let reads = w.reads.load(Ordering::SeqCst);
        assert!(reads >= 3 * 8, "{reads} witness reads");
    }

    /// The residual case the writer ids close: a record of this holder's
    /// predecessor that lands late, with a `seq` above this holder's (its
    /// clock ahead), is not a successor's: the guard fences at the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_predecessors_late_record_does_not_stand_the_guard_down() {
        let w = world();
        let ttl = Duration::from_secs(5);
        let a = h("a");
        let g = w.client.acquire(&w.lease, &a, ttl).await.expect("acquire");
        let mine = meta(LeaseMeta::next_seq(0, None), ME, Some(5));
        w.client.update_meta(&g, &mine).await.expect("my meta");
        let client = w.client.clone();
        let late = meta(mine.seq + 60_000, 5, Some(3));
        let g_late = g.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            client
                .update_meta(&g_late, &late)
                .await
                .expect("late write lands");
        });
        let deadline = g.deadline;
        let own = mine.seq;
        let (out, fenced) = run_guard(&w, g, own).await;
        assert_eq!(out, None, "stood down for a predecessor's record");
        assert_eq!(fenced, Some(deadline), "fenced exactly at the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_answering_after_the_deadline_is_ignored() {
        let w = world();
        let ttl = Duration::from_secs(5);
        let a = h("a");
        let g = w.client.acquire(&w.lease, &a, ttl).await.expect("acquire");
        // A successor already recorded, but every read takes longer than
        // what is left of the grant.
        let g2 = w
            .client
            .adopt(&w.lease, &a, g.epoch, ttl)
            .await
            .expect("adopt");
        w.client
            .update_meta(&g2, &meta(LeaseMeta::next_seq(0, None), 9, Some(ME)))
            .await
            .expect("meta");
        w.delay_ms.store(10_000, Ordering::SeqCst);
        let deadline = g.deadline;
        let (out, fenced) = run_guard(&w, g, 0).await;
        assert_eq!(out, None);
        assert_eq!(fenced, Some(deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn plain_guard_fences_at_the_last_deadline() {
        let g = grant(1);
        let deadline = g.deadline;
        let (tx, rx) = watch::channel(Some(g));
        let fenced = Arc::new(std::sync::Mutex::new(None));
        let f = fenced.clone();
        let task = tokio::spawn(fence_at_deadline(rx, move |_g, why| {
            let f = f.clone();
            async move {
                if let Ok(mut x) = f.lock() {
                    *x = Some((Instant::now(), why));
                }
            }
        }));
        tokio::task::yield_now().await;
        drop(tx);
        task.await.expect("guard");
        let got = *fenced.lock().expect("lock");
        assert_eq!(
            got,
            Some((
                deadline,
                "lease holder stopped: deadline passed without renewal"
            ))
        );
    }
}
