//! Watch-driven node pivot: status ConfigMap event -> decide -> render -> write
//! -> report (node annotations, status ConfigMap key, Event, metrics, log line).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::json;
use tokio::task::JoinHandle;

use super::writer::WriteOutcome;
use super::{apply, decide, read_secret_dir, render, Paths, PivotError, Target};
use crate::health::{self, HealthState};

#[derive(Debug, Clone)]
pub struct NodePivotOptions {
    /// Namespace of the cutover status ConfigMap (and of the report ConfigMap).
    pub namespace: String,
    pub configmap: String,
    pub key: String,
    /// ConfigMap receiving one key per node (`<node>`: JSON state).
    pub report_configmap: String,
    pub node_name: String,
    pub paths: Paths,
    pub mirror_map: PathBuf,
    pub secret_dir: Option<PathBuf>,
    pub health_addr: SocketAddr,
}

#[derive(Clone)]
pub struct Metrics {
    pub version: IntGaugeVec,
    pub restart_needed: IntGauge,
    pub writes: IntCounterVec,
    pub errors: IntCounterVec,
    pub reports_failed: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            version: IntGaugeVec::new(
                Opts::new(
                    "continuum_node_pivot_version",
                    "1 for the registries.yaml version this node is at (v1, v2)",
                ),
                &["version"],
            )?,
            restart_needed: IntGauge::new(
                "continuum_node_pivot_restart_needed",
                "1 once registries.yaml changed: k3s reads it only at start",
            )?,
            writes: IntCounterVec::new(
                Opts::new(
                    "continuum_node_pivot_writes_total",
                    "registries.yaml pivots by outcome (written, removed, unchanged)",
                ),
                &["outcome"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "continuum_node_pivot_errors_total",
                    "Pivots that wrote nothing, by cause",
                ),
                &["label"],
            )?,
            reports_failed: IntCounterVec::new(
                Opts::new(
                    "continuum_node_pivot_reports_failed_total",
                    "Reports (annotation, status key, Event) that could not be written",
                ),
                &["what"],
            )?,
        };
        registry.register(Box::new(m.version.clone()))?;
        registry.register(Box::new(m.restart_needed.clone()))?;
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.reports_failed.clone()))?;
        Ok(m)
    }
}

/// What this node last reported (so repeated watch events patch nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Reported {
    version: Option<&'static str>,
    restart_needed: bool,
    error: Option<String>,
}

struct Ctx {
    client: Client,
    opts: NodePivotOptions,
    metrics: Metrics,
    recorder: Recorder,
    last: Mutex<Reported>,
}

/// A running node pivot; everything stops when dropped.
pub struct NodePivot {
    pub health_addr: SocketAddr,
    pub registry: Registry,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for NodePivot {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl NodePivot {
    pub async fn start(client: Client, opts: NodePivotOptions) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry)?;
        let (health_addr, health_task) = health::serve(
            opts.health_addr,
            HealthState::without_guardrail(registry.clone()),
        )
        .await?;
        let reporter = Reporter {
            controller: "continuum-node-pivot".into(),
            instance: Some(opts.node_name.clone()),
        };
        let ctx = Arc::new(Ctx {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            opts,
            metrics,
            last: Mutex::new(Reported::default()),
        });
        let watch_task = tokio::spawn(run(ctx));
        Ok(Self {
            health_addr,
            registry,
            tasks: vec![health_task, watch_task],
        })
    }
}

async fn run(ctx: Arc<Ctx>) {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.opts.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", ctx.opts.configmap));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(cm)) | Ok(watcher::Event::InitApply(cm)) => {
                let value = cm.data.as_ref().and_then(|d| d.get(&ctx.opts.key)).cloned();
                reconcile(&ctx, value.as_deref()).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "status ConfigMap watch error (retrying with backoff)")
            }
        }
    }
}

