//! The pre-flight guard controller: observe (HelmRelease, source artifact, chart,
//! live CRDs) -> [`decide`] (pure) -> act (suspend + annotate, or record the
//! checked revision) -> report (Event, metric, one log line).
//!
//! Watch-driven on HelmReleases and on the HelmChart / OCIRepository sources
//! (a new artifact re-checks the HelmReleases using it). Blocked HelmReleases are
//! re-checked every minute, so the safe procedure (migrate storage, patch
//! `status.storedVersions`) releases them without an override.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};

use super::chart::{self, ChartContents, ChartError};
use super::crd::{self, CrdView};
use super::decide::{self, Input, Removed, Verdict, Violation};
use super::fetch::{FetchError, Fetcher};
use super::metrics::Metrics;
use super::release::{self, ReleaseError};
use super::skew::{self, FluxVersion, SkewState};
use super::source::{self, Artifact, GuardedHr, SourceKind, SourceRef};
use super::{
    Config, ANNOTATION_BLOCKED, ANNOTATION_BLOCKED_REASON, ANNOTATION_CHECKED, ANNOTATION_CRDS,
    ANNOTATION_OVERRIDE, FIELD_MANAGER, SAFE_PROCEDURE,
};

/// How often a blocked HelmRelease is re-checked.
pub const BLOCKED_RECHECK: Duration = Duration::from_secs(60);
/// How often deleted HelmReleases are dropped from the blocked gauge.
const BLOCKED_PRUNE: Duration = Duration::from_secs(2);
/// events.k8s.io/v1 `note` limit.
const NOTE_MAX: usize = 1024;

/// Errors of one check; `label()` is the metric label. The check is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the chart source: {0}")]
    Source(#[source] kube::Error),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Chart(#[from] ChartError),
    #[error("reading live CRD {name}: {source}")]
    GetCrd {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("live CRD {name} is malformed: {source}")]
    LiveCrd {
        name: String,
        #[source]
        source: crd::CrdError,
    },
    #[error("listing objects of CRD {name}: {source}")]
    ListObjects {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading Helm release Secret {namespace}/{name}: {source}")]
    GetRelease {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Helm release Secret {namespace}/{name}: {source}")]
    Release {
        namespace: String,
        name: String,
        #[source]
        source: ReleaseError,
    },
    #[error("patching the HelmRelease: {0}")]
    Patch(#[source] kube::Error),
}

/// A write refused because the HelmRelease changed since it was read: re-read, not an error.
fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::Patch(kube::Error::Api(s)) if s.code == 409)
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Source(_) => "get_source",
            Self::Fetch(e) => e.label(),
            Self::Chart(e) => e.label(),
            Self::GetCrd { .. } => "get_crd",
            Self::LiveCrd { source, .. } => source.label(),
            Self::ListObjects { .. } => "list_objects",
            Self::GetRelease { .. } => "get_release_secret",
            Self::Release { source, .. } => source.label(),
            Self::Patch(_) => "patch_helmrelease",
        }
    }
}

/// What one check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Skipped(&'static str),
    AlreadyChecked,
    Passed { resumed: bool },
    Blocked(Vec<Violation>),
    StillBlocked,
    Overridden(Vec<Violation>),
}

/// Everything a check needs.
pub struct Ctx {
    pub client: Client,
    pub cfg: Config,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub fetcher: Fetcher,
    pub skew: Arc<SkewState>,
    /// `namespace/name` of the HelmReleases currently held suspended.
    blocked: Mutex<BTreeSet<String>>,
    /// Artifact key last read for the version skew of the Flux HelmRelease.
    skew_key: Mutex<Option<String>>,
    /// `namespace/name` -> artifact key let through, so a reconcile from a cache
    /// that does not show the annotation yet does not download the chart again.
    passed: Mutex<std::collections::HashMap<String, String>>,
    /// The served API of each source kind, once discovered.
    served: Mutex<BTreeMap<SourceKind, ApiResource>>,
}

