//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Written here rather than adopted: `kube-leader-election` 0.44 still targets
//! kube 4, and `kube-lease-manager` 0.13 (kube 5) writes with strategic-merge and
//! forceless apply patches. This follows client-go's algorithm in ~150 lines:
//! read the Lease, and write it with `replace` (PUT carrying the observed
//! resourceVersion), so two contenders can never both win — the loser gets 409.
//! Expiry is judged by how long the record has been *observed* unchanged on the
//! local monotonic clock (as client-go does), never by comparing wall clocks.
//! A leader that cannot renew within `renew_deadline` steps down.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use prometheus::IntGauge;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    /// Step down if no renewal succeeded for this long (< lease_duration).
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(namespace: &str, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration / 5,
        }
    }
}

/// What to do with the current Lease record (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Renew,
    TakeOver,
    Follow,
}

/// `holder` of the record, how long it has been observed unchanged.
pub fn decide(
    me: &str,
    holder: Option<&str>,
    exists: bool,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> Step {
    if !exists {
        return Step::Create;
    }
    match holder {
        Some(h) if h == me => Step::Renew,
        Some(h) if !h.is_empty() && unchanged_for < lease_duration => Step::Follow,
        _ => Step::TakeOver,
    }
}

/// Runs forever; publishes `true` while this instance leads, and the latest Lease seen.
pub async fn run(
    api: Api<Lease>,
    cfg: LeaderConfig,
    leading: watch::Sender<bool>,
    lease_seen: watch::Sender<Option<Lease>>,
) {
    let mut observed: Option<(Option<String>, Option<String>)> = None;
    let mut observed_at = Instant::now();
    let mut last_renew: Option<Instant> = None;
    loop {
        let result = attempt(&api, &cfg, &mut observed, &mut observed_at).await;
        match result {
            Ok((won, lease)) => {
                if won {
                    last_renew = Some(Instant::now());
                }
                set(&leading, won, &cfg);
                lease_seen.send_replace(lease);
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "leader election attempt failed");
                if last_renew.is_none_or(|t| t.elapsed() >= cfg.renew_deadline) {
                    set(&leading, false, &cfg);
                }
            }
        }
        tokio::time::sleep(cfg.retry_period).await;
    }
}

fn set(leading: &watch::Sender<bool>, value: bool, cfg: &LeaderConfig) {
    let was = *leading.borrow();
    if was != value {
        tracing::info!(identity = %cfg.identity, lease = %cfg.name, leading = value, "leadership changed");
        leading.send_replace(value);
    }
}

fn spec_for(
    cfg: &LeaderConfig,
    old: Option<&LeaseSpec>,
    now: Timestamp,
    takeover: bool,
) -> LeaseSpec {
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs().max(1) as i32),
        acquire_time: if takeover {
            Some(MicroTime(now))
        } else {
            old.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if takeover && old.is_some() {
            transitions + 1
        } else {
            transitions
        }),
        ..Default::default()
    }
}

