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

use std::time::Instant;

use crate::lease::{Epoch, HolderId, LeaseMeta};
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
}

/// The lease this region holds, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub epoch: Epoch,
    /// Conservative deadline (see `quorum::conservative_deadline`).
    pub deadline: Instant,
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
}

/// The one thing to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop the database acknowledging writes at once.
    Fence { reason: &'static str },
    /// Take the lease (next epoch above the highest granted).
    Acquire { reason: &'static str },
    /// Wait for replay to catch up, then promote.
    Promote { epoch: Epoch },
    /// Accept writes again, requiring `standby` (or none).
    Unfence { standby: Option<HolderId> },
    /// Change which standby the database requires.
    SetRequiredStandby { standby: Option<HolderId> },
    /// Write the epoch into the database.
    RecordEpoch { epoch: Epoch },
    /// Store the metadata at a majority of witnesses.
    UpdateMeta { sync_standby: Option<HolderId> },
    /// Nothing to do; the reason is for the status and logs.
    Wait { reason: &'static str },
}

impl Action {
    /// Stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Action::Fence { .. } => "fence",
            Action::Acquire { .. } => "acquire",
            Action::Promote { .. } => "promote",
            Action::Unfence { .. } => "unfence",
            Action::SetRequiredStandby { .. } => "set_required_standby",
            Action::RecordEpoch { .. } => "record_epoch",
            Action::UpdateMeta { .. } => "update_meta",
            Action::Wait { .. } => "wait",
        }
    }
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
        return Action::Wait {
            reason: "database not answering",
        };
    };
    let held = held_now(obs);
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
    if !view.expired_at_majority {
        return Action::Wait {
            reason: "fenced: another region holds the lease",
        };
    }
    if db.epoch != view.max_epoch {
        return Action::Wait {
            reason: "fenced: a newer epoch was granted; rejoin as a replica",
        };
    }
    Action::Acquire {
        reason: "lease free and no newer epoch: resume as primary",
    }
}

fn primary_holding(obs: &Observation<'_>, db: &DbState, held: Held) -> Action {
    let desired = desired_standby(obs, db);
    let recorded_standby = obs.recorded.map(|m| m.sync_standby.clone());
    // Weakening (requiring no standby) needs "none" recorded first.
    let weaken_ok = recorded_standby == Some(None);
    if db.fenced {
        return match desired {
            None if !weaken_ok => Action::UpdateMeta { sync_standby: None },
            standby => Action::Unfence { standby },
        };
    }
    if db.required_standby != desired {
        return match desired {
            None if !weaken_ok => Action::UpdateMeta { sync_standby: None },
            standby => Action::SetRequiredStandby { standby },
        };
    }
    if db.epoch != held.epoch {
        return Action::RecordEpoch { epoch: held.epoch };
    }
    let current = effective_required(obs, db);
    if recorded_standby != Some(current.clone()) {
        return Action::UpdateMeta {
            sync_standby: current,
        };
    }
    Action::Wait {
        reason: "primary: holding the lease",
    }
}

fn standby_not_holding(obs: &Observation<'_>, _db: &DbState) -> Action {
    let Some(view) = obs.view else {
        return Action::Wait {
            reason: "standby: no majority of witnesses answered",
        };
    };
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
    use std::time::Duration;

    fn h(s: &str) -> HolderId {
        HolderId::new(s).expect("valid holder")
    }

    /// (meta epoch, named sync standby) as the witnesses return it.
    type MetaRow = (u64, Option<&'static str>);
    /// (expired at majority, max epoch, newest meta).
    type ViewRow = (bool, u64, Option<MetaRow>);

    struct Case {
        name: &'static str,
        primary: bool,
        fenced: bool,
        db_epoch: u64,
        required: Option<&'static str>,
        peer_attached: bool,
        held: Option<(u64, i64)>, // epoch, deadline offset ms from now
        view: Option<ViewRow>,
        recorded: Option<Option<&'static str>>,
        mode: Mode,
        policy: SyncPolicy,
        want: &'static str,
    }

    const BASE: Case = Case {
        name: "",
        primary: true,
        fenced: false,
        db_epoch: 1,
        required: Some("b"),
        peer_attached: true,
        held: Some((1, 1000)),
        view: Some((false, 1, Some((1, Some("b"))))),
        recorded: Some(Some("b")),
        mode: Mode::Automatic,
        policy: SyncPolicy::Preferred,
        want: "wait",
    };

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
        };
        let view = c.view.map(|(expired, max, meta)| MajorityView {
            holder: None,
            expired_at_majority: expired,
            max_epoch: Epoch(max),
            meta: meta.map(|(e, s)| {
                (
                    Epoch(e),
                    LeaseMeta {
                        sync_standby: s.map(h),
                        ..Default::default()
                    },
                )
            }),
            answered: 3,
        });
        let recorded = c.recorded.map(|s| LeaseMeta {
            sync_standby: s.map(h),
            ..Default::default()
        });
        let held = c.held.map(|(e, off)| Held {
            epoch: Epoch(e),
            deadline: if off >= 0 {
                now + Duration::from_millis(off as u64)
            } else {
                now - Duration::from_millis((-off) as u64)
            },
        });
        decide(&Observation {
            now,
            region: &region,
            peer: &peer,
            mode: c.mode,
            policy: c.policy,
            held,
            view: view.as_ref(),
            db: Some(&db),
            recorded: recorded.as_ref(),
        })
    }

    #[test]
    fn decision_table() {
        let cases = [
            Case {
                name: "steady primary waits",
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
        ];
        for c in &cases {
            let got = run(c);
            assert_eq!(got.label(), c.want, "{}: got {got:?}", c.name);
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
            late_ms in 0i64..10_000, has_view: bool,
        ) {
            let c = Case {
                name: "prop", primary: true, fenced: false, db_epoch: epoch,
                peer_attached: attached, held: Some((epoch, -late_ms)),
                view: has_view.then_some((expired, max, None)),
                recorded: rec.map(|r| r.map(|_| "b")),
                want: "fence", ..BASE
            };
            proptest::prop_assert_eq!(run(&c).label(), "fence");
        }

        /// Invariant 5: a fenced primary never unfences or acquires when a
        /// newer epoch exists.
        #[test]
        fn fenced_primary_behind_a_newer_epoch_stays_fenced(
            db_epoch in 0u64..5, ahead in 1u64..5, expired: bool,
        ) {
            let c = Case {
                name: "prop", primary: true, fenced: true, db_epoch, held: None,
                view: Some((expired, db_epoch + ahead, None)), want: "wait", ..BASE
            };
            proptest::prop_assert_eq!(run(&c).label(), "wait");
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