impl Ctx {
    pub fn new(
        client: Client,
        cfg: Config,
        metrics: Metrics,
        skew: Arc<SkewState>,
        instance: String,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            fetcher: Fetcher::new(cfg.max_chart_bytes, cfg.fetch_timeout),
            client,
            cfg,
            metrics,
            skew,
            blocked: Mutex::new(BTreeSet::new()),
            skew_key: Mutex::new(None),
            passed: Mutex::new(std::collections::HashMap::new()),
            served: Mutex::new(BTreeMap::new()),
        }
    }

    /// The API to read a source kind with: the discovered one, else the newest.
    pub fn source_api(&self, kind: SourceKind) -> ApiResource {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| kind.api_resource())
    }

    /// Find the served version of each source kind (a kind not served is left out).
    pub async fn discover_sources(&self) -> Vec<SourceKind> {
        let mut found = Vec::new();
        for kind in [SourceKind::HelmChart, SourceKind::OciRepository] {
            for v in kind.versions() {
                let ar = kind.api_resource_at(v);
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
                match api.list_metadata(&ListParams::default().limit(1)).await {
                    Err(kube::Error::Api(s)) if s.code == 404 => continue,
                    // Served (or not readable: the watch reports that with its own errors).
                    _ => {
                        self.served
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(kind, ar);
                        found.push(kind);
                        break;
                    }
                }
            }
            if !found.contains(&kind) {
                tracing::warn!(kind = ?kind, "flux guard: source kind not served, not watched (HelmRelease changes still trigger checks)");
            }
        }
        found
    }

    /// Forget blocked HelmReleases that no longer exist.
    fn prune_blocked(&self, existing: &BTreeSet<String>) {
        let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        b.retain(|k| existing.contains(k));
        self.metrics.blocked.set(b.len() as i64);
    }

    fn set_blocked(&self, key: String, blocked: bool) {
        let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked {
            b.insert(key);
        } else {
            b.remove(&key);
        }
        self.metrics.blocked.set(b.len() as i64);
    }
}

fn crd_api(client: &Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    );
    Api::all_with(client.clone(), &ar)
}

async fn source_artifact(ctx: &Ctx, src: &SourceRef) -> Result<Option<Artifact>, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &src.namespace,
        &ctx.source_api(src.kind),
    );
    match api.get_opt(&src.name).await.map_err(Error::Source)? {
        None => Ok(None),
        Some(o) => Ok(serde_json::to_value(&o)
            .ok()
            .and_then(|v| source::artifact_of(&v))),
    }
}

async fn live_crd(client: &Client, name: &str) -> Result<Option<CrdView>, Error> {
    let got = crd_api(client)
        .get_opt(name)
        .await
        .map_err(|source| Error::GetCrd {
            name: name.into(),
            source,
        })?;
    let Some(o) = got else { return Ok(None) };
    let v = serde_json::to_value(&o).unwrap_or(Value::Null);
    crd::parse(&v).map(Some).map_err(|source| Error::LiveCrd {
        name: name.into(),
        source,
    })
}

/// Templated CRDs of the Helm release the next upgrade starts from (its
/// storage Secret, read by name). A Secret that does not exist gives nothing:
/// Helm cannot compute deletions from a release it cannot read either.
async fn installed_crds(client: &Client, hr: &GuardedHr) -> Result<BTreeSet<String>, Error> {
    let Some((namespace, name)) = hr.current_release() else {
        return Ok(BTreeSet::new());
    };
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Secret"), "secrets");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &ar);
    let got = api
        .get_opt(&name)
        .await
        .map_err(|source| Error::GetRelease {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    let Some(secret) = got else {
        tracing::debug!(namespace = %namespace, name = %name, "Helm release Secret named by status.history not found");
        return Ok(BTreeSet::new());
    };
    let v = serde_json::to_value(&secret).unwrap_or(Value::Null);
    release::deletable_crds(&v).map_err(|source| Error::Release {
        namespace,
        name,
        source,
    })
}

/// Whether objects of a live CRD exist (one-item list at its storage version).
async fn removed_state(client: &Client, live: &CrdView) -> Result<Removed, Error> {
    let version = live
        .storage_version()
        .or_else(|| live.versions.first().map(|v| v.name.as_str()))
        .unwrap_or("v1");
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&live.group, version, ""),
        &live.plural,
    );
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(l) if l.items.is_empty() => Ok(Removed::NoObjects),
        Ok(_) => Ok(Removed::HasObjects),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(Removed::Unverifiable),
        Err(source) => Err(Error::ListObjects {
            name: live.name.clone(),
            source,
        }),
    }
}

