//! The shared evaluate-and-act core, and the kube-runtime Controller around it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::Client;

use super::actions::{self, Error};
use super::decide::{self, Decision};
use super::guardrail::{Admission, Guardrail};
use super::metrics::Metrics;
use super::model::{self, HelmRelease, HrView};
use super::Config;

/// Which recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Branch {
    /// B: deployed but Ready stuck Unknown.
    DeployedUnknownReady,
    /// A: Helm release stuck pending (the key `<name>.v<N>`).
    PendingRelease(String),
}

impl Branch {
    pub fn label(&self) -> &'static str {
        match self {
            Self::DeployedUnknownReady => "deployed_unknown_ready",
            Self::PendingRelease(_) => "pending_release",
        }
    }
}

/// Result of evaluating one HelmRelease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Healthy,
    AlreadyDone,
    Skipped(&'static str),
    Wait(Timestamp),
    Acted(Branch),
    WouldAct(Branch),
    /// The guardrail refused this action.
    Blocked(Branch),
}

/// Everything a reconcile needs.
pub struct Ctx {
    pub client: Client,
    pub cfg: Config,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub guard: Arc<Mutex<Guardrail>>,
}

impl Ctx {
    pub fn new(
        client: Client,
        cfg: Config,
        metrics: Metrics,
        instance: String,
        guard: Arc<Mutex<Guardrail>>,
    ) -> Self {
        let reporter = Reporter {
            controller: "continuum-hr-recovery".into(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            cfg,
            metrics,
            guard,
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, Guardrail> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// observe -> validate -> decide -> apply -> report, for one HelmRelease.
pub async fn process(ctx: &Ctx, hr: &HelmRelease, now: Timestamp) -> Result<Outcome, Error> {
    let view = match model::validate(hr) {
        Ok(v) => v,
        Err(reason) => {
            ctx.metrics
                .skipped
                .with_label_values(&[reason.label()])
                .inc();
            tracing::info!(
                namespace = hr.metadata.namespace.as_deref().unwrap_or(""),
                name = hr.metadata.name.as_deref().unwrap_or(""),
                reason = reason.label(),
                "skipping HelmRelease"
            );
            return Ok(Outcome::Skipped(reason.label()));
        }
    };
    let branch = match decide::decide(&view, now, ctx.cfg.threshold) {
        Decision::Healthy => return Ok(Outcome::Healthy),
        Decision::AlreadyDone => return Ok(Outcome::AlreadyDone),
        Decision::WaitUntil(t) => return Ok(Outcome::Wait(t)),
        Decision::CorrectReady => Branch::DeployedUnknownReady,
        Decision::UnlockPending(k) => Branch::PendingRelease(k),
        Decision::CheckHelmStorage => {
            let latest = match actions::latest_release(&ctx.client, &view).await {
                Ok(r) => r,
                Err(Error::Storage(e)) => {
                    ctx.metrics.skipped.with_label_values(&[e.label()]).inc();
                    tracing::info!(namespace = %view.namespace, name = %view.name, reason = e.label(), detail = %e, "skipping HelmRelease: Helm storage secret unreadable");
                    return Ok(Outcome::Skipped(e.label()));
                }
                Err(e) => return Err(e),
            };
            match decide::decide_pending(&view, latest.as_ref(), now, ctx.cfg.threshold) {
                Decision::UnlockPending(k) => Branch::PendingRelease(k),
                Decision::WaitUntil(t) => return Ok(Outcome::Wait(t)),
                Decision::AlreadyDone => return Ok(Outcome::AlreadyDone),
                _ => return Ok(Outcome::Healthy),
            }
        }
    };
    act(ctx, hr, &view, branch, now).await
}

async fn act(
    ctx: &Ctx,
    hr: &HelmRelease,
    view: &HrView,
    branch: Branch,
    now: Timestamp,
) -> Result<Outcome, Error> {
    let admission = ctx.guard().admit(Instant::now(), now);
    let label = branch.label();
    match admission {
        Admission::Allowed => {}
        Admission::Tripped => {
            ctx.metrics.guardrail_trips.inc();
            ctx.metrics.guardrail_tripped.set(1);
            ctx.metrics
                .actions
                .with_label_values(&[label, "guardrail"])
                .inc();
            tracing::error!(
                namespace = %view.namespace, name = %view.name, branch = label, max_actions = ctx.cfg.max_actions,
                "guardrail tripped: more than max_actions recoveries in one pass; stopping until acknowledged"
            );
            let note = format!(
                "stuck-hr-recovery guardrail: more than {} actions in one pass; recovery stopped until an operator acknowledges (annotation {} on the agent Lease, or restart)",
                ctx.cfg.max_actions,
                super::ANNOTATION_GUARDRAIL_ACK
            );
            actions::publish(
                &ctx.recorder,
                &ctx.metrics,
                hr,
                true,
                "GuardrailTripped",
                note,
            )
            .await;
            return Ok(Outcome::Blocked(branch));
        }
        Admission::Blocked => {
            ctx.metrics
                .actions
                .with_label_values(&[label, "guardrail"])
                .inc();
            tracing::warn!(namespace = %view.namespace, name = %view.name, branch = label, "guardrail tripped: not acting");
            return Ok(Outcome::Blocked(branch));
        }
    }
    if ctx.cfg.dry_run {
        ctx.metrics
            .actions
            .with_label_values(&[label, "dry_run"])
            .inc();
        tracing::info!(namespace = %view.namespace, name = %view.name, branch = label, "dry run: would recover HelmRelease");
        return Ok(Outcome::WouldAct(branch));
    }
    let result = match &branch {
        Branch::DeployedUnknownReady => actions::correct_ready(&ctx.client, hr, view, now).await,
        Branch::PendingRelease(key) => {
            actions::unlock_pending(&ctx.client, hr, view, key, now).await
        }
    };
    match result {
        Ok(()) => {
            ctx.metrics
                .actions
                .with_label_values(&[label, "done"])
                .inc();
            let (reason, note) = match &branch {
                Branch::DeployedUnknownReady => (
                    "AutoCorrectedReady",
                    format!(
                        "{}: Ready was Unknown since {} with history[0].status=deployed",
                        super::CORRECTED_MESSAGE,
                        actions::rfc3339(view.ready_since)
                    ),
                ),
                Branch::PendingRelease(key) => (
                    "UnlockedPendingRelease",
                    format!("stuck-hr-recovery: Helm release {key} stuck pending past the timeout; suspend/resume toggled"),
                ),
            };
            tracing::info!(namespace = %view.namespace, name = %view.name, branch = label, reason, note = %note, "recovered stuck HelmRelease");
            actions::publish(&ctx.recorder, &ctx.metrics, hr, false, reason, note).await;
            Ok(Outcome::Acted(branch))
        }
        Err(e) => {
            ctx.metrics
                .actions
                .with_label_values(&[label, "failed"])
                .inc();
            tracing::error!(namespace = %view.namespace, name = %view.name, branch = label, error = %e, "recovery failed");
            actions::publish(
                &ctx.recorder,
                &ctx.metrics,
                hr,
                true,
                "RecoveryFailed",
                format!("stuck-hr-recovery {label} failed: {e}"),
            )
            .await;
            Err(e)
        }
    }
}

/// Small slack so a requeue never fires a hair before the deadline.
const DEADLINE_SLACK: Duration = Duration::from_millis(5);

async fn reconcile(hr: Arc<HelmRelease>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let now = Timestamp::now();
    Ok(match process(&ctx, &hr, now).await? {
        Outcome::Wait(deadline) => {
            let wait = deadline.duration_since(now).unsigned_abs();
            Action::requeue(wait + DEADLINE_SLACK)
        }
        _ => Action::await_change(),
    })
}

fn error_policy(_hr: Arc<HelmRelease>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.errors.with_label_values(&[err.label()]).inc();
    tracing::warn!(error = %err, label = err.label(), "reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}

/// Run the controller until the stream ends (or the task is aborted on losing leadership).
/// `reconcile_all` re-evaluates every HelmRelease (after a guardrail acknowledgement).
pub async fn run(ctx: Arc<Ctx>, reconcile_all: impl Stream<Item = ()> + Send + Sync + 'static) {
    let api: Api<HelmRelease> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .reconcile_all_on(reconcile_all)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
