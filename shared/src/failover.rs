//! Failover decisions for one region's agent: what to do next, given what it
//! observes. Pure (observation in, one action out) so every safety rule of
//! DESIGN.md is a table row here; the runner observes, applies the action and
//! observes again, which also makes it idempotent across kill -9 at any step.
//!
//! The rules, in the order they are checked:
//!
//! * **Fence before the lease can move** (invariant 2): a primary database
//!   whose region does not hold the lease by its conservative deadline is
//!   fenced before anything else happens.
//! * **No silent return** (invariant 5): a fenced primary re-acquires the
//!   lease only when no other region has held a newer epoch (the epoch it
//!   recorded in its own database equals the highest epoch any witness
//!   granted). Otherwise it stays fenced until an operator rebuilds it as a
//!   replica.
//! * **Promote only the synchronous standby** (invariant 3): a standby takes
//!   the lease only when it has expired at a majority, the mode is automatic,
//!   and the newest metadata record at the witnesses names this region as the
//!   guaranteed synchronous standby.
//! * **Record before weakening** (invariant 3): a primary drops its
//!   synchronous standby only after the witnesses record "no synchronous
//!   standby"; it records a standby only after the database requires it.
//! * **Promote only when caught up** (invariant 4) is enforced by the
//!   back-end's promotion, which waits for replay before promoting; the
//!   promotion's epoch is then recorded in the database (`RecordEpoch`).
//! * **Planned handover** (`continuum-agent switchover`, docs/switchover.md):
//!   the holder records a handover intent naming its successor at a majority
//!   (only the holder of the current epoch can), fences, stops its database
//!   cleanly, records the stopped database's last WAL position (its shutdown
//!   checkpoint) in the intent and releases the lease. While that intent is
//!   the newest record at the highest granted epoch, **nobody but the named
//!   successor acquires**, the old primary included, until this agent's
//!   handover deadline passes; the successor acquires (without waiting for a
//!   TTL: the lease was released) only once it has replayed past that final
//!   position, so it holds every byte of the old primary's WAL. The stopped
//!   old primary restarts only as a standby of the newer epoch's holder
//!   (`FollowPeer`), or, if the successor never took the lease by the
//!   deadline, fenced as a primary that must win the lease again at the
//!   witnesses before it accepts writes (`StartFenced`, then the rules above).

use std::time::{Duration, Instant};

use crate::lease::{Epoch, Handover, HolderId, LeaseMeta};
use crate::quorum::MajorityView;

/// Whether a standby may promote itself without an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Automatic,
    Manual,
}

/// What the primary does when its synchronous standby is not attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Keep requiring the standby: writes block until it returns (CNPG's
    /// `dataDurability: required`).
    Required,
    /// Record "no synchronous standby" at the witnesses, then accept writes
    /// without one; no automatic promotion is possible until it returns.
    Preferred,
}

/// The region's database as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbState {
    /// Out of recovery: a primary (possibly fenced).
    pub primary: bool,
    /// Refusing writes by the back-end's fence.
    pub fenced: bool,
    /// Epoch recorded in the database by the last promotion (replicated to
    /// the standby, so a standby knows it too). Zero when never recorded.
    pub epoch: Epoch,
    /// Primary only: the standby the database currently requires to apply
    /// every commit before acknowledging it (strict synchronous replication).
    pub required_standby: Option<HolderId>,
    /// Primary only: the peer region is attached as a streaming standby.
    pub peer_attached: bool,
    /// Standby only: end of the last WAL record replayed (a handover's
    /// successor must be past the old primary's final position).
    pub replay_lsn: Option<u64>,
}

/// A database that is not running, as its control file describes it (only
/// known to an agent that manages the data directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineDb {
    /// It shut down cleanly as a primary (`pg_controldata`: "shut down"):
    /// its last WAL record is the shutdown checkpoint.
    pub clean_primary: bool,
    /// Position of its last checkpoint record.
    pub checkpoint_lsn: u64,
}

/// The lease this region holds, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub epoch: Epoch,
    /// Conservative deadline (see `quorum::conservative_deadline`).
    pub deadline: Instant,
}

/// How often a steady primary re-records its lease metadata (the confirmed
/// LSN moves with every commit; one witness write per period keeps the
/// witnesses' copy current without loading them).
pub const META_REFRESH: Duration = Duration::from_secs(10);

/// Whether `action` only re-records the metadata already recorded (a
/// periodic refresh, logged quietly, no Event).
pub fn is_meta_refresh(action: &Action, recorded: Option<&LeaseMeta>) -> bool {
    match (action, recorded) {
        (
            Action::UpdateMeta {
                sync_standby,
                handover: None,
            },
            Some(r),
        ) => r.handover.is_none() && r.sync_standby == *sync_standby,
        _ => false,
    }
}

/// Everything one decision looks at.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub now: Instant,
    pub region: &'a HolderId,
    pub peer: &'a HolderId,
    pub mode: Mode,
    pub policy: SyncPolicy,
    pub held: Option<Held>,
    /// The last majority read; `None` when no majority answered.
    pub view: Option<&'a MajorityView>,
    /// `None` when the database did not answer.
    pub db: Option<&'a DbState>,
    /// The metadata this region stored at a majority during its current
    /// epoch; `None` until it stored one.
    pub recorded: Option<&'a LeaseMeta>,
    /// When `db` is `None`: the stopped database's control file, if known.
    pub offline: Option<&'a OfflineDb>,
    /// An operator asked this region to hand the lease over to this region.
    pub handover_request: Option<&'a HolderId>,
    /// When this agent stops waiting for the successor named by the current
    /// handover intent (the runner sets it to first-seen + timeout). `None`:
    /// no deadline known, the intent keeps blocking.
    pub handover_deadline: Option<Instant>,
    /// Rebuild a fenced former primary as a standby of the new holder
    /// (`--rejoin`); otherwise it stays fenced for an operator.
    pub rejoin: bool,
    /// This process has not held the lease yet and has not tried to adopt
    /// one lately: it may continue a grant an earlier process of this region
    /// left behind (agent restart, leader change) instead of fencing.
    pub may_adopt: bool,
    /// The metadata this region recorded is old enough to write again (the
    /// runner's refresh period): a steady primary re-records it so the
    /// witnesses carry a current confirmed LSN.
    pub meta_refresh_due: bool,
}

