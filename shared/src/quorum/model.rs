//! A reference model of ONE witness's lease semantics, in process, for tests
//! of the quorum client (feature `reference-model`). The real witness lives in
//! `continuum-witness`; this model states the contract the client relies on:
//!
//! - Acquire grants iff no live holder and the epoch exceeds every epoch
//!   granted before (or re-grants the same holder at the same epoch);
//! - the TTL runs from when the witness received the request;
//! - a crash loses live grants but never the highest epoch, and with the
//!   restart rule the witness grants nothing for `restart_block` afterwards.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::lease::{Epoch, HolderId, LeaseMeta, LeaseName, LeaseView, Request, Response};
use crate::transport::{BoxFuture, LeaseTransport, TransportError};

#[derive(Debug, Default)]
struct Entry {
    holder: Option<HolderId>,
    epoch: Epoch,
    max_epoch: Epoch,
    expires: Option<Instant>,
    meta: Option<LeaseMeta>,
    meta_epoch: Epoch,
}

impl Entry {
    fn live(&self, now: Instant) -> Option<&HolderId> {
        match (&self.holder, self.expires) {
            (Some(h), Some(t)) if now < t => Some(h),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    leases: HashMap<LeaseName, Entry>,
    recovering_until: Option<Instant>,
}

/// One in-process witness.
#[derive(Debug)]
pub struct ModelWitness {
    id: usize,
    state: Mutex<State>,
    restart_block: Duration,
}

impl ModelWitness {
    /// `restart_block` is how long it grants nothing after a crash (the
    /// restart rule); zero disables the rule.
    pub fn new(id: usize, restart_block: Duration) -> Self {
        Self {
            id,
            state: Mutex::new(State::default()),
            restart_block,
        }
    }

    /// kill -9 and restart: live grants are lost, epochs and metadata kept.
    pub fn crash(&self) {
        let now = Instant::now();
        if let Ok(mut s) = self.state.lock() {
            for e in s.leases.values_mut() {
                e.holder = None;
                e.expires = None;
            }
            if !self.restart_block.is_zero() {
                s.recovering_until = Some(now + self.restart_block);
            }
        }
    }

    /// Applies one request at the current time.
    pub fn apply(&self, req: &Request) -> Response {
        let now = Instant::now();
        let Ok(mut s) = self.state.lock() else {
            return Response::Error {
                code: "poisoned".into(),
                message: "model lock poisoned".into(),
            };
        };
        if let Err(e) = req.validate() {
            return Response::Error {
                code: e.label().into(),
                message: e.to_string(),
            };
        }
        let recovering = s.recovering_until.is_some_and(|t| now < t);
        let e = s.leases.entry(req.name().clone()).or_default();
        match req {
            Request::Acquire(a) | Request::Renew(a) => {
                let is_acquire = matches!(req, Request::Acquire(_));
                let live = e.live(now).cloned();
                let mine = e.holder.as_ref() == Some(&a.holder) && e.epoch == a.epoch;
                if recovering && !(mine && live.is_some()) {
                    return Response::Error {
                        code: "recovering".into(),
                        message: "restarted; grants nothing until every old grant expired".into(),
                    };
                }
                if mine && (live.is_some() || e.max_epoch == a.epoch) {
                    e.expires = Some(now + a.ttl());
                    return Response::Granted {
                        epoch: a.epoch,
                        ttl_ms: a.ttl_ms,
                    };
                }
                if !is_acquire {
                    return Response::NotHolder {
                        holder: live,
                        epoch: e.epoch,
                    };
                }
                if let (Some(h), Some(t)) = (live, e.expires) {
                    return Response::Held {
                        holder: h,
                        epoch: e.epoch,
                        remaining_ms: t.saturating_duration_since(now).as_millis() as u64,
                    };
                }
                if a.epoch <= e.max_epoch {
                    return Response::EpochTooLow {
                        max_epoch: e.max_epoch,
                    };
                }
                e.holder = Some(a.holder.clone());
                e.epoch = a.epoch;
                e.max_epoch = a.epoch;
                e.expires = Some(now + a.ttl());
                Response::Granted {
                    epoch: a.epoch,
                    ttl_ms: a.ttl_ms,
                }
            }
            Request::Release(r) => {
                if e.holder.as_ref() == Some(&r.holder) && e.epoch == r.epoch {
                    e.holder = None;
                    e.expires = None;
                    Response::Released
                } else {
                    Response::NotHolder {
                        holder: e.live(now).cloned(),
                        epoch: e.epoch,
                    }
                }
            }
            Request::Read(r) => Response::State(LeaseView {
                name: r.name.clone(),
                holder: e.live(now).cloned(),
                epoch: e.epoch,
                max_epoch: e.max_epoch,
                remaining_ms: e
                    .live(now)
                    .and(e.expires)
                    .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                meta: e.meta.clone(),
                meta_epoch: e.meta_epoch,
            }),
            Request::UpdateMeta(u) => {
                if e.live(now) == Some(&u.holder) && e.epoch == u.epoch {
                    let newer = (u.epoch, u.meta.seq)
                        > (e.meta_epoch, e.meta.as_ref().map_or(0, |m| m.seq))
                        || e.meta.is_none();
                    if newer {
                        e.meta = Some(u.meta.clone());
                        e.meta_epoch = u.epoch;
                    }
                    Response::MetaStored
                } else {
                    Response::NotHolder {
                        holder: e.live(now).cloned(),
                        epoch: e.epoch,
                    }
                }
            }
        }
    }
}

impl LeaseTransport for ModelWitness {
    fn call<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Result<Response, TransportError>> {
        Box::pin(async move { Ok(self.apply(req)) })
    }

    fn endpoint(&self) -> String {
        format!("model://{}", self.id)
    }
}
