//! Watch Flux sources and report external URLs and reverts (metric, Warning
//! Event, log line, JSON status).

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{Api, DynamicObject, Resource, ResourceExt};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::task::JoinHandle;

use super::{LocalHosts, Observation, SourceKey, Tracker};

/// The Flux source kinds watched: (group, version, kind, plural).
pub const SOURCE_KINDS: [(&str, &str, &str, &str); 3] = [
    (
        "source.toolkit.fluxcd.io",
        "v1",
        "HelmRepository",
        "helmrepositories",
    ),
    (
        "source.toolkit.fluxcd.io",
        "v1beta2",
        "OCIRepository",
        "ocirepositories",
    ),
    (
        "source.toolkit.fluxcd.io",
        "v1",
        "GitRepository",
        "gitrepositories",
    ),
];

#[derive(Clone)]
pub struct Metrics {
    pub external: IntGaugeVec,
    pub reverts: IntCounterVec,
    pub events_failed: prometheus::IntCounter,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            external: IntGaugeVec::new(
                Opts::new(
                    "continuum_source_pivot_external",
                    "Flux sources whose URL points outside the Sovereign, by kind",
                ),
                &["kind"],
            )?,
            reverts: IntCounterVec::new(
                Opts::new(
                    "continuum_source_pivot_reverts_total",
                    "Flux source URLs that went back to an external host after being pivoted",
                ),
                &["kind"],
            )?,
            events_failed: prometheus::IntCounter::new(
                "continuum_source_pivot_events_failed_total",
                "Kubernetes Events that could not be published",
            )?,
        };
        registry.register(Box::new(m.external.clone()))?;
        registry.register(Box::new(m.reverts.clone()))?;
        registry.register(Box::new(m.events_failed.clone()))?;
        Ok(m)
    }
}

/// A running source watcher; stops when dropped.
pub struct SourceWatch {
    tracker: Arc<Mutex<Tracker>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SourceWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SourceWatch {
    /// Watch all namespaces. `instance` names this agent in Events.
    pub fn start(client: Client, local: LocalHosts, metrics: Metrics, instance: String) -> Self {
        let tracker = Arc::new(Mutex::new(Tracker::new(local)));
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "continuum-source-pivot".into(),
                instance: Some(instance),
            },
        );
        let mut tasks = Vec::new();
        for (group, version, kind, plural) in SOURCE_KINDS {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            );
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            tasks.push(tokio::spawn(run(
                api,
                ar,
                tracker.clone(),
                metrics.clone(),
                recorder.clone(),
            )));
        }
        Self { tracker, tasks }
    }

    /// The `/status` document: `{"sources": n, "external": [...], "reverted": [...]}`.
    pub fn status(&self) -> serde_json::Value {
        self.tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status()
    }

    /// A cloneable status getter (for a health server route).
    pub fn status_fn(&self) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
        let t = self.tracker.clone();
        move || t.lock().unwrap_or_else(|e| e.into_inner()).status()
    }
}

async fn run(
    api: Api<DynamicObject>,
    ar: ApiResource,
    tracker: Arc<Mutex<Tracker>>,
    metrics: Metrics,
    recorder: Recorder,
) {
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        let (obj, deleted) = match ev {
            Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => (o, false),
            Ok(watcher::Event::Delete(o)) => (o, true),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(kind = %ar.kind, error = %e, "source watch error (retrying with backoff)");
                continue;
            }
        };
        let key = SourceKey {
            kind: ar.kind.clone(),
            namespace: obj.namespace().unwrap_or_default(),
            name: obj.name_any(),
        };
        let url = obj
            .data
            .get("spec")
            .and_then(|s| s.get("url"))
            .and_then(|u| u.as_str())
            .map(str::to_string);
        let obs = {
            let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
            let obs = match (&url, deleted) {
                (Some(u), false) => Some(t.observe(key.clone(), u)),
                _ => {
                    t.forget(&key);
                    None
                }
            };
            let counts = t.external_counts();
            metrics
                .external
                .with_label_values(&[ar.kind.as_str()])
                .set(counts.get(&ar.kind).copied().unwrap_or(0));
            obs
        };
        match obs {
            Some(Observation::Reverted { from, to }) => {
                metrics.reverts.with_label_values(&[ar.kind.as_str()]).inc();
                tracing::warn!(
                    kind = %key.kind, namespace = %key.namespace, name = %key.name,
                    pivoted_url = %from, current_url = %to,
                    reason = "URL went back outside the Sovereign (Git still declares the old URL?)",
                    "source pivot reverted"
                );
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "SourcePivotReverted".into(),
                    note: Some(format!(
                        "spec.url went back from {from} to {to}: the declaration in Git still points outside the Sovereign (run `continuum-agent pivot sources`)"
                    )),
                    action: "SourcePivotWatch".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &obj.object_ref(&ar)).await {
                    metrics.events_failed.inc();
                    tracing::warn!(error = %e, "could not publish Event");
                }
            }
            Some(Observation::External) => {
                tracing::info!(kind = %key.kind, namespace = %key.namespace, name = %key.name, url = url.as_deref().unwrap_or(""), "source points outside the Sovereign");
            }
            _ => {}
        }
    }
}

/// The `/status` route of the agent's health port for this watcher.
pub fn status_provider(watch: &SourceWatch) -> crate::health::StatusProvider {
    let f = watch.status_fn();
    std::sync::Arc::new(move || format!("{}\n", f()))
}