/// The one thing to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop the database acknowledging writes at once.
    Fence { reason: &'static str },
    /// Take the lease (next epoch above the highest granted).
    Acquire { reason: &'static str },
    /// Continue this region's own grant at `epoch`, left by an earlier
    /// process, with a renewal (the witnesses refuse it unless `epoch` is
    /// this region's and nobody took over). If that fails, a running
    /// unfenced primary is fenced at once.
    ///
    /// `handover`: the record this region wrote in that epoch when it
    /// carries a handover intent; the adopting process continues the
    /// handover from it (never weakens durability on a record that may have
    /// reached only some witnesses: it only fences, stops and releases).
    Adopt {
        epoch: Epoch,
        handover: Option<LeaseMeta>,
    },
    /// Wait for replay to catch up, then promote.
    Promote { epoch: Epoch },
    /// Accept writes again, requiring `standby` (or none).
    Unfence { standby: Option<HolderId> },
    /// Change which standby the database requires.
    SetRequiredStandby { standby: Option<HolderId> },
    /// Write the epoch into the database.
    RecordEpoch { epoch: Epoch },
    /// Store the metadata at a majority of witnesses (with a handover
    /// intent while handing over).
    UpdateMeta {
        sync_standby: Option<HolderId>,
        handover: Option<Handover>,
    },
    /// Handover: stop the fenced database cleanly (its walsender sends the
    /// successor every WAL record up to the shutdown checkpoint first).
    StopForHandover,
    /// Handover: give the lease up at the witnesses.
    Release { reason: &'static str },
    /// Start the stopped former primary as a standby of the peer (no
    /// rebuild when its WAL is a prefix of the peer's timeline).
    FollowPeer { reason: &'static str },
    /// Start the stopped database as a fenced primary (abandoned handover).
    StartFenced { reason: &'static str },
    /// Rebuild the fenced former primary as a standby of the new holder.
    Rejoin { reason: &'static str },
    /// Nothing to do; the reason is for the status and logs.
    Wait { reason: &'static str },
}

impl Action {
    /// Stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Action::Fence { .. } => "fence",
            Action::Acquire { .. } => "acquire",
            Action::Adopt { .. } => "adopt",
            Action::Promote { .. } => "promote",
            Action::Unfence { .. } => "unfence",
            Action::SetRequiredStandby { .. } => "set_required_standby",
            Action::RecordEpoch { .. } => "record_epoch",
            Action::UpdateMeta { .. } => "update_meta",
            Action::StopForHandover => "stop_for_handover",
            Action::Release { .. } => "release",
            Action::FollowPeer { .. } => "follow_peer",
            Action::StartFenced { .. } => "start_fenced",
            Action::Rejoin { .. } => "rejoin",
            Action::Wait { .. } => "wait",
        }
    }
}

/// The handover intent that still counts: the newest record at the witnesses
/// carries it and no newer epoch was granted since it was written.
pub fn live_intent(view: &MajorityView) -> Option<&Handover> {
    let (meta_epoch, meta) = view.meta.as_ref()?;
    if *meta_epoch != view.max_epoch {
        return None;
    }
    meta.handover.as_ref()
}

/// Whether a live intent names someone other than this region and this
/// agent's deadline for it has not passed: then this region must not take
/// the lease.
fn blocked_by_intent(obs: &Observation<'_>, view: &MajorityView) -> Option<&'static str> {
    let intent = live_intent(view)?;
    if &intent.to == obs.region {
        return None;
    }
    let waiting = obs.handover_deadline.is_none_or(|d| obs.now < d);
    waiting.then_some(
        "a planned handover to the other region is in progress: only it may take the lease",
    )
}

fn held_now(obs: &Observation<'_>) -> Option<Held> {
    obs.held.filter(|h| obs.now < h.deadline)
}

/// The standby a primary should require under its policy.
fn desired_standby(obs: &Observation<'_>, db: &DbState) -> Option<HolderId> {
    match obs.policy {
        SyncPolicy::Required => Some(obs.peer.clone()),
        SyncPolicy::Preferred if db.peer_attached => Some(obs.peer.clone()),
        SyncPolicy::Preferred => None,
    }
}

/// The standby the database effectively requires, for the record at the
/// witnesses: a requirement naming this region itself (a promoted standby
/// inherits its old primary's settings) protects nothing.
fn effective_required(obs: &Observation<'_>, db: &DbState) -> Option<HolderId> {
    db.required_standby.clone().filter(|s| s != obs.region)
}

/// Decide the next action. See the module documentation for the rules.
pub fn decide(obs: &Observation<'_>) -> Action {
    let Some(db) = obs.db else {
        return offline(obs);
    };
    let held = held_now(obs);
    if held.is_none() {
        if let Some(epoch) = adoptable(obs, db) {
            let handover = obs
                .view
                .and_then(|v| v.meta.as_ref())
                .filter(|(e, m)| *e == epoch && m.handover.is_some())
                .map(|(_, m)| m.clone());
            return Action::Adopt { epoch, handover };
        }
    }
    if db.primary {
        match held {
            Some(h) => primary_holding(obs, db, h),
            None => primary_not_holding(obs, db),
        }
    } else {
        match held {
            Some(h) => Action::Promote { epoch: h.epoch },
            None => standby_not_holding(obs, db),
        }
    }
}

/// A grant an earlier process of this region may have left, to continue
/// rather than fence and wait a TTL (a restart or leader change must not
/// cost an outage, nor race the standby for a new epoch):
///
/// * a majority sees this region as the live holder of the highest epoch;
/// * or a fenced primary sees a newer epoch than its database recorded while
///   the lease is free: that epoch may be this region's own, granted just
///   before a crash that came between promotion and `RecordEpoch`. Only a
///   renewal can tell: a witness renews only its current holder at its
///   current epoch, so a majority renewal proves nobody else took the lease
///   at or after that epoch, and this database is the one that won it.
fn adoptable(obs: &Observation<'_>, db: &DbState) -> Option<Epoch> {
    if !obs.may_adopt || obs.held.is_some() {
        return None;
    }
    let view = obs.view?;
    let own_live = view
        .holder
        .as_ref()
        .is_some_and(|(h, e)| h == obs.region && *e == view.max_epoch);
    let own_unrecorded =
        db.primary && db.fenced && view.expired_at_majority && db.epoch < view.max_epoch;
    (own_live || own_unrecorded).then_some(view.max_epoch)
}

/// The database does not answer. Only a database this agent stopped
/// cleanly for a handover is acted on; anything else waits for an operator
/// (or the harness) to start it.
fn offline(obs: &Observation<'_>) -> Action {
    let Some(off) = obs.offline.filter(|o| o.clean_primary) else {
        return Action::Wait {
            reason: "database not answering",
        };
    };
    let ours = obs.recorded.and_then(|m| m.handover.as_ref());
    if held_now(obs).is_some() {
        return match ours {
            Some(h) if h.final_lsn.is_none() => Action::UpdateMeta {
                sync_standby: obs.recorded.and_then(|m| m.sync_standby.clone()),
                handover: Some(Handover {
                    to: h.to.clone(),
                    final_lsn: Some(off.checkpoint_lsn),
                    promotion_token: None,
                }),
            },
            Some(_) => Action::Release {
                reason: "handover: final WAL position recorded, the successor may take the lease",
            },
            None => Action::Wait {
                reason: "database stopped while holding the lease",
            },
        };
    }
    let Some(view) = obs.view else {
        return Action::Wait {
            reason: "stopped: no majority of witnesses answered",
        };
    };
    let peer_holds = view
        .holder
        .as_ref()
        .is_some_and(|(h, _)| h != obs.region && !view.expired_at_majority);
    if let Some((meta_epoch, meta)) = &view.meta {
        if meta.handover.as_ref().is_some_and(|h| &h.to == obs.peer) {
            if *meta_epoch < view.max_epoch || peer_holds {
                return Action::FollowPeer {
                    reason: "handover: the successor holds a newer epoch; follow it",
                };
            }
            if !view.expired_at_majority {
                return Action::Wait {
                    reason: "stopped for handover: the lease is still held at the witnesses",
                };
            }
            if obs.handover_deadline.is_some_and(|d| obs.now >= d) {
                return Action::StartFenced {
                    reason: "handover abandoned: the successor did not take the lease in time",
                };
            }
            return Action::Wait {
                reason: "stopped for handover: waiting for the successor to take the lease",
            };
        }
    }
    if peer_holds {
        return Action::FollowPeer {
            reason: "stopped cleanly and the peer holds the lease: follow it",
        };
    }
    Action::Wait {
        reason: "database stopped cleanly; no handover in progress",
    }
}

fn primary_not_holding(obs: &Observation<'_>, db: &DbState) -> Action {
    if !db.fenced {
        return Action::Fence {
            reason: "lease not held by its conservative deadline",
        };
    }
    let Some(view) = obs.view else {
        return Action::Wait {
            reason: "fenced: no majority of witnesses answered",
        };
    };
    if let Some(reason) = blocked_by_intent(obs, view) {
        return Action::Wait { reason };
    }
    let newer = db.epoch != view.max_epoch;
    if newer && obs.rejoin {
        let peer_holds = view.holder.as_ref().is_some_and(|(h, _)| h == obs.peer);
        if peer_holds && !view.expired_at_majority {
            return Action::Rejoin {
                reason:
                    "fenced former primary: the peer holds a newer epoch; rebuild as its standby",
            };
        }
    }
    if !view.expired_at_majority {
        return Action::Wait {
            reason: "fenced: another region holds the lease",
        };
    }
    if newer {
        return Action::Wait {
            reason: "fenced: a newer epoch was granted; rejoin as a replica",
        };
    }
    Action::Acquire {
        reason: "lease free and no newer epoch: resume as primary",
    }
}

fn primary_holding(obs: &Observation<'_>, db: &DbState, held: Held) -> Action {
    // A handover this region recorded in this epoch: fence, then stop.
    if obs.recorded.and_then(|m| m.handover.as_ref()).is_some() {
        return if db.fenced {
            Action::StopForHandover
        } else {
            Action::Fence {
                reason: "handover: stop acknowledging writes before stopping",
            }
        };
    }
    let action = primary_steady(obs, db, held);
    match (obs.handover_request, &action) {
        (Some(to), Action::Wait { .. }) => {
            // Hand over only to an attached standby that every commit
            // already waits for and that the witnesses name (invariant 3).
            let ready = to == obs.peer
                && db.peer_attached
                && db.required_standby.as_ref() == Some(obs.peer)
                && obs.recorded.and_then(|m| m.sync_standby.as_ref()) == Some(obs.peer);
            if ready {
                Action::UpdateMeta {
                    sync_standby: Some(obs.peer.clone()),
                    handover: Some(Handover {
                        to: to.clone(),
                        final_lsn: None,
                        promotion_token: None,
                    }),
                }
            } else {
                Action::Wait {
                    reason: "handover requested: waiting for the peer to be an attached synchronous standby",
                }
            }
        }
        _ => action,
    }
}

/// The primary's rules outside a handover.
fn primary_steady(obs: &Observation<'_>, db: &DbState, held: Held) -> Action {
    let desired = desired_standby(obs, db);
    let recorded_standby = obs.recorded.map(|m| m.sync_standby.clone());
    // Weakening (requiring no standby) needs "none" recorded first.
    let weaken_ok = recorded_standby == Some(None);
    if db.fenced {
        return match desired {
            None if !weaken_ok => Action::UpdateMeta {
                sync_standby: None,
                handover: None,
            },
            standby => Action::Unfence { standby },
        };
    }
    if db.required_standby != desired {
        return match desired {
            None if !weaken_ok => Action::UpdateMeta {
                sync_standby: None,
                handover: None,
            },
            standby => Action::SetRequiredStandby { standby },
        };
    }
    if db.epoch != held.epoch {
        return Action::RecordEpoch { epoch: held.epoch };
    }
    let current = effective_required(obs, db);
    if recorded_standby != Some(current.clone()) || obs.meta_refresh_due {
        return Action::UpdateMeta {
            sync_standby: current,
            handover: None,
        };
    }
    Action::Wait {
        reason: "primary: holding the lease",
    }
}

fn standby_not_holding(obs: &Observation<'_>, db: &DbState) -> Action {
    let Some(view) = obs.view else {
        return Action::Wait {
            reason: "standby: no majority of witnesses answered",
        };
    };
    if let Some(reason) = blocked_by_intent(obs, view) {
        return Action::Wait { reason };
    }
    if live_intent(view).is_some_and(|h| &h.to == obs.peer) {
        // Only the holder writes an intent, so one naming the peer is this
        // region's own: it handed over (CNPG: demoted, still holding all its
        // WAL) and the successor never took the lease by the deadline.
        return if view.expired_at_majority {
            Action::Acquire {
                reason: "handover abandoned: the successor never took the lease; take it back",
            }
        } else {
            Action::Wait {
                reason: "handover abandoned, but the lease is held",
            }
        };
    }
    let to_me = live_intent(view).filter(|h| &h.to == obs.region);
    if let Some(h) = to_me.filter(|h| h.final_lsn.is_some() || h.promotion_token.is_some()) {
        // A planned handover to this region: the old primary has stopped
        // cleanly at `final_lsn` (direct back-end), or was demoted and
        // handed over its demotion token (CNPG, which itself waits for
        // replay up to the token before promoting). Mode does not matter:
        // an operator asked.
        if !view.expired_at_majority {
            return Action::Wait {
                reason: "handover: the old primary still holds the lease",
            };
        }
        let caught_up = match h.final_lsn {
            Some(f) => db.replay_lsn.is_some_and(|r| r > f),
            None => true,
        };
        return if caught_up {
            Action::Acquire {
                reason: "planned handover: the old primary handed over its final position",
            }
        } else {
            Action::Wait {
                reason: "handover: replaying up to the old primary's final WAL record",
            }
        };
    }
    if !view.expired_at_majority {
        return Action::Wait {
            reason: "standby: the primary holds the lease",
        };
    }
    let named = view
        .meta
        .as_ref()
        .and_then(|(_, m)| m.sync_standby.as_ref());
    if named != Some(obs.region) {
        return Action::Wait {
            reason:
                "standby: lease expired but this region is not the recorded synchronous standby",
        };
    }
    if obs.mode == Mode::Manual {
        return Action::Wait {
            reason: "standby: lease expired; manual mode, waiting for an operator",
        };
    }
    Action::Acquire {
        reason: "lease expired at a majority and this region is the recorded synchronous standby",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HolderId {
        HolderId::new(s).expect("valid holder")
    }

    /// (meta epoch, named sync standby) as the witnesses return it.
    type MetaRow = (u64, Option<&'static str>);
    /// (expired at majority, max epoch, newest meta).
    type ViewRow = (bool, u64, Option<MetaRow>);

    /// (successor, final LSN) of a handover intent.
    type IntentRow = (&'static str, Option<u64>);

    struct Case {
        name: &'static str,
        /// `false`: the database does not answer (see `offline`).
        running: bool,
        primary: bool,
        fenced: bool,
        db_epoch: u64,
        required: Option<&'static str>,
        peer_attached: bool,
        replay: Option<u64>,
        /// Stopped database: (clean primary shutdown, checkpoint LSN).
        offline: Option<(bool, u64)>,
        held: Option<(u64, i64)>, // epoch, deadline offset ms from now
        view: Option<ViewRow>,
        /// Live holder at a majority (with the view's max epoch).
        view_holder: Option<&'static str>,
        /// Intent carried by the view's newest metadata.
        intent: Option<IntentRow>,
        recorded: Option<Option<&'static str>>,
        recorded_intent: Option<IntentRow>,
        request: Option<&'static str>,
        /// Handover deadline offset ms from now.
        deadline: Option<i64>,
        rejoin: bool,
        mode: Mode,
        policy: SyncPolicy,
        may_adopt: bool,
        refresh: bool,
        want: &'static str,
    }

    const BASE: Case = Case {
        name: "",
        running: true,
        primary: true,
        fenced: false,
        db_epoch: 1,
        required: Some("b"),
        peer_attached: true,
        replay: None,
        offline: None,
        held: Some((1, 1000)),
        view: Some((false, 1, Some((1, Some("b"))))),
        view_holder: None,
        intent: None,
        recorded: Some(Some("b")),
        recorded_intent: None,
        request: None,
        deadline: None,
        rejoin: false,
        mode: Mode::Automatic,
        policy: SyncPolicy::Preferred,
        may_adopt: false,
        refresh: false,
        want: "wait",
    };

    fn at(now: Instant, off: i64) -> Instant {
        if off >= 0 {
            now + Duration::from_millis(off as u64)
        } else {
            now - Duration::from_millis((-off) as u64)
        }
    }

    fn intent_of(i: Option<IntentRow>) -> Option<Handover> {
        i.map(|(to, final_lsn)| Handover {
            to: h(to),
            final_lsn,
            promotion_token: None,
        })
    }

    fn run(c: &Case) -> Action {
        let now = Instant::now();
        let region = h("a");
        let peer = h("b");
        let db = DbState {
            primary: c.primary,
            fenced: c.fenced,
            epoch: Epoch(c.db_epoch),
            required_standby: c.required.map(h),
            peer_attached: c.peer_attached,
            replay_lsn: c.replay,
        };
        let offline = c.offline.map(|(clean_primary, checkpoint_lsn)| OfflineDb {
            clean_primary,
            checkpoint_lsn,
        });
        let view = c.view.map(|(expired, max, meta)| MajorityView {
            holder: c.view_holder.map(|v| (h(v), Epoch(max))),
            expired_at_majority: expired,
            max_epoch: Epoch(max),
            meta: meta.map(|(e, s)| {
                (
                    Epoch(e),
                    LeaseMeta {
                        sync_standby: s.map(h),
                        handover: intent_of(c.intent),
                        ..Default::default()
                    },
                )
            }),
            answered: 3,
        });
        let recorded = c.recorded.map(|s| LeaseMeta {
            sync_standby: s.map(h),
            handover: intent_of(c.recorded_intent),
            ..Default::default()
        });
        let request = c.request.map(h);
        let held = c.held.map(|(e, off)| Held {
            epoch: Epoch(e),
            deadline: at(now, off),
        });
        decide(&Observation {
            now,
            region: &region,
            peer: &peer,
            mode: c.mode,
            policy: c.policy,
            held,
            view: view.as_ref(),
            db: c.running.then_some(&db),
            recorded: recorded.as_ref(),
            offline: offline.as_ref(),
            handover_request: request.as_ref(),
            handover_deadline: c.deadline.map(|off| at(now, off)),
            rejoin: c.rejoin,
            may_adopt: c.may_adopt,
            meta_refresh_due: c.refresh,
        })
    }

    #[test]
    fn only_an_unchanged_record_is_a_refresh() {
        let rec = LeaseMeta {
            sync_standby: Some(h("b")),
            ..Default::default()
        };
        let upd = |s: Option<&str>, handover: Option<Handover>| Action::UpdateMeta {
            sync_standby: s.map(h),
            handover,
        };
        assert!(is_meta_refresh(&upd(Some("b"), None), Some(&rec)));
        assert!(!is_meta_refresh(&upd(None, None), Some(&rec)), "weakening");
        assert!(
            !is_meta_refresh(&upd(Some("b"), None), None),
            "first record"
        );
        let intent = Handover {
            to: h("b"),
            final_lsn: None,
            promotion_token: None,
        };
        assert!(!is_meta_refresh(&upd(Some("b"), Some(intent)), Some(&rec)));
        assert!(!is_meta_refresh(&Action::Wait { reason: "x" }, Some(&rec)));
    }

    #[test]
    fn decision_table() {
        let cases = [
            Case {
                name: "steady primary waits",
                ..BASE
            },
            Case {
                name: "steady primary: refresh due re-records the metadata",
                refresh: true,
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "refresh due never beats a fence",
                refresh: true,
                held: Some((1, -1)),
                want: "fence",
                ..BASE
            },
            Case {
                name: "refresh due on a standby: nothing to record",
                refresh: true,
                primary: false,
                held: None,
                view_holder: Some("a"),
                want: "wait",
                ..BASE
            },
            Case {
                name: "deadline passed: fence first",
                held: Some((1, -1)),
                want: "fence",
                ..BASE
            },
            Case {
                name: "deadline exactly now: fence",
                held: Some((1, 0)),
                want: "fence",
                ..BASE
            },
            Case {
                name: "no lease at all: fence",
                held: None,
                want: "fence",
                ..BASE
            },
            Case {
                name: "fenced, lease held elsewhere: stay",
                held: None,
                fenced: true,
                want: "wait",
                ..BASE
            },
            Case {
                name: "fenced, newer epoch granted: stay fenced",
                held: None,
                fenced: true,
                view: Some((true, 2, None)),
                want: "wait",
                ..BASE
            },
            Case {
                name: "fenced, lease free at our epoch: re-acquire",
                held: None,
                fenced: true,
                view: Some((true, 1, None)),
                want: "acquire",
                ..BASE
            },
            Case {
                name: "fenced, no majority: wait",
                held: None,
                fenced: true,
                view: None,
                want: "wait",
                ..BASE
            },
            Case {
                name: "bootstrap: fresh primary, nothing granted",
                held: None,
                fenced: true,
                db_epoch: 0,
                view: Some((true, 0, None)),
                recorded: None,
                want: "acquire",
                ..BASE
            },
            Case {
                name: "held and fenced: unfence",
                fenced: true,
                want: "unfence",
                ..BASE
            },
            Case {
                name: "held, fenced, peer gone, preferred: record none first",
                fenced: true,
                peer_attached: false,
                recorded: None,
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "held, fenced, peer gone, none recorded: unfence async",
                fenced: true,
                peer_attached: false,
                recorded: Some(None),
                want: "unfence",
                ..BASE
            },
            Case {
                name: "new epoch not yet in db: record it",
                held: Some((2, 1000)),
                want: "record_epoch",
                ..BASE
            },
            Case {
                name: "meta not yet recorded this epoch",
                recorded: None,
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "peer detached, preferred: record none before weakening",
                peer_attached: false,
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "peer detached, none recorded: weaken",
                peer_attached: false,
                recorded: Some(None),
                want: "set_required_standby",
                ..BASE
            },
            Case {
                name: "peer detached, required policy: keep waiting",
                peer_attached: false,
                policy: SyncPolicy::Required,
                want: "wait",
                ..BASE
            },
            Case {
                name: "peer back: require it before recording it",
                required: None,
                recorded: Some(None),
                want: "set_required_standby",
                ..BASE
            },
            Case {
                name: "required now, record it",
                recorded: Some(None),
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "promoted standby requiring itself: record none first",
                required: Some("a"),
                peer_attached: false,
                recorded: None,
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "promoted standby requiring itself: then drop it",
                required: Some("a"),
                peer_attached: false,
                recorded: Some(None),
                want: "set_required_standby",
                ..BASE
            },
            Case {
                name: "standby, primary holds: wait",
                primary: false,
                held: None,
                want: "wait",
                ..BASE
            },
            Case {
                name: "standby, expired, named: acquire",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, Some("a"))))),
                want: "acquire",
                ..BASE
            },
            Case {
                name: "standby, expired, other named: wait",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "standby, expired, none recorded: wait",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, None)))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "standby, expired, no meta at all: wait",
                primary: false,
                held: None,
                view: Some((true, 1, None)),
                want: "wait",
                ..BASE
            },
            Case {
                name: "standby, expired, named, manual: wait",
                primary: false,
                held: None,
                mode: Mode::Manual,
                view: Some((true, 1, Some((1, Some("a"))))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "standby, no majority: wait",
                primary: false,
                held: None,
                view: None,
                want: "wait",
                ..BASE
            },
            Case {
                name: "standby holding: promote",
                primary: false,
                held: Some((2, 1000)),
                want: "promote",
                ..BASE
            },
            // Planned handover, old primary a -> successor b.
            Case {
                name: "handover requested, peer attached and synchronous: record the intent",
                request: Some("b"),
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "handover requested, peer detached: wait",
                request: Some("b"),
                peer_attached: false,
                policy: SyncPolicy::Required,
                want: "wait",
                ..BASE
            },
            Case {
                name: "handover requested, witnesses do not name the peer yet: record it first",
                request: Some("b"),
                recorded: Some(None),
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "handover requested to itself: ignored",
                request: Some("a"),
                want: "wait",
                ..BASE
            },
            Case {
                name: "intent recorded: fence",
                recorded_intent: Some(("b", None)),
                want: "fence",
                ..BASE
            },
            Case {
                name: "intent recorded, fenced: stop cleanly (never unfence)",
                recorded_intent: Some(("b", None)),
                fenced: true,
                want: "stop_for_handover",
                ..BASE
            },
            Case {
                name: "stopped cleanly, holding: record the final LSN",
                running: false,
                offline: Some((true, 0x300_0028)),
                recorded_intent: Some(("b", None)),
                want: "update_meta",
                ..BASE
            },
            Case {
                name: "stopped, final LSN recorded: release",
                running: false,
                offline: Some((true, 0x300_0028)),
                recorded_intent: Some(("b", Some(0x300_0028))),
                want: "release",
                ..BASE
            },
            Case {
                name: "stopped, released, successor not yet holding: wait",
                running: false,
                offline: Some((true, 0x300_0028)),
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("b", Some(0x300_0028))),
                deadline: Some(5000),
                want: "wait",
                ..BASE
            },
            Case {
                name: "stopped, successor holds the next epoch: follow it",
                running: false,
                offline: Some((true, 0x300_0028)),
                held: None,
                view: Some((false, 2, Some((1, Some("b"))))),
                view_holder: Some("b"),
                intent: Some(("b", Some(0x300_0028))),
                want: "follow_peer",
                ..BASE
            },
            Case {
                name: "stopped, successor already wrote its own record: follow it",
                running: false,
                offline: Some((true, 0x300_0028)),
                held: None,
                view: Some((false, 2, Some((2, Some("a"))))),
                view_holder: Some("b"),
                want: "follow_peer",
                ..BASE
            },
            Case {
                name: "stopped, successor never came, deadline passed: start fenced",
                running: false,
                offline: Some((true, 0x300_0028)),
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("b", Some(0x300_0028))),
                deadline: Some(-1),
                want: "start_fenced",
                ..BASE
            },
            Case {
                name: "crashed (not a clean shutdown): wait for an operator",
                running: false,
                offline: Some((false, 0x300_0028)),
                held: None,
                view: Some((false, 2, Some((1, Some("b"))))),
                view_holder: Some("b"),
                want: "wait",
                ..BASE
            },
            Case {
                name: "stopped cleanly, no intent, nobody holds: wait",
                running: false,
                offline: Some((true, 0x300_0028)),
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "old primary fenced, intent to b, lease free at its epoch: must not re-acquire",
                fenced: true,
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("b", None)),
                deadline: Some(5000),
                want: "wait",
                ..BASE
            },
            Case {
                name: "old primary fenced, intent to b, no deadline known: must not re-acquire",
                fenced: true,
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("b", Some(9))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "old primary fenced, intent abandoned (deadline passed): resume",
                fenced: true,
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("b", None)),
                deadline: Some(-1),
                want: "acquire",
                ..BASE
            },
            Case {
                name: "successor: intent names it, released, replayed past the final LSN: acquire",
                primary: false,
                held: None,
                replay: Some(0x300_00a0),
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("a", Some(0x300_0028))),
                mode: Mode::Manual,
                want: "acquire",
                ..BASE
            },
            Case {
                name: "successor: not yet replayed past the final LSN: wait",
                primary: false,
                held: None,
                replay: Some(0x300_0028),
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("a", Some(0x300_0028))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "successor: old primary still holds: wait",
                primary: false,
                held: None,
                replay: Some(0x300_00a0),
                view: Some((false, 1, Some((1, Some("b"))))),
                intent: Some(("a", Some(0x300_0028))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "successor: old primary died before its final LSN, lease expired, named: failover rule",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, Some("a"))))),
                intent: Some(("a", None)),
                want: "acquire",
                ..BASE
            },
            Case {
                name: "stale intent (a newer epoch exists) does not let the successor acquire",
                primary: false,
                held: None,
                replay: Some(0x300_00a0),
                view: Some((true, 2, Some((1, Some("b"))))),
                intent: Some(("a", Some(0x300_0028))),
                want: "wait",
                ..BASE
            },
            Case {
                name: "a standby not named by a live intent does not acquire even if named sync",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, Some("a"))))),
                intent: Some(("b", Some(1))),
                deadline: Some(5000),
                want: "wait",
                ..BASE
            },
            Case {
                name: "standby not named by a live intent with a token: wait",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, Some("a"))))),
                intent: Some(("b", None)),
                deadline: Some(5000),
                want: "wait",
                ..BASE
            },
            Case {
                name: "demoted old primary (CNPG), its intent abandoned, lease free: take it back",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("b", None)),
                deadline: Some(-1),
                want: "acquire",
                ..BASE
            },
            Case {
                name: "demoted old primary (CNPG), its intent before the deadline: wait",
                primary: false,
                held: None,
                view: Some((true, 1, Some((1, Some("b"))))),
                intent: Some(("b", None)),
                deadline: Some(5000),
                want: "wait",
                ..BASE
            },
            Case {
                name: "rejoin: fenced former primary, peer holds a newer epoch",
                fenced: true,
                held: None,
                view: Some((false, 2, Some((2, Some("a"))))),
                view_holder: Some("b"),
                rejoin: true,
                want: "rejoin",
                ..BASE
            },
            Case {
                name: "rejoin off: stay fenced",
                fenced: true,
                held: None,
                view: Some((false, 2, Some((2, Some("a"))))),
                view_holder: Some("b"),
                want: "wait",
                ..BASE
            },
            Case {
                name: "rejoin on, nobody holds (peer not up): stay fenced",
                fenced: true,
                held: None,
                view: Some((true, 2, Some((2, Some("a"))))),
                rejoin: true,
                want: "wait",
                ..BASE
            },
        ];
        for c in &cases {
            let got = run(c);
            assert_eq!(got.label(), c.want, "{}: got {got:?}", c.name);
        }
    }

    /// A new process (agent restart, leader change) continues its region's
    /// own grant instead of fencing, and never anyone else's.
    #[test]
    fn adopt_table() {
        let fresh = Case {
            held: None,
            may_adopt: true,
            ..BASE
        };
        let cases = [
            Case {
                name: "restarted primary, own live lease: adopt, no fence",
                view_holder: Some("a"),
                want: "adopt",
                ..fresh
            },
            Case {
                name: "own live lease but adoption already tried: fence",
                view_holder: Some("a"),
                may_adopt: false,
                want: "fence",
                ..fresh
            },
            Case {
                name: "restarted primary, the peer holds the lease: fence",
                view_holder: Some("b"),
                want: "fence",
                ..fresh
            },
            Case {
                name: "restarted primary, nobody holds: fence",
                view: Some((true, 1, Some((1, Some("b"))))),
                want: "fence",
                ..fresh
            },
            Case {
                name: "restarted primary, no majority view: fence",
                view: None,
                want: "fence",
                ..fresh
            },
            Case {
                name: "restarted standby, own live lease (taken, not yet promoted): adopt",
                primary: false,
                required: None,
                view_holder: Some("a"),
                recorded: None,
                want: "adopt",
                ..fresh
            },
            Case {
                name: "fenced primary, newer epoch unrecorded, lease free: try adopting it",
                fenced: true,
                view: Some((true, 2, None)),
                want: "adopt",
                ..fresh
            },
            Case {
                name: "same, but adoption already failed: stay fenced",
                fenced: true,
                view: Some((true, 2, None)),
                may_adopt: false,
                want: "wait",
                ..fresh
            },
            Case {
                name: "unfenced primary, newer epoch, lease free: fence first",
                view: Some((true, 2, None)),
                want: "fence",
                ..fresh
            },
            Case {
                name: "fenced primary, newer epoch held live by the peer: stay fenced",
                fenced: true,
                view: Some((false, 2, None)),
                view_holder: Some("b"),
                want: "wait",
                ..fresh
            },
            Case {
                name: "fenced primary at the highest epoch, lease free: acquire anew",
                fenced: true,
                view: Some((true, 1, None)),
                want: "acquire",
                ..fresh
            },
            Case {
                name: "a process whose own renewal lapsed never adopts: fence",
                held: Some((1, -1)),
                view_holder: Some("a"),
                want: "fence",
                ..fresh
            },
            Case {
                name: "holding: no adoption",
                held: Some((1, 1000)),
                view_holder: Some("a"),
                want: "wait",
                ..fresh
            },
        ];
        for c in &cases {
            let got = run(c);
            assert_eq!(got.label(), c.want, "{}: got {got:?}", c.name);
            if let Action::Adopt { epoch, .. } = got {
                let max = c.view.map_or(0, |v| v.1);
                assert_eq!(epoch, Epoch(max), "{}: adopts the highest epoch", c.name);
            }
        }
    }

    #[test]
    fn database_silent_means_wait() {
        let now = Instant::now();
        let (a, b) = (h("a"), h("b"));
        let got = decide(&Observation {
            now,
            region: &a,
            peer: &b,
            mode: Mode::Automatic,
            policy: SyncPolicy::Preferred,
            held: None,
            view: None,
            db: None,
            recorded: None,
            offline: None,
            handover_request: None,
            handover_deadline: None,
            rejoin: false,
            may_adopt: true,
            meta_refresh_due: true,
        });
        assert_eq!(got.label(), "wait");
    }

    proptest::proptest! {
        /// Invariant 2: whatever else is observed, an unfenced primary past
        /// its deadline is fenced, and nothing but `Fence` is ever decided
        /// for it.
        #[test]
        fn unfenced_primary_without_lease_is_always_fenced(
            epoch in 0u64..5, max in 0u64..5, expired: bool, attached: bool,
            rec in proptest::option::of(proptest::option::of(proptest::bool::ANY)),
            late_ms in 0i64..10_000, has_view: bool, may_adopt: bool, holder_me: bool,
            refresh: bool,
        ) {
            let c = Case {
                name: "prop", primary: true, fenced: false, db_epoch: epoch,
                peer_attached: attached, held: Some((epoch, -late_ms)),
                view: has_view.then_some((expired, max, None)),
                view_holder: (holder_me && !expired).then_some("a"),
                recorded: rec.map(|r| r.map(|_| "b")),
                may_adopt, refresh,
                want: "fence", ..BASE
            };
            proptest::prop_assert_eq!(run(&c).label(), "fence");
        }

        /// Invariant 5: a fenced primary never unfences or acquires when a
        /// newer epoch exists.
        #[test]
        fn fenced_primary_behind_a_newer_epoch_stays_fenced(
            db_epoch in 0u64..5, ahead in 1u64..5, expired: bool, may_adopt: bool,
        ) {
            let c = Case {
                name: "prop", primary: true, fenced: true, db_epoch, held: None,
                view: Some((expired, db_epoch + ahead, None)),
                view_holder: (!expired).then_some("b"),
                may_adopt, want: "wait", ..BASE
            };
            // At most a renewal attempt of the newest epoch, which the
            // witnesses refuse unless it is this region's own.
            match run(&c) {
                Action::Wait { .. } => {}
                Action::Adopt { epoch, .. } => proptest::prop_assert!(
                    may_adopt && expired && epoch == Epoch(db_epoch + ahead)
                ),
                other => proptest::prop_assert!(false, "decided {other:?}"),
            }
        }

        /// A new process adopts only the highest epoch, never while the peer
        /// holds the lease live, never while it holds a grant of its own,
        /// and never for an unfenced primary whose lease is free.
        #[test]
        fn adoption_is_only_of_the_own_newest_grant(
            primary: bool, fenced: bool, db_epoch in 0u64..4, max in 0u64..4, expired: bool,
            holder in proptest::option::of(proptest::bool::ANY), held in proptest::option::of(-2000i64..2000),
            may_adopt: bool,
        ) {
            let c = Case {
                name: "prop", primary, fenced, db_epoch,
                held: held.map(|off| (max, off)),
                view: Some((expired, max, None)),
                view_holder: holder.filter(|_| !expired).map(|me| if me { "a" } else { "b" }),
                may_adopt, want: "", ..BASE
            };
            if let Action::Adopt { epoch, .. } = run(&c) {
                proptest::prop_assert!(may_adopt && held.is_none());
                proptest::prop_assert_eq!(epoch, Epoch(max));
                proptest::prop_assert!(holder != Some(false) || expired);
                let own_live = holder == Some(true) && !expired;
                proptest::prop_assert!(own_live || (primary && fenced && expired && db_epoch < max));
            }
        }

        /// Invariant 3: a standby acquires only when expired at a majority,
        /// automatic, and named as the synchronous standby.
        #[test]
        fn standby_acquires_only_when_named_and_expired(
            expired: bool, named in proptest::option::of(proptest::bool::ANY), manual: bool,
        ) {
            let meta_name = named.map(|me| if me { "a" } else { "b" });
            let c = Case {
                name: "prop", primary: false, held: None,
                view: Some((expired, 3, Some((3, meta_name)))),
                mode: if manual { Mode::Manual } else { Mode::Automatic },
                want: "", ..BASE
            };
            let acquire = run(&c).label() == "acquire";
            proptest::prop_assert_eq!(acquire, expired && named == Some(true) && !manual);
        }

        /// Planned handover: while a live intent names the other region and
        /// this agent's deadline has not passed (or is unknown), this region
        /// never takes the lease, whatever its database, lease and request
        /// look like; and the named successor takes it through the intent
        /// only once it has replayed past the final position.
        #[test]
        fn only_the_named_successor_acquires_during_a_handover(
            running: bool, primary: bool, fenced: bool, db_epoch in 0u64..4, max in 0u64..4,
            expired: bool, replay in proptest::option::of(0u64..200), final_lsn in proptest::option::of(0u64..200),
            deadline in proptest::option::of(1i64..10_000), to_me: bool, manual: bool,
            clean: bool, peer_holds: bool, request: bool, rejoin: bool,
        ) {
            let c = Case {
                name: "prop", running, primary, fenced, db_epoch, replay,
                offline: Some((clean, 100)),
                held: None,
                view: Some((expired, max, Some((max, Some(if to_me { "a" } else { "b" }))))),
                view_holder: (peer_holds && !expired).then_some("b"),
                intent: Some((if to_me { "a" } else { "b" }, final_lsn)),
                request: request.then_some("b"),
                deadline, rejoin,
                mode: if manual { Mode::Manual } else { Mode::Automatic },
                want: "", ..BASE
            };
            let got = run(&c);
            if !to_me {
                proptest::prop_assert_ne!(got.label(), "acquire");
                proptest::prop_assert_ne!(got.label(), "promote");
                proptest::prop_assert_ne!(got.label(), "unfence");
            } else if running && !primary && got.label() == "acquire" {
                // Through the intent (final known) or the failover rule
                // (final unknown: named, expired, automatic).
                match final_lsn {
                    Some(f) => proptest::prop_assert!(replay.is_some_and(|r| r > f) && expired),
                    None => proptest::prop_assert!(expired && !manual),
                }
            }
        }

        /// A database stopped for a handover restarts as a primary (fenced)
        /// only once its own intent is still the newest record, the lease is
        /// free and its deadline passed; it follows the peer only once a
        /// newer epoch exists or the peer holds the lease.
        #[test]
        fn a_stopped_old_primary_restarts_only_safely(
            clean: bool, expired: bool, max in 1u64..4, meta_epoch in 1u64..4,
            intent_to_peer: bool, deadline in proptest::option::of(-5000i64..5000),
            peer_holds: bool, holding: bool,
        ) {
            let meta_epoch = meta_epoch.min(max);
            let c = Case {
                name: "prop", running: false, offline: Some((clean, 100)),
                held: holding.then_some((max, 1000)),
                view: Some((expired, max, Some((meta_epoch, Some("b"))))),
                view_holder: (peer_holds && !expired).then_some("b"),
                intent: intent_to_peer.then_some(("b", Some(100))),
                deadline, want: "", ..BASE
            };
            match run(&c).label() {
                "start_fenced" => proptest::prop_assert!(
                    clean && !holding && intent_to_peer && expired && meta_epoch == max
                        && deadline.is_some_and(|d| d <= 0)
                ),
                "follow_peer" => proptest::prop_assert!(
                    clean && !holding && ((intent_to_peer && meta_epoch < max) || (peer_holds && !expired))
                ),
                "acquire" | "promote" | "unfence" => proptest::prop_assert!(false, "acted as primary while stopped"),
                _ => {}
            }
        }

        /// Invariant 3: a primary never drops its required standby while the
        /// witnesses may still name it.
        #[test]
        fn never_weakens_before_recording(
            recorded in proptest::option::of(proptest::option::of(proptest::bool::ANY)),
            fenced: bool,
        ) {
            let c = Case {
                name: "prop", fenced, peer_attached: false,
                recorded: recorded.map(|r| r.map(|_| "b")), want: "", ..BASE
            };
            let got = run(&c);
            let weakens = matches!(got, Action::SetRequiredStandby { standby: None } | Action::Unfence { standby: None });
            if weakens {
                proptest::prop_assert_eq!(recorded, Some(None));
            }
        }
    }
}
