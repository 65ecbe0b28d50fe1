//! Pure decisions: a validated HelmRelease (and, for branch A, its latest Helm
//! release record) plus the current time in, one decision with its deadline out.

use jiff::{SignedDuration, Timestamp};

use super::helm_storage::ReleaseRecord;
use super::model::{CondStatus, HrView};

/// What to do with one HelmRelease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing stuck (or helm-controller is working on it): wait for a change.
    Healthy,
    /// Already corrected/unlocked for this state: the audit annotation says so.
    AlreadyDone,
    /// Stuck, but not for long enough: look again exactly at this time.
    WaitUntil(Timestamp),
    /// Branch B: annotate, then patch status Ready=True.
    CorrectReady,
    /// Branch A candidate: the Helm storage Secret must be read to decide.
    CheckHelmStorage,
    /// Branch A: suspend/resume toggle for this pending release key.
    UnlockPending(String),
}

fn add(t: Timestamp, d: std::time::Duration) -> Timestamp {
    let sd = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(sd).unwrap_or(Timestamp::MAX)
}

/// First stage, from the HelmRelease alone.
pub fn decide(view: &HrView, now: Timestamp, threshold: std::time::Duration) -> Decision {
    if view.suspended || view.ready == CondStatus::True {
        return Decision::Healthy;
    }
    if view.ready == CondStatus::Unknown && view.history0_status.as_deref() == Some("deployed") {
        if view.corrected {
            return Decision::AlreadyDone;
        }
        let deadline = add(view.ready_since, threshold);
        return if now >= deadline {
            Decision::CorrectReady
        } else {
            Decision::WaitUntil(deadline)
        };
    }
    if view.reconciling {
        // helm-controller (>= 0.37 unlocks stale releases itself) is still at work.
        return Decision::Healthy;
    }
    Decision::CheckHelmStorage
}

/// Second stage of branch A, once the latest Helm release record is known.
pub fn decide_pending(
    view: &HrView,
    latest: Option<&ReleaseRecord>,
    now: Timestamp,
    threshold: std::time::Duration,
) -> Decision {
    let Some(rel) = latest.filter(|r| r.is_pending()) else {
        return Decision::Healthy;
    };
    if view.unlocked_release.as_deref() == Some(rel.key.as_str()) {
        return Decision::AlreadyDone;
    }
    // No timestamp in the record: count from when Ready last changed.
    let pending_since = rel.since.unwrap_or(view.ready_since);
    let deadline = add(view.ready_since, threshold).max(add(pending_since, view.timeout));
    if now >= deadline {
        Decision::UnlockPending(rel.key.clone())
    } else {
        Decision::WaitUntil(deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn view(ready: CondStatus, hist: Option<&str>) -> HrView {
        HrView {
            namespace: "ns".into(),
            name: "a".into(),
            suspended: false,
            ready,
            ready_since: ts(0),
            reconciling: false,
            history0_status: hist.map(Into::into),
            corrected: false,
            unlocked_release: None,
            timeout: Duration::from_secs(600),
            release_name: "a".into(),
            storage_namespace: "ns".into(),
        }
    }

    const TH: Duration = Duration::from_secs(300);

    #[test]
    fn branch_b_table() {
        use CondStatus::*;
        let corrected = HrView {
            corrected: true,
            ..view(Unknown, Some("deployed"))
        };
        let suspended = HrView {
            suspended: true,
            ..view(Unknown, Some("deployed"))
        };
        let cases: Vec<(HrView, i64, Decision)> = vec![
            (view(True, Some("deployed")), 10_000, Decision::Healthy),
            (
                view(Unknown, Some("deployed")),
                299,
                Decision::WaitUntil(ts(300)),
            ),
            (view(Unknown, Some("deployed")), 300, Decision::CorrectReady),
            (
                view(Unknown, Some("deployed")),
                10_000,
                Decision::CorrectReady,
            ),
            (corrected, 10_000, Decision::AlreadyDone),
            (suspended, 10_000, Decision::Healthy),
            // False + deployed is not branch B: helm-controller reported a failure.
            (
                view(False, Some("deployed")),
                10_000,
                Decision::CheckHelmStorage,
            ),
            (
                view(Unknown, Some("failed")),
                10_000,
                Decision::CheckHelmStorage,
            ),
            (view(Unknown, None), 10_000, Decision::CheckHelmStorage),
            (
                HrView {
                    reconciling: true,
                    ..view(False, None)
                },
                10_000,
                Decision::Healthy,
            ),
        ];
        for (v, now, want) in cases {
            assert_eq!(decide(&v, ts(now), TH), want, "{v:?} at {now}");
        }
    }

    #[test]
    fn branch_a_table() {
        let rec = |status: &str, since: Option<i64>| ReleaseRecord {
            key: "a.v2".into(),
            status: status.into(),
            since: since.map(ts),
        };
        let v = view(CondStatus::False, None);
        let unlocked = HrView {
            unlocked_release: Some("a.v2".into()),
            ..v.clone()
        };
        let unlocked_old = HrView {
            unlocked_release: Some("a.v1".into()),
            ..v.clone()
        };
        let cases: Vec<(HrView, Option<ReleaseRecord>, i64, Decision)> = vec![
            (v.clone(), None, 10_000, Decision::Healthy),
            (
                v.clone(),
                Some(rec("deployed", Some(0))),
                10_000,
                Decision::Healthy,
            ),
            (
                v.clone(),
                Some(rec("failed", Some(0))),
                10_000,
                Decision::Healthy,
            ),
            // Timeout (600 s) is later than the threshold (300 s): wait for the timeout.
            (
                v.clone(),
                Some(rec("pending-install", Some(0))),
                300,
                Decision::WaitUntil(ts(600)),
            ),
            (
                v.clone(),
                Some(rec("pending-upgrade", Some(0))),
                600,
                Decision::UnlockPending("a.v2".into()),
            ),
            (
                v.clone(),
                Some(rec("pending-rollback", Some(-1000))),
                299,
                Decision::WaitUntil(ts(300)),
            ),
            (
                v.clone(),
                Some(rec("pending-rollback", Some(-1000))),
                300,
                Decision::UnlockPending("a.v2".into()),
            ),
            (
                v.clone(),
                Some(rec("pending-install", None)),
                600,
                Decision::UnlockPending("a.v2".into()),
            ),
            (
                unlocked,
                Some(rec("pending-install", Some(0))),
                10_000,
                Decision::AlreadyDone,
            ),
            (
                unlocked_old,
                Some(rec("pending-install", Some(0))),
                10_000,
                Decision::UnlockPending("a.v2".into()),
            ),
        ];
        for (v, r, now, want) in cases {
            assert_eq!(
                decide_pending(&v, r.as_ref(), ts(now), TH),
                want,
                "{r:?} at {now}"
            );
        }
    }
}