/// One pivot step for the key's current value. Never panics; reports everything.
async fn reconcile(ctx: &Ctx, value: Option<&str>) {
    let target = match decide(value) {
        Ok(Some(t)) => t,
        Ok(None) => {
            tracing::debug!(key = %ctx.opts.key, "cutover not started: registries.yaml untouched");
            return;
        }
        Err(msg) => {
            failed(ctx, PivotError::UnknownValue(msg)).await;
            return;
        }
    };
    let opts = ctx.opts.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<WriteOutcome, PivotError> {
        let v2 = match target {
            Target::V2 => {
                let map_text = std::fs::read_to_string(&opts.mirror_map).map_err(|source| {
                    PivotError::Input {
                        path: opts.mirror_map.clone(),
                        source,
                    }
                })?;
                let secrets = read_secret_dir(opts.secret_dir.as_deref())?;
                render::render_text(&map_text, &secrets)?
            }
            Target::V1 => String::new(),
        };
        apply(&opts.paths, target, &v2)
    })
    .await;
    let outcome = match result {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            failed(ctx, e).await;
            return;
        }
        Err(join) => {
            tracing::error!(error = %join, "pivot task panicked");
            return;
        }
    };
    let changed = outcome != WriteOutcome::Unchanged;
    let label = match outcome {
        WriteOutcome::Written => "written",
        WriteOutcome::Removed => "removed",
        WriteOutcome::Unchanged => "unchanged",
    };
    ctx.metrics.writes.with_label_values(&[label]).inc();
    for v in ["v1", "v2"] {
        ctx.metrics
            .version
            .with_label_values(&[v])
            .set(i64::from(v == target.as_str()));
    }
    if changed {
        ctx.metrics.restart_needed.set(1);
    }
    tracing::info!(
        node = %ctx.opts.node_name,
        version = target.as_str(),
        outcome = label,
        path = %ctx.opts.paths.target.display(),
        reason = "status ConfigMap key changed",
        "registries.yaml pivot"
    );
    let restart_needed = {
        let last = ctx.last.lock().unwrap_or_else(|e| e.into_inner());
        last.restart_needed || changed
    };
    let state = Reported {
        version: Some(target.as_str()),
        restart_needed,
        error: None,
    };
    if changed {
        event(
            ctx,
            false,
            "RegistriesYamlWritten",
            format!(
                "registries.yaml is now {} ({label}); k3s restart needed to take effect",
                target.as_str()
            ),
        )
        .await;
    }
    report(ctx, state).await;
}

async fn failed(ctx: &Ctx, e: PivotError) {
    ctx.metrics.errors.with_label_values(&[e.label()]).inc();
    tracing::warn!(node = %ctx.opts.node_name, error = %e, label = e.label(), "registries.yaml pivot failed: file left as it was");
    let mut state = ctx.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
    state.error = Some(format!("{}: {e}", e.label()));
    event(
        ctx,
        true,
        "RegistriesYamlFailed",
        format!("nothing written: {e}"),
    )
    .await;
    report(ctx, state).await;
}

async fn event(ctx: &Ctx, warning: bool, reason: &str, note: String) {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(ctx.opts.node_name.clone()),
        ..ObjectReference::default()
    };
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "RegistryPivot".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        ctx.metrics
            .reports_failed
            .with_label_values(&["event"])
            .inc();
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}

/// Node annotations + the node's key in the report ConfigMap, when they changed.
async fn report(ctx: &Ctx, state: Reported) {
    if *ctx.last.lock().unwrap_or_else(|e| e.into_inner()) == state {
        return;
    }
    let mut ok = true;
    let mut ann = serde_json::Map::new();
    if let Some(v) = state.version {
        ann.insert(super::ANNOTATION_VERSION.into(), json!(v));
    }
    if state.restart_needed {
        ann.insert(super::ANNOTATION_RESTART_NEEDED.into(), json!("true"));
    }
    ann.insert(
        super::ANNOTATION_ERROR.into(),
        json!(state.error.clone().unwrap_or_default()),
    );
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({"metadata": {"annotations": ann}});
    if let Err(e) = nodes
        .patch(
            &ctx.opts.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        ok = false;
        ctx.metrics
            .reports_failed
            .with_label_values(&["node_annotation"])
            .inc();
        tracing::warn!(error = %e, node = %ctx.opts.node_name, "could not annotate node");
    }
    let value = json!({
        "version": state.version,
        "restartNeeded": state.restart_needed,
        "error": state.error,
    })
    .to_string();
    if let Err(e) = report_key(ctx, &value).await {
        ok = false;
        ctx.metrics
            .reports_failed
            .with_label_values(&["status_key"])
            .inc();
        tracing::warn!(error = %e, configmap = %ctx.opts.report_configmap, "could not write node status key");
    }
    if ok {
        *ctx.last.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

/// Merge-patch `data.<node>` (other nodes' keys untouched); create the ConfigMap if missing.
async fn report_key(ctx: &Ctx, value: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.opts.namespace);
    let patch = json!({"data": {ctx.opts.node_name.clone(): value}});
    match api
        .patch(
            &ctx.opts.report_configmap,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": ctx.opts.report_configmap, "namespace": ctx.opts.namespace},
                "data": {ctx.opts.node_name.clone(): value},
            }))
            .map_err(kube::Error::SerdeError)?;
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => Ok(()),
                // Another node created it first: patch our key into theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => api
                    .patch(
                        &ctx.opts.report_configmap,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}
