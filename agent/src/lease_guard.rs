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
//!   (the loop stopped or leadership was lost) at the last deadline it knew.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use continuum_shared::quorum::{Grant, QuorumClient};
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
/// reaches its deadline unrenewed; then waits for the next grant.
pub async fn fence_at_deadline<F, Fut>(mut grant: watch::Receiver<Option<Grant>>, fence: F)
where
    F: Fn(Grant, &'static str) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let current = grant.borrow_and_update().clone();
        let Some(g) = current else {
            if grant.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = grant.changed() => if changed.is_err() {
                // Nobody renews any more: fence when the promise runs out.
                sleep_until(g.deadline).await;
                fence(g, "lease holder stopped: deadline passed without renewal").await;
                return;
            },
            _ = sleep_until(g.deadline) => {
                let same = grant.borrow().as_ref().is_some_and(|c| c.deadline == g.deadline);
                if same {
                    fence(g, "lease deadline passed without renewal").await;
                    // Arm again only for the next grant.
                    if grant.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