/// The Flux the chart would install: the `flux2` (sub)chart, else the root chart.
pub fn desired_flux(contents: &ChartContents) -> FluxVersion {
    let chart = contents.chart_named("flux2").or_else(|| contents.root());
    FluxVersion {
        version: chart
            .and_then(|c| c.app_version.as_deref())
            .map(skew::normalize),
        tags: chart
            .and_then(|c| contents.image_tags.get(&c.path))
            .cloned()
            .unwrap_or_default(),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max.saturating_sub(3);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

async fn publish(ctx: &Ctx, hr: &GuardedHr, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(truncate(note, NOTE_MAX)),
        action: "FluxGuard".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &hr.object_ref(&())).await {
        ctx.metrics.events_failed.inc();
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}

fn pp() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Check one HelmRelease's chart revision and act on the verdict.
pub async fn process(ctx: &Ctx, hr: &GuardedHr) -> Result<Outcome, Error> {
    let (ns, name) = (hr.namespace().to_string(), hr.name().to_string());
    let hr_key = format!("{ns}/{name}");
    let src = match source::source_of(hr) {
        Ok(s) => s,
        Err(skip) => {
            ctx.metrics.skipped.with_label_values(&[skip.label()]).inc();
            return Ok(Outcome::Skipped(skip.label()));
        }
    };
    let Some(artifact) = source_artifact(ctx, &src).await? else {
        ctx.metrics
            .skipped
            .with_label_values(&["no_artifact"])
            .inc();
        tracing::debug!(namespace = %ns, name = %name, "no chart artifact yet");
        return Ok(Outcome::Skipped("no_artifact"));
    };
    let key = artifact.key();
    let checked = hr.annotation(ANNOTATION_CHECKED) == Some(key.as_str())
        || ctx
            .passed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hr_key)
            == Some(&key);
    let is_flux = hr_key == ctx.cfg.flux_release;
    let skew_known = ctx
        .skew_key
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
        == Some(key.as_str());
    if checked && (!is_flux || skew_known) {
        ctx.set_blocked(hr_key, false);
        return Ok(Outcome::AlreadyChecked);
    }

    ctx.metrics.fetches.inc();
    let tgz = ctx
        .fetcher
        .fetch(&artifact.url, artifact.digest.as_deref())
        .await?;
    let limit = ctx.cfg.max_chart_bytes.saturating_mul(16);
    let contents = chart::extract(&tgz, limit)?;
    drop(tgz);

    // Version skew is reported after the verdict is acted on: the suspend comes first.
    let skew_note = if is_flux {
        *ctx.skew_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key.clone());
        ctx.skew.set_desired(desired_flux(&contents)).map(|s| {
            let note = format!(
                "Flux version skew: {} (running {}, HelmRelease {hr_key} would install {})",
                s.differences.join("; "),
                s.running,
                s.desired
            );
            tracing::warn!(namespace = %ns, name = %name, running = %s.running, desired = %s.desired, "{note}");
            note
        })
    } else {
        None
    };
    let outcome = if checked {
        Ok(Outcome::AlreadyChecked)
    } else {
        check(ctx, hr, &artifact, &contents).await
    };
    if let Some(note) = skew_note {
        publish(ctx, hr, true, "FluxVersionSkew", note).await;
    }
    outcome
}

