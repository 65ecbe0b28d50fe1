//! The lease arbiter: the decision a single witness makes for one lease.
//!
//! Pure: the current record, a validated request and the receive instant go
//! in; the response, the new record and whether that record must be durable
//! before the response is sent come out. Stores run it and do the I/O.
//!
//! # What is durable, and why renewals are not
//!
//! A witness must never grant an epoch lower than or equal to one it granted
//! before, and must never let a lease it promised to a holder go to another
//! holder before that promise ran out, even across `kill -9` (DESIGN.md,
//! invariant 1). So:
//!
//! * **Durable before the reply** (fsync): every grant (holder, epoch,
//!   `max_epoch`, TTL), every release, every metadata change, and every
//!   renewal whose TTL is longer than the TTL already on disk.
//! * **In memory only**: expiry instants (monotonic clock, meaningless after a
//!   restart) and renewals that do not lengthen the TTL. Renewals are the hot
//!   path; not writing them keeps it free of fsync.
//!
//! **Restart rule.** On startup every persisted lease that had a holder is
//! treated as live for its full persisted TTL from the restart instant: its
//! real expiry is unknown, but every promise this witness made was at most
//! that TTL long and was made before the crash, so it has certainly ended by
//! then. This is what makes in-memory renewals safe: a renewal the witness
//! forgot cannot have promised more than "persisted TTL from before the
//! crash". Epochs are persisted before a grant is answered, so a restarted
//! witness never grants an epoch at or below one it granted before.

use std::time::{Duration, Instant};

use continuum_shared::lease::{
    Epoch, HolderId, LeaseMeta, LeaseName, LeaseView, Request, Response,
};
use serde::{Deserialize, Serialize};

/// One lease as this witness holds it in memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRecord {
    /// Holder of the last grant; `None` once released (or never granted).
    /// Whether the grant is still live depends on `expires_at`.
    pub holder: Option<HolderId>,
    /// Epoch of the last grant.
    pub epoch: Epoch,
    /// Highest epoch ever granted for this lease.
    pub max_epoch: Epoch,
    /// TTL of the holder's last grant or renewal.
    pub ttl_ms: u64,
    /// Longest TTL on disk for the current grant; the restart rule uses it.
    pub persisted_ttl_ms: u64,
    /// When the current grant runs out, by this witness's monotonic clock.
    pub expires_at: Option<Instant>,
    /// Last metadata written by a holder, kept across expiry and new grants.
    pub meta: Option<LeaseMeta>,
    /// Epoch of the holder that wrote `meta`.
    pub meta_epoch: Epoch,
}

/// The durable form of a [`LeaseRecord`] (no instants: they do not survive a
/// restart; see the restart rule in the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PersistedLease {
    #[serde(default)]
    pub holder: Option<HolderId>,
    pub epoch: Epoch,
    pub max_epoch: Epoch,
    pub ttl_ms: u64,
    #[serde(default)]
    pub meta: Option<LeaseMeta>,
    #[serde(default)]
    pub meta_epoch: Epoch,
}

/// What a decision did to the record (stores with their own arbiter, like
/// etcd, map these to their operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing changed: a read or a refusal.
    None,
    /// The holder's grant was extended (renewal or repeated acquire).
    Extend,
    /// A new holder/epoch was granted.
    Grant,
    /// The holder gave the lease up.
    Release,
    /// The metadata record was replaced.
    Meta,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub response: Response,
    pub effect: Effect,
    /// The new record must be on disk before `response` is sent.
    pub persist: bool,
    /// The record after the request (equal to the input when `effect` is `None`).
    pub record: LeaseRecord,
}

impl LeaseRecord {
    /// Whether a holder's grant is live at `now`.
    pub fn is_live(&self, now: Instant) -> bool {
        self.holder.is_some() && self.expires_at.is_some_and(|e| e > now)
    }

    /// The live holder at `now`, if any.
    pub fn live_holder(&self, now: Instant) -> Option<&HolderId> {
        if self.is_live(now) {
            self.holder.as_ref()
        } else {
            None
        }
    }