async fn attempt(
    api: &Api<Lease>,
    cfg: &LeaderConfig,
    observed: &mut Option<(Option<String>, Option<String>)>,
    observed_at: &mut Instant,
) -> Result<(bool, Option<Lease>), kube::Error> {
    let current = api.get_opt(&cfg.name).await?;
    let record = current.as_ref().map(|l| {
        let s = l.spec.clone().unwrap_or_default();
        (
            s.holder_identity.clone(),
            s.renew_time.as_ref().map(|t| t.0.to_string()),
        )
    });
    if record != *observed {
        *observed = record.clone();
        *observed_at = Instant::now();
    }
    let holder = current
        .as_ref()
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.clone());
    let step = decide(
        &cfg.identity,
        holder.as_deref(),
        current.is_some(),
        observed_at.elapsed(),
        cfg.lease_duration,
    );
    let now = Timestamp::now();
    let write = match (step, current) {
        (Step::Follow, cur) => return Ok((false, cur)),
        (Step::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec_for(cfg, None, now, true)),
            };
            api.create(&PostParams::default(), &lease).await
        }
        (step, Some(mut lease)) => {
            lease.spec = Some(spec_for(
                cfg,
                lease.spec.as_ref(),
                now,
                step == Step::TakeOver,
            ));
            api.replace(&cfg.name, &PostParams::default(), &lease).await
        }
        (_, None) => return Ok((false, None)),
    };
    match write {
        Ok(l) => {
            *observed = Some((
                Some(cfg.identity.clone()),
                l.spec
                    .as_ref()
                    .and_then(|s| s.renew_time.as_ref())
                    .map(|t| t.0.to_string()),
            ));
            *observed_at = Instant::now();
            Ok((true, Some(l)))
        }
        // Someone else wrote first: they lead.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok((false, None)),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up if this instance holds it, as client-go's
/// `ReleaseOnCancel` does: the record keeps its transitions but names no
/// holder, with a 1 s duration, so the other contenders take over at their
/// next attempt (`decide`: an empty holder is free) instead of waiting out
/// the lease. Call it only once this instance stopped renewing and stopped
/// acting as leader. Returns whether a record was released.
pub async fn release(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    // One retry when the record changed between the read and the write.
    for _ in 0..2 {
        let Some(mut lease) = api.get_opt(&cfg.name).await? else {
            return Ok(false);
        };
        let old = lease.spec.clone().unwrap_or_default();
        if old.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: old.lease_transitions,
            ..Default::default()
        });
        match api.replace(&cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                tracing::info!(identity = %cfg.identity, lease = %cfg.name, reason = "shutting down", "leader Lease released");
                return Ok(true);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Leader election as a task: the flag is `true` while this instance leads;
/// the second receiver carries the latest Lease seen (its annotations are
/// how operators talk to the leader, e.g. the guardrail acknowledgement).
pub fn elect(
    client: &Client,
    cfg: LeaderConfig,
) -> (
    watch::Receiver<bool>,
    watch::Receiver<Option<Lease>>,
    JoinHandle<()>,
) {
    let (leading_tx, leading_rx) = watch::channel(false);
    let (lease_tx, lease_rx) = watch::channel::<Option<Lease>>(None);
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let task = tokio::spawn(run(api, cfg, leading_tx, lease_tx));
    (leading_rx, lease_rx, task)
}

/// Runs a component only while this instance leads: `start` when leadership
/// is won, `stop` (awaited) when it is lost, so two replicas never act at
/// once for longer than the election allows. `gauge` is 1 while leading.
/// Returns once the election ended (its sender dropped), after `stop` if
/// the component was running.
pub fn supervise<R, Start, Stop, StopFut>(
    mut leading: watch::Receiver<bool>,
    gauge: IntGauge,
    component: &'static str,
    mut start: Start,
    mut stop: Stop,
) -> JoinHandle<()>
where
    R: Send + 'static,
    Start: FnMut() -> R + Send + 'static,
    Stop: FnMut(R) -> StopFut + Send + 'static,
    StopFut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
            }
            gauge.set(1);
            tracing::info!(component, reason = "won leadership", "component started");
            let running = start();
            let mut ended = false;
            while *leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    ended = true;
                    break;
                }
            }
            stop(running).await;
            gauge.set(0);
            if ended {
                tracing::info!(
                    component,
                    reason = "leader election stopped",
                    "component stopped"
                );
                return;
            }
            tracing::info!(component, reason = "lost leadership", "component stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let d = Duration::from_secs(15);
        let cases = [
            (None, false, 0, Step::Create),
            (Some("me"), true, 100, Step::Renew),
            (Some("other"), true, 14, Step::Follow),
            (Some("other"), true, 15, Step::TakeOver),
            (Some(""), true, 0, Step::TakeOver),
            (None, true, 0, Step::TakeOver),
        ];
        for (holder, exists, age, want) in cases {
            assert_eq!(
                decide("me", holder, exists, Duration::from_secs(age), d),
                want,
                "{holder:?} {age}"
            );
        }
    }
}