/// Compare the chart's CRDs with the live ones and act on the verdict.
async fn check(
    ctx: &Ctx,
    hr: &GuardedHr,
    artifact: &Artifact,
    contents: &ChartContents,
) -> Result<Outcome, Error> {
    let (ns, name) = (hr.namespace().to_string(), hr.name().to_string());
    let hr_key = format!("{ns}/{name}");
    let key = artifact.key();
    let mut live = BTreeMap::new();
    let all_names: BTreeSet<String> = contents.crds.iter().map(|c| c.crd.name.clone()).collect();
    for n in &all_names {
        if let Some(l) = live_crd(&ctx.client, n).await? {
            live.insert(n.to_string(), l);
        }
    }
    let live_names: BTreeSet<String> = live.keys().cloned().collect();
    let chart_crds: Vec<CrdView> =
        decide::applied_crds(&contents.crds, hr.crd_policy(), &live_names);
    let names = decide::deletable_names(&contents.crds);
    // What the last checked revision carried, and what Helm actually installed.
    let mut previous: BTreeSet<String> = hr
        .annotation(ANNOTATION_CRDS)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    previous.extend(installed_crds(&ctx.client, hr).await?);
    let mut removed = BTreeMap::new();
    for r in decide::removed_names(&previous, &names) {
        if let Some(l) = live_crd(&ctx.client, &r).await? {
            removed.insert(r, removed_state(&ctx.client, &l).await?);
        }
    }
    let overridden =
        decide::override_matches(hr.annotation(ANNOTATION_OVERRIDE), &artifact.revision, &key);
    let input = Input {
        chart: chart_crds,
        live,
        removed,
        unverifiable: contents.unverifiable.clone(),
        overridden,
    };
    let verdict = decide::decide(&input);
    let crd_list = names.iter().cloned().collect::<Vec<_>>().join(",");
    let api: Api<GuardedHr> = Api::namespaced(ctx.client.clone(), &ns);
    let was_blocked = hr.annotation(ANNOTATION_BLOCKED).is_some();

    match verdict {
        Verdict::Block(violations) => {
            let text = violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            if hr.annotation(ANNOTATION_BLOCKED) == Some(key.as_str())
                && hr.suspended()
                && hr.annotation(ANNOTATION_BLOCKED_REASON) == Some(text.as_str())
            {
                ctx.set_blocked(hr_key, true);
                return Ok(Outcome::StillBlocked);
            }
            // Suspend first: nothing else is written before helm-controller is stopped.
            // No resourceVersion precondition: suspending is the safe direction
            // whatever changed meanwhile (a concurrent status or spec update must
            // not turn into a 409, a re-download and a later suspend), and a
            // changed spec or source is re-checked by the watch anyway. The
            // merge patch touches only these fields.
            let patch = json!({
                "metadata": {
                    "annotations": {ANNOTATION_BLOCKED: key, ANNOTATION_BLOCKED_REASON: text},
                },
                "spec": {"suspend": true},
            });
            api.patch(&name, &pp(), &Patch::Merge(&patch))
                .await
                .map_err(Error::Patch)?;
            ctx.set_blocked(hr_key, true);
            ctx.metrics.checks.with_label_values(&["blocked"]).inc();
            let reasons: BTreeSet<&str> = violations.iter().map(Violation::label).collect();
            for r in &reasons {
                ctx.metrics.blocked_total.with_label_values(&[r]).inc();
            }
            tracing::error!(
                namespace = %ns, name = %name, revision = %key, url = %artifact.url,
                reasons = %reasons.iter().copied().collect::<Vec<_>>().join(","), violations = %text,
                "flux guard: unsafe chart revision, HelmRelease suspended"
            );
            // The procedure always fits: the violations give way (the annotation has them all).
            let head = format!("suspended: chart revision {key} would break live CRDs: ");
            let room = NOTE_MAX.saturating_sub(head.len() + SAFE_PROCEDURE.len() + 2);
            let note = format!("{head}{}. {SAFE_PROCEDURE}", truncate(text.clone(), room));
            publish(ctx, hr, true, "FluxGuardBlocked", note).await;
            Ok(Outcome::Blocked(violations))
        }
        Verdict::Pass | Verdict::Overridden(_) => {
            let resume = was_blocked && hr.suspended();
            // Resuming keeps the resourceVersion precondition: it lets
            // helm-controller act, so only on exactly the object that was checked.
            // Recording the checked artifact alone is keyed by the artifact and
            // needs none.
            let mut patch = json!({
                "metadata": {
                    "annotations": {
                        ANNOTATION_CHECKED: key,
                        ANNOTATION_CRDS: crd_list,
                        ANNOTATION_BLOCKED: null,
                        ANNOTATION_BLOCKED_REASON: null,
                    },
                },
            });
            if resume {
                patch["spec"] = json!({"suspend": false});
                patch["metadata"]["resourceVersion"] = json!(hr.metadata.resource_version);
            }
            api.patch(&name, &pp(), &Patch::Merge(&patch))
                .await
                .map_err(Error::Patch)?;
            ctx.passed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(hr_key.clone(), key.clone());
            ctx.set_blocked(hr_key, false);
            match verdict {
                Verdict::Overridden(violations) => {
                    ctx.metrics.checks.with_label_values(&["overridden"]).inc();
                    ctx.metrics.overrides.inc();
                    let text = violations
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    tracing::warn!(namespace = %ns, name = %name, revision = %key, resumed = resume, violations = %text,
                        "flux guard: unsafe chart revision let through by operator override ({ANNOTATION_OVERRIDE})");
                    publish(
                        ctx,
                        hr,
                        true,
                        "FluxGuardOverridden",
                        format!("chart revision {key} let through by {ANNOTATION_OVERRIDE} despite: {text}"),
                    )
                    .await;
                    Ok(Outcome::Overridden(violations))
                }
                _ => {
                    ctx.metrics.checks.with_label_values(&["pass"]).inc();
                    tracing::info!(namespace = %ns, name = %name, revision = %key, crds = all_names.len(), resumed = resume,
                        "flux guard: chart revision checked, CRDs safe");
                    if resume {
                        publish(
                            ctx,
                            hr,
                            false,
                            "FluxGuardReleased",
                            format!("chart revision {key} is now safe for the live CRDs; HelmRelease resumed"),
                        )
                        .await;
                    }
                    Ok(Outcome::Passed { resumed: resume })
                }
            }
        }
    }
}