    fn remaining_ms(&self, now: Instant) -> Option<u64> {
        if !self.is_live(now) {
            return None;
        }
        self.expires_at.map(|e| {
            u64::try_from(e.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
        })
    }

    /// The lease as a reader sees it at `now`.
    pub fn view(&self, name: &LeaseName, now: Instant) -> LeaseView {
        LeaseView {
            name: name.clone(),
            holder: self.live_holder(now).cloned(),
            epoch: self.epoch,
            max_epoch: self.max_epoch,
            remaining_ms: self.remaining_ms(now),
            meta: self.meta.clone(),
            meta_epoch: self.meta_epoch,
        }
    }

    /// The durable part of this record.
    pub fn persisted(&self) -> PersistedLease {
        PersistedLease {
            holder: self.holder.clone(),
            epoch: self.epoch,
            max_epoch: self.max_epoch,
            ttl_ms: self.persisted_ttl_ms,
            meta: self.meta.clone(),
            meta_epoch: self.meta_epoch,
        }
    }

    /// Rebuild a record from disk at startup, applying the restart rule: a
    /// lease that had a holder is live for its full persisted TTL from `now`.
    ///
    /// `restart_rule = false` exists only so that a test can prove the
    /// checker catches its absence (see `config::restart_rule_enabled`).
    pub fn restored(p: PersistedLease, now: Instant, restart_rule: bool) -> LeaseRecord {
        let expires_at = match (&p.holder, restart_rule) {
            (Some(_), true) => Some(now + Duration::from_millis(p.ttl_ms)),
            // Without the rule the grant is taken as already over.
            (Some(_), false) => Some(now),
            (None, _) => None,
        };
        LeaseRecord {
            holder: p.holder,
            epoch: p.epoch,
            max_epoch: p.max_epoch.max(p.epoch),
            ttl_ms: p.ttl_ms,
            persisted_ttl_ms: p.ttl_ms,
            expires_at,
            meta: p.meta,
            meta_epoch: p.meta_epoch,
        }
    }
}

fn unchanged(current: &LeaseRecord, response: Response) -> Decision {
    Decision {
        response,
        effect: Effect::None,
        persist: false,
        record: current.clone(),
    }
}

fn not_holder(current: &LeaseRecord, now: Instant) -> Response {
    Response::NotHolder {
        holder: current.live_holder(now).cloned(),
        epoch: current.epoch,
    }
}

/// Extend the holder's grant by `ttl_ms` from `now`. A promise is never
/// shortened: a renewal with a smaller TTL keeps the later expiry.
fn extend(current: &LeaseRecord, ttl_ms: u64, now: Instant) -> Decision {
    let mut record = current.clone();
    let new_expiry = now + Duration::from_millis(ttl_ms);
    record.expires_at = Some(match current.expires_at {
        Some(old) if old > new_expiry => old,
        _ => new_expiry,
    });
    record.ttl_ms = ttl_ms;
    // Only a TTL longer than the one on disk needs a write: the restart
    // rule already covers any renewal up to the persisted TTL.
    let persist = ttl_ms > current.persisted_ttl_ms;
    if persist {
        record.persisted_ttl_ms = ttl_ms;
    }
    Decision {
        response: Response::Granted {
            epoch: current.epoch,
            ttl_ms,
        },
        effect: Effect::Extend,
        persist,
        record,
    }
}

/// Decide one request for one lease. `now` is when the request was received.
pub fn decide(current: &LeaseRecord, req: &Request, now: Instant) -> Decision {
    match req {
        Request::Acquire(a) => {
            if current.holder.as_ref() == Some(&a.holder) && current.epoch == a.epoch {
                return extend(current, a.ttl_ms, now);
            }
            if let (true, Some(holder)) = (current.is_live(now), &current.holder) {
                return unchanged(
                    current,
                    Response::Held {
                        holder: holder.clone(),
                        epoch: current.epoch,
                        remaining_ms: current.remaining_ms(now).unwrap_or(0),
                    },
                );
            }
            if a.epoch <= current.max_epoch {
                return unchanged(
                    current,
                    Response::EpochTooLow {
                        max_epoch: current.max_epoch,
                    },
                );
            }
            let record = LeaseRecord {
                holder: Some(a.holder.clone()),
                epoch: a.epoch,
                max_epoch: a.epoch,
                ttl_ms: a.ttl_ms,
                persisted_ttl_ms: a.ttl_ms,
                expires_at: Some(now + Duration::from_millis(a.ttl_ms)),
                meta: current.meta.clone(),
                meta_epoch: current.meta_epoch,
            };
            Decision {
                response: Response::Granted {
                    epoch: a.epoch,
                    ttl_ms: a.ttl_ms,
                },
                effect: Effect::Grant,
                persist: true,
                record,
            }
        }
        Request::Renew(a) => {
            // Allowed even after expiry, as long as nobody took over.
            if current.holder.as_ref() == Some(&a.holder) && current.epoch == a.epoch {
                extend(current, a.ttl_ms, now)
            } else {
                unchanged(current, not_holder(current, now))
            }
        }
        Request::Release(r) => {
            if current.holder.as_ref() == Some(&r.holder) && current.epoch == r.epoch {
                let mut record = current.clone();
                record.holder = None;
                record.expires_at = None;
                Decision {
                    response: Response::Released,
                    effect: Effect::Release,
                    persist: true,
                    record,
                }
            } else if current.holder.is_none() && current.epoch == r.epoch {
                // Already released (a retried release): nothing to do.
                unchanged(current, Response::Released)
            } else {
                unchanged(current, not_holder(current, now))
            }
        }
        Request::Read(r) => unchanged(current, Response::State(current.view(&r.name, now))),
        Request::UpdateMeta(u) => {
            let holds = current.is_live(now)
                && current.holder.as_ref() == Some(&u.holder)
                && current.epoch == u.epoch;
            if !holds {
                return unchanged(current, not_holder(current, now));
            }
            let stored = (current.meta_epoch, current.meta.as_ref().map(|m| m.seq));
            let newer = current.meta.is_none() || (u.epoch, Some(u.meta.seq)) >= stored;
            if !newer {
                // An older update arriving late: the witness keeps the highest.
                return unchanged(current, Response::MetaStored);
            }
            let mut record = current.clone();
            record.meta = Some(u.meta.clone());
            record.meta_epoch = u.epoch;
            Decision {
                response: Response::MetaStored,
                effect: Effect::Meta,
                persist: true,
                record,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use continuum_shared::lease::{Acquire, Read, Release, UpdateMeta};

    fn name() -> LeaseName {
        LeaseName::new("continuum/db/app").unwrap()
    }
    fn h(s: &str) -> HolderId {
        HolderId::new(s).unwrap()
    }
    fn acq(holder: &str, epoch: u64, ttl_ms: u64) -> Request {
        Request::Acquire(Acquire {
            name: name(),
            holder: h(holder),
            epoch: Epoch(epoch),
            ttl_ms,
        })
    }
    fn renew(holder: &str, epoch: u64, ttl_ms: u64) -> Request {
        Request::Renew(Acquire {
            name: name(),
            holder: h(holder),
            epoch: Epoch(epoch),
            ttl_ms,
        })
    }
    fn release(holder: &str, epoch: u64) -> Request {
        Request::Release(Release {
            name: name(),
            holder: h(holder),
            epoch: Epoch(epoch),
        })
    }
    fn meta(holder: &str, epoch: u64, seq: u64) -> Request {
        Request::UpdateMeta(UpdateMeta {
            name: name(),
            holder: h(holder),
            epoch: Epoch(epoch),
            meta: LeaseMeta {
                sync_standby: Some(h("standby")),
                confirmed_lsn: Some(seq * 100),
                seq,
                handover: None,
                writer: Some(7),
                adopted_from: None,
            },
        })
    }
    fn read() -> Request {
        Request::Read(Read { name: name() })
    }
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Applies steps `(offset from t0 in ms, request, expected response
    /// predicate, expected persist)` in order, threading the record.
    struct Step {
        at_ms: u64,
        req: Request,
        expect: fn(&Response) -> bool,
        persist: bool,
    }

    fn run(steps: &[Step]) -> LeaseRecord {
        let t0 = Instant::now();
        let mut rec = LeaseRecord::default();
        for (i, s) in steps.iter().enumerate() {
            let d = decide(&rec, &s.req, t0 + ms(s.at_ms));
            assert!(
                (s.expect)(&d.response),
                "step {i} ({:?}): unexpected {:?}",
                s.req,
                d.response
            );
            assert_eq!(d.persist, s.persist, "step {i} persist ({:?})", s.req);
            if d.effect == Effect::None {
                assert_eq!(d.record, rec, "step {i}: refusal must not change state");
            }
            rec = d.record;
        }
        rec
    }

    macro_rules! step {
        ($at:expr, $req:expr, $pat:pat, $persist:expr) => {
            Step {
                at_ms: $at,
                req: $req,
                expect: |r| matches!(r, $pat),
                persist: $persist,
            }
        };
    }

    #[test]
    fn grant_hold_expire_takeover() {
        let rec = run(&[
            step!(
                0,
                acq("eu-1", 1, 1000),
                Response::Granted {
                    epoch: Epoch(1),
                    ttl_ms: 1000
                },
                true
            ),
            step!(
                10,
                acq("us-1", 2, 1000),
                Response::Held {
                    epoch: Epoch(1),
                    ..
                },
                false
            ),
            // Same holder and epoch again: an extension, no write.
            step!(
                20,
                acq("eu-1", 1, 1000),
                Response::Granted {
                    epoch: Epoch(1),
                    ..
                },
                false
            ),
            step!(500, renew("eu-1", 1, 1000), Response::Granted { .. }, false),
            step!(
                600,
                renew("us-1", 1, 1000),
                Response::NotHolder { .. },
                false
            ),
            step!(1400, acq("us-1", 2, 1000), Response::Held { .. }, false),
            // Expired at 1500: a stale epoch is refused, a higher one granted.
            step!(
                1600,
                acq("us-1", 1, 1000),
                Response::EpochTooLow {
                    max_epoch: Epoch(1)
                },
                false
            ),
            step!(
                1600,
                acq("us-1", 2, 1000),
                Response::Granted {
                    epoch: Epoch(2),
                    ..
                },
                true
            ),
            step!(
                1700,
                renew("eu-1", 1, 1000),
                Response::NotHolder {
                    epoch: Epoch(2),
                    ..
                },
                false
            ),
        ]);
        assert_eq!(rec.max_epoch, Epoch(2));
        assert_eq!(rec.holder, Some(h("us-1")));
    }

    #[test]
    fn renew_after_expiry_without_takeover_is_allowed() {
        run(&[
            step!(0, acq("eu-1", 3, 500), Response::Granted { .. }, true),
            step!(
                2000,
                renew("eu-1", 3, 500),
                Response::Granted {
                    epoch: Epoch(3),
                    ..
                },
                false
            ),
            step!(2100, acq("us-1", 4, 500), Response::Held { .. }, false),
        ]);
    }

    #[test]
    fn longer_ttl_on_renewal_is_persisted_and_promises_never_shrink() {
        let t0 = Instant::now();
        let rec = run(&[
            step!(0, acq("eu-1", 1, 1000), Response::Granted { .. }, true),
            step!(
                100,
                renew("eu-1", 1, 5000),
                Response::Granted { ttl_ms: 5000, .. },
                true
            ),
            step!(
                200,
                renew("eu-1", 1, 300),
                Response::Granted { ttl_ms: 300, .. },
                false
            ),
        ]);
        assert_eq!(rec.persisted_ttl_ms, 5000);
        // Expiry stays at 100 + 5000 ms, not 200 + 300 ms.
        let d = decide(&rec, &acq("us-1", 2, 1000), t0 + ms(4000));
        assert!(
            matches!(d.response, Response::Held { .. }),
            "{:?}",
            d.response
        );
    }

    #[test]
    fn release_frees_but_keeps_epochs_and_is_idempotent() {
        let rec = run(&[
            step!(0, acq("eu-1", 5, 1000), Response::Granted { .. }, true),
            step!(10, release("us-1", 5), Response::NotHolder { .. }, false),
            step!(10, release("eu-1", 4), Response::NotHolder { .. }, false),
            step!(20, release("eu-1", 5), Response::Released, true),
            step!(30, release("eu-1", 5), Response::Released, false),
            step!(
                40,
                renew("eu-1", 5, 1000),
                Response::NotHolder { holder: None, .. },
                false
            ),
            step!(
                50,
                acq("us-1", 5, 1000),
                Response::EpochTooLow {
                    max_epoch: Epoch(5)
                },
                false
            ),
            step!(
                60,
                acq("us-1", 6, 1000),
                Response::Granted {
                    epoch: Epoch(6),
                    ..
                },
                true
            ),
        ]);
        assert_eq!(rec.max_epoch, Epoch(6));
    }

    #[test]
    fn metadata_needs_the_live_holder_and_keeps_the_highest() {
        let rec = run(&[
            step!(0, meta("eu-1", 1, 1), Response::NotHolder { .. }, false),
            step!(0, acq("eu-1", 1, 1000), Response::Granted { .. }, true),
            step!(10, meta("eu-1", 1, 2), Response::MetaStored, true),
            step!(20, meta("eu-1", 1, 1), Response::MetaStored, false),
            step!(30, meta("us-1", 1, 9), Response::NotHolder { .. }, false),
            step!(40, meta("eu-1", 2, 9), Response::NotHolder { .. }, false),
            // Expired: the former holder may no longer write.
            step!(1100, meta("eu-1", 1, 3), Response::NotHolder { .. }, false),
            step!(1200, acq("us-1", 2, 1000), Response::Granted { .. }, true),
            // Meta survives the new grant, so the new holder can read it.
            step!(
                1210,
                read(),
                Response::State(LeaseView {
                    meta_epoch: Epoch(1),
                    meta: Some(LeaseMeta { seq: 2, .. }),
                    ..
                }),
                false
            ),
            step!(1220, meta("us-1", 2, 0), Response::MetaStored, true),
        ]);
        assert_eq!(rec.meta_epoch, Epoch(2));
        assert_eq!(rec.meta.map(|m| m.seq), Some(0));
    }

    /// A planned handover: the holder records the intent (with its final
    /// LSN) and releases; the record survives the release and the restart
    /// rule, so the named successor (and every other agent) reads it from a
    /// free lease, and the successor's grant at the next epoch replaces it.
    #[test]
    fn handover_intent_survives_release_and_restart() {
        use continuum_shared::lease::Handover;
        let intent = |final_lsn: Option<u64>, seq: u64| {
            Request::UpdateMeta(UpdateMeta {
                name: name(),
                holder: h("eu-1"),
                epoch: Epoch(4),
                meta: LeaseMeta {
                    sync_standby: Some(h("us-1")),
                    confirmed_lsn: None,
                    seq,
                    handover: Some(Handover {
                        to: h("us-1"),
                        final_lsn,
                        promotion_token: None,
                    }),
                    ..LeaseMeta::default()
                },
            })
        };
        let rec = run(&[
            step!(0, acq("eu-1", 4, 1000), Response::Granted { .. }, true),
            step!(10, intent(None, 1), Response::MetaStored, true),
            step!(20, intent(Some(0x3000028), 2), Response::MetaStored, true),
            step!(30, release("eu-1", 4), Response::Released, true),
        ]);
        let t0 = Instant::now();
        let restored = LeaseRecord::restored(rec.persisted(), t0, true);
        let Response::State(v) = decide(&restored, &read(), t0).response else {
            panic!("read answers a state")
        };
        assert_eq!(v.holder, None, "released: free");
        assert_eq!(v.max_epoch, Epoch(4));
        assert_eq!(v.meta_epoch, Epoch(4));
        let handover = v.meta.and_then(|m| m.handover).expect("intent kept");
        assert_eq!(handover.to, h("us-1"));
        assert_eq!(handover.final_lsn, Some(0x3000028));
        // The successor takes the next epoch at once (no TTL wait after a
        // release) and its own record replaces the intent.
        let d = decide(&restored, &acq("us-1", 5, 1000), t0 + ms(1));
        assert!(matches!(
            d.response,
            Response::Granted {
                epoch: Epoch(5),
                ..
            }
        ));
        let plain = Request::UpdateMeta(UpdateMeta {
            name: name(),
            holder: h("us-1"),
            epoch: Epoch(5),
            meta: LeaseMeta {
                sync_standby: Some(h("eu-1")),
                seq: 1,
                ..Default::default()
            },
        });
        let d = decide(&d.record, &plain, t0 + ms(2));
        assert_eq!(d.response, Response::MetaStored);
        assert_eq!(d.record.meta.and_then(|m| m.handover), None);
    }

    #[test]
    fn read_reports_live_holder_only() {
        let t0 = Instant::now();
        let rec = run(&[step!(
            0,
            acq("eu-1", 7, 1000),
            Response::Granted { .. },
            true
        )]);
        let live = decide(&rec, &read(), t0 + ms(100));
        let Response::State(v) = live.response else {
            panic!()
        };
        assert_eq!(v.holder, Some(h("eu-1")));
        assert_eq!(v.epoch, Epoch(7));
        assert!(v.remaining_ms.is_some_and(|r| r <= 900));
        let later = decide(&rec, &read(), t0 + ms(2000));
        let Response::State(v) = later.response else {
            panic!()
        };
        assert_eq!(v.holder, None);
        assert_eq!(v.remaining_ms, None);
        assert_eq!(v.max_epoch, Epoch(7));
    }

    #[test]
    fn restart_rule_keeps_a_persisted_holder_live_for_its_full_ttl() {
        let t0 = Instant::now();
        let rec = run(&[step!(
            0,
            acq("eu-1", 2, 1000),
            Response::Granted { .. },
            true
        )]);
        let restart = t0 + ms(5000);
        let restored = LeaseRecord::restored(rec.persisted(), restart, true);
        let d = decide(&restored, &acq("us-1", 3, 1000), restart + ms(999));
        assert!(
            matches!(d.response, Response::Held { .. }),
            "{:?}",
            d.response
        );
        let d = decide(&restored, &renew("eu-1", 2, 1000), restart + ms(10));
        assert!(matches!(d.response, Response::Granted { .. }));
        let d = decide(&restored, &acq("us-1", 2, 1000), restart + ms(1001));
        assert!(matches!(
            d.response,
            Response::EpochTooLow {
                max_epoch: Epoch(2)
            }
        ));
        let d = decide(&restored, &acq("us-1", 3, 1000), restart + ms(1001));
        assert!(matches!(d.response, Response::Granted { .. }));
        // Without the rule the lease is free at once (the unsafe test mode).
        let unsafe_restored = LeaseRecord::restored(rec.persisted(), restart, false);
        let d = decide(&unsafe_restored, &acq("us-1", 3, 1000), restart);
        assert!(matches!(d.response, Response::Granted { .. }));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Acquire(usize, u64, u64),
            Renew(usize, u64, u64),
            Release(usize, u64),
            Meta(usize, u64, u64),
            Read,
            Restart,
        }

        const HOLDERS: [&str; 3] = ["eu-1", "us-1", "ap-1"];

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..3usize, 1..12u64, 200..2000u64).prop_map(|(h, e, t)| Op::Acquire(h, e, t)),
                (0..3usize, 1..12u64, 200..2000u64).prop_map(|(h, e, t)| Op::Renew(h, e, t)),
                (0..3usize, 1..12u64).prop_map(|(h, e)| Op::Release(h, e)),
                (0..3usize, 1..12u64, 0..5u64).prop_map(|(h, e, s)| Op::Meta(h, e, s)),
                Just(Op::Read),
                Just(Op::Restart),
            ]
        }

        proptest! {
            /// Over any sequence of requests at increasing times, with
            /// restarts (through the persisted form): granted epochs strictly
            /// increase, a new holder is never granted while another holder's
            /// promise (as answered) is running, and refusals change nothing.
            #[test]
            fn epochs_increase_and_promises_never_overlap(
                steps in proptest::collection::vec((0..400u64, op()), 1..80)
            ) {
                let t0 = Instant::now();
                let mut now = t0;
                let mut rec = LeaseRecord::default();
                // What survived on disk (only persisted decisions reach it).
                let mut disk = PersistedLease::default();
                let mut last_granted = Epoch(0);
                // Latest promise end per (holder, epoch) as answered.
                let mut promise: Option<(HolderId, Epoch, Instant)> = None;
                for (dt, op) in steps {
                    now += ms(dt);
                    let req = match op {
                        Op::Acquire(i, e, t) => acq(HOLDERS[i], e, t),
                        Op::Renew(i, e, t) => renew(HOLDERS[i], e, t),
                        Op::Release(i, e) => release(HOLDERS[i], e),
                        Op::Meta(i, e, s) => meta(HOLDERS[i], e, s),
                        Op::Read => read(),
                        Op::Restart => {
                            rec = LeaseRecord::restored(disk.clone(), now, true);
                            continue;
                        }
                    };
                    let d = decide(&rec, &req, now);
                    if d.effect == Effect::None {
                        prop_assert_eq!(&d.record, &rec);
                    }
                    if d.persist {
                        disk = d.record.persisted();
                    }
                    if let Response::Granted { epoch, ttl_ms } = d.response {
                        let holder = d.record.holder.clone().expect("granted has a holder");
                        if d.effect == Effect::Grant {
                            prop_assert!(epoch > last_granted, "epoch {} after {}", epoch, last_granted);
                            last_granted = epoch;
                            if let Some((ph, pe, until)) = &promise {
                                prop_assert!(
                                    *until <= now || (ph == &holder && *pe == epoch),
                                    "granted {}@{} while {}@{} promised", holder, epoch, ph, pe
                                );
                            }
                        }
                        let end = now + ms(ttl_ms);
                        let keep = match &promise {
                            Some((ph, pe, until)) if *ph == holder && *pe == epoch => (*until).max(end),
                            _ => end,
                        };
                        promise = Some((holder, epoch, keep));
                    }
                    if d.response == Response::Released {
                        // The holder gave its promise up voluntarily.
                        promise = None;
                    }
                    rec = d.record;
                    prop_assert!(rec.max_epoch >= rec.epoch);
                    prop_assert!(disk.max_epoch <= rec.max_epoch);
                }
            }
        }
    }
}
