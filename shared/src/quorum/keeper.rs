//! [`LeaseKeeper`]: holds a lease in the background, renewing about every
//! TTL/3, and publishes whether it holds on a `watch` channel.
//!
//! The published [`LeaseState::Holding`] carries its deadline: a user must
//! check [`LeaseState::is_held_at`] against the current time rather than wait
//! for `NotHolding`, so a stuck task or a slow wake-up can never stretch the
//! time it acts as primary (invariant 2).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use super::{Grant, QuorumClient, QuorumError};
use crate::lease::{Epoch, HolderId, LeaseName};

/// Whether this holder holds the lease, as last published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    NotHolding,
    Holding { epoch: Epoch, deadline: Instant },
}

impl LeaseState {
    /// The epoch held at `now`, judged by the deadline, not by the task.
    pub fn held_epoch_at(&self, now: Instant) -> Option<Epoch> {
        match self {
            LeaseState::Holding { epoch, deadline } if now < *deadline => Some(*epoch),
            _ => None,
        }
    }

    pub fn is_held_at(&self, now: Instant) -> bool {
        self.held_epoch_at(now).is_some()
    }
}

/// Keeps one lease for one holder until [`LeaseKeeper::shutdown`].
#[derive(Debug)]
pub struct LeaseKeeper {
    state: watch::Receiver<LeaseState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts contending for `name` as `holder` with `ttl`.
    pub fn spawn(
        client: Arc<QuorumClient>,
        name: LeaseName,
        holder: HolderId,
        ttl: Duration,
    ) -> Result<Self, QuorumError> {
        client.config().validate(ttl)?;
        let (state_tx, state) = watch::channel(LeaseState::NotHolding);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(client, name, holder, ttl, state_tx, stop_rx));
        Ok(Self { state, stop, task })
    }

    /// A receiver of every state change.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Whether this holder may act as primary at `now`.
    pub fn is_held_at(&self, now: Instant) -> bool {
        self.state().is_held_at(now)
    }

    /// Stops renewing and releases the lease at the witnesses.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    client: Arc<QuorumClient>,
    name: LeaseName,
    holder: HolderId,
    ttl: Duration,
    state: watch::Sender<LeaseState>,
    mut stop: watch::Receiver<bool>,
) {
    let renew_every = ttl / 3;
    let retry_every = (ttl / 10).max(Duration::from_millis(20));
    let mut grant: Option<Grant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let Some(g) = grant.clone() else {
            tokio::select! {
                _ = stop.changed() => break,
                r = client.acquire(&name, &holder, ttl) => match r {
                    Ok(g) => {
                        let _ = state.send(LeaseState::Holding { epoch: g.epoch, deadline: g.deadline });
                        grant = Some(g);
                    }
                    Err(e) => {
                        tracing::debug!(lease = %name, %holder, reason = %e, "not holding; will try again");
                        tokio::select! {
                            _ = stop.changed() => break,
                            _ = sleep(renew_every) => {}
                        }
                    }
                },
            }
            continue;
        };
        tokio::select! {
            _ = stop.changed() => break,
            _ = sleep_until(g.sent_at + renew_every) => {}
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = sleep_until(g.deadline) => {
                tracing::warn!(lease = %name, %holder, epoch = %g.epoch, "deadline passed without a renewal: no longer holding");
                let _ = state.send(LeaseState::NotHolding);
                grant = None;
            }
            r = client.renew(&g) => match r {
                Ok(ng) => {
                    let _ = state.send(LeaseState::Holding { epoch: ng.epoch, deadline: ng.deadline });
                    grant = Some(ng);
                }
                Err(_) => {
                    // The old deadline stands; try again soon, but stop at the deadline.
                    let wait = retry_every.min(g.deadline.saturating_duration_since(Instant::now()));
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = sleep(wait) => {}
                    }
                    if Instant::now() >= g.deadline {
                        tracing::warn!(lease = %name, %holder, epoch = %g.epoch, "renewals failed until the deadline: no longer holding");
                        let _ = state.send(LeaseState::NotHolding);
                        grant = None;
                    }
                }
            },
        }
    }
    let _ = state.send(LeaseState::NotHolding);
    if let Some(g) = grant {
        client.release(&g).await;
    }
}