async fn reconcile(hr: Arc<GuardedHr>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    Ok(match process(&ctx, &hr).await? {
        Outcome::Blocked(_) | Outcome::StillBlocked => Action::requeue(BLOCKED_RECHECK),
        _ => Action::await_change(),
    })
}

fn error_policy(hr: Arc<GuardedHr>, err: &Error, ctx: Arc<Ctx>) -> Action {
    if is_conflict(err) {
        tracing::debug!(
            namespace = hr.namespace(),
            name = hr.name(),
            "HelmRelease changed while checking; re-reading"
        );
        return Action::requeue(Duration::from_millis(200));
    }
    ctx.metrics.errors.with_label_values(&[err.label()]).inc();
    tracing::warn!(namespace = hr.namespace(), name = hr.name(), error = %err, label = err.label(), "flux guard check failed; retrying in 10s");
    Action::requeue(Duration::from_secs(10))
}

fn refs_for(
    store: &kube::runtime::reflector::Store<GuardedHr>,
    kind: SourceKind,
    src: &DynamicObject,
) -> Vec<ObjectRef<GuardedHr>> {
    let (ns, name) = (src.namespace().unwrap_or_default(), src.name_any());
    store
        .state()
        .iter()
        .filter(|hr| {
            source::source_of(hr)
                .is_ok_and(|s| s.kind == kind && s.namespace == ns && s.name == name)
        })
        .map(|hr| ObjectRef::from_obj(hr.as_ref()))
        .collect()
}

/// Run the guard until aborted (losing leadership).
pub async fn run(ctx: Arc<Ctx>) {
    let api: Api<GuardedHr> = Api::all(ctx.client.clone());
    let ctl = Controller::new(api, watcher::Config::default());
    let store = ctl.store();
    let mut ctl = ctl;
    // A kind this cluster does not serve would fail its watch forever, and the
    // controller's shared trigger backoff would then delay every HelmRelease.
    for kind in ctx.discover_sources().await {
        let ar = ctx.source_api(kind);
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        let store = store.clone();
        ctl = ctl.watches_with(api, ar, watcher::Config::default(), move |src| {
            refs_for(&store, kind, &src)
        });
    }
    // Deleted HelmReleases are never reconciled: drop them from the blocked gauge.
    let prune = {
        let (ctx, store) = (ctx.clone(), store.clone());
        async move {
            if store.wait_until_ready().await.is_err() {
                return std::future::pending().await;
            }
            let mut tick = tokio::time::interval(BLOCKED_PRUNE);
            loop {
                tick.tick().await;
                let live: BTreeSet<String> = store
                    .state()
                    .iter()
                    .map(|h| format!("{}/{}", h.namespace(), h.name()))
                    .collect();
                ctx.prune_blocked(&live);
            }
        }
    };
    let controller = ctl.run(reconcile, error_policy, ctx).for_each(|_| async {});
    tokio::select! {
        _ = controller => {}
        _ = prune => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("abc".into(), 10), "abc");
        assert_eq!(truncate("abcdefghij".into(), 6), "abc...");
        let t = truncate("ééééé".into(), 6);
        assert!(t.len() <= 6 && t.ends_with("..."), "{t}");
        assert!(SAFE_PROCEDURE.len() < NOTE_MAX / 2);
    }
}
