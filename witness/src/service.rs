//! The witness service: one validated request in, one response out,
//! independent of the transport (HTTPS today, the WireGuard link later).

use std::sync::Arc;
use std::time::Instant;

use continuum_shared::lease::{Epoch, HolderId, LeaseName, LeaseView, Request, Response};
use tokio::sync::mpsc::UnboundedSender;

use crate::arbiter::Effect;
use crate::metrics::Metrics;
use crate::store::Store;

/// A change of holder or epoch, for observers such as DNS publication.
/// Sent after the change is durable. Expiry is not an event: observers that
/// need it read [`Witness::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseChange {
    pub name: LeaseName,
    /// The new holder; `None` after a release.
    pub holder: Option<HolderId>,
    pub epoch: Epoch,
}

pub struct Witness {
    store: Store,
    metrics: Arc<Metrics>,
    changes: Option<UnboundedSender<LeaseChange>>,
}

impl Witness {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Witness {
        Witness {
            store,
            metrics,
            changes: None,
        }
    }

    /// Send every grant and release to `sink` (never blocks the lease path).
    pub fn with_change_sink(mut self, sink: UnboundedSender<LeaseChange>) -> Witness {
        self.changes = Some(sink);
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    /// Whether the store is loaded and reachable (`/readyz`).
    pub async fn ready(&self) -> bool {
        self.store.ready().await
    }

    /// Every lease this witness knows, as seen now.
    pub async fn snapshot(&self) -> Result<Vec<LeaseView>, crate::store::StoreError> {
        self.store.snapshot(Instant::now()).await
    }

    /// Answer one validated request ([`Request::decode`] already ran). A
    /// durable change is on disk before this returns.
    pub async fn handle(&self, req: Request) -> Response {
        let received = Instant::now();
        let op = req.op();
        let response = match self.store.apply(&req, received).await {
            Ok(applied) => {
                let name = req.name();
                match applied.effect {
                    Effect::Grant => {
                        self.metrics.grants.inc();
                        self.metrics
                            .epoch
                            .with_label_values(&[name.as_str()])
                            .set(i64::try_from(applied.epoch.0).unwrap_or(i64::MAX));
                        let holder = applied.holder.as_ref().map(HolderId::as_str).unwrap_or("");
                        match &applied.previous_holder {
                            Some(prev) if Some(prev) != applied.holder.as_ref() => {
                                tracing::info!(lease = %name, holder, epoch = applied.epoch.0, previous_holder = %prev, reason = "previous holder's grant ended", "lease taken over")
                            }
                            _ => {
                                tracing::info!(lease = %name, holder, epoch = applied.epoch.0, reason = "lease free and epoch above every granted one", "lease granted")
                            }
                        }
                        self.notify(name, applied.holder.clone(), applied.epoch);
                    }
                    Effect::Release => {
                        tracing::info!(lease = %name, epoch = applied.epoch.0, reason = "holder released it", "lease released");
                        self.notify(name, None, applied.epoch);
                    }
                    Effect::Meta => {
                        if let Request::UpdateMeta(u) = &req {
                            tracing::info!(lease = %name, holder = %u.holder, epoch = u.epoch.0, seq = u.meta.seq,
                                sync_standby = u.meta.sync_standby.as_ref().map(HolderId::as_str).unwrap_or(""),
                                confirmed_lsn = u.meta.confirmed_lsn.unwrap_or(0),
                                handover_to = u.meta.handover.as_ref().map(|h| h.to.as_str()).unwrap_or(""),
                                handover_final_lsn = u.meta.handover.as_ref().and_then(|h| h.final_lsn).unwrap_or(0),
                                reason = "holder updated its record", "lease metadata stored");
                        }
                    }
                    Effect::Extend => {
                        tracing::debug!(lease = %name, epoch = applied.epoch.0, "lease renewed")
                    }
                    Effect::None => {
                        if applied.response.is_refusal() {
                            tracing::debug!(lease = %name, op, response = ?applied.response, "lease request refused")
                        }
                    }
                }
                applied.response
            }
            Err(e) => {
                self.metrics
                    .store_errors
                    .with_label_values(&[e.label()])
                    .inc();
                tracing::warn!(lease = %req.name(), op, error = %e, "store failed; request refused, nothing acknowledged");
                Response::Error {
                    code: format!("store_{}", e.label()),
                    message: e.to_string(),
                }
            }
        };
        self.metrics
            .record(op, &response, received.elapsed().as_secs_f64());
        response
    }

    fn notify(&self, name: &LeaseName, holder: Option<HolderId>, epoch: Epoch) {
        if let Some(sink) = &self.changes {
            let _ = sink.send(LeaseChange {
                name: name.clone(),
                holder,
                epoch,
            });
        }
    }
}
