//! Flux controller loss (seed 000: a failed Helm upgrade's rollback deleted every
//! Flux controller). While the controllers are available, their manifests
//! (Deployments, ServiceAccounts, the ClusterRoles/Bindings and the Flux
//! namespace's Roles/RoleBindings they are bound by, the Services selecting them,
//! Flux's NetworkPolicies, the Flux CRDs) are kept, stripped of server fields and
//! gzip-compressed, in a ConfigMap the agent owns. When a controller disappears,
//! every missing object of the snapshot is re-applied with server-side apply.
//!
//! Controllers of `--flux-controllers` that never ran here (image automation is
//! optional) are not a loss: only those seen running, or in the snapshot, are
//! expected. Time to restore is measured from the first sign of loss (the
//! Deployment's deletionTimestamp when the watch shows one, else the moment it
//! is seen gone) to re-applied, and to available again.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::{json, Value};
use std::sync::Arc;

use super::metrics::Metrics;
use super::skew::{self, SkewState};
use super::{Config, FIELD_MANAGER};

/// Key of the compressed snapshot in the ConfigMap's binaryData.
pub const SNAPSHOT_KEY: &str = "snapshot.json.gz";
/// Annotation: SHA-256 of the uncompressed snapshot (skip identical rewrites).
pub const ANNOTATION_SNAPSHOT_SHA: &str = "dr.openova.io/flux-snapshot-sha256";
/// Annotation: when the snapshot was taken.
pub const ANNOTATION_SNAPSHOT_AT: &str = "dr.openova.io/flux-snapshot-taken-at";
/// A ConfigMap holds at most 1 MiB; keep room for metadata.
pub const MAX_SNAPSHOT_BYTES: usize = 1024 * 1024 - 16 * 1024;
/// Label of the Flux CRDs (set by Flux's install manifests and chart).
pub const FLUX_PART_OF: &str = "app.kubernetes.io/part-of=flux";
/// Re-check period while something is missing or a restore failed.
const RETRY: Duration = Duration::from_secs(1);
/// After a restore, keep re-applying late-deleted snapshot objects this long
/// (a Helm rollback deletes objects one by one, in no particular order).
const AFTER_RESTORE: Duration = Duration::from_secs(30);

/// Kinds in the snapshot, in restore order, with their resource.
const KINDS: &[(&str, &str, &str, &str, bool)] = &[
    (
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
    ),
    ("", "v1", "ServiceAccount", "serviceaccounts", true),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
    ),
    (
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
    ("", "v1", "Service", "services", true),
    ("apps", "v1", "Deployment", "deployments", true),
];

/// The controllers expected to run: those of `wanted` running now or known
/// (in the snapshot, or seen running by this process). When none is known yet
/// (a fresh agent, no snapshot, no controller running) all are expected, so
/// a Flux with no controller at all is still reported.
pub fn expected_controllers(
    wanted: &[String],
    running: &BTreeSet<String>,
    known: &BTreeSet<String>,
) -> Vec<String> {
    let expected: Vec<String> = wanted
        .iter()
        .filter(|c| running.contains(*c) || known.contains(*c))
        .cloned()
        .collect();
    if expected.is_empty() {
        wanted.to_vec()
    } else {
        expected
    }
}

/// When a loss started: the deletionTimestamp (second precision, so the figure
/// can only come out longer) when it is in the recent past, else `now`.
pub fn loss_start(
    now: Instant,
    wall_now: jiff::Timestamp,
    deletion: Option<jiff::Timestamp>,
) -> Instant {
    deletion
        .and_then(|t| Duration::try_from(wall_now.duration_since(t)).ok())
        .filter(|age| *age < Duration::from_secs(600))
        .and_then(|age| now.checked_sub(age))
        .unwrap_or(now)
}

/// Whether a (Cluster)RoleBinding names one of the Flux ServiceAccounts.
fn binds_flux(binding: &Value, ns: &str, sa_names: &BTreeSet<String>) -> bool {
    binding
        .get("subjects")
        .and_then(Value::as_array)
        .is_some_and(|s| {
            s.iter().any(|s| {
                s.get("kind").and_then(Value::as_str) == Some("ServiceAccount")
                    && s.get("namespace").and_then(Value::as_str) == Some(ns)
                    && s.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| sa_names.contains(n))
            })
        })
}

/// ClusterRoles Kubernetes provides; bindings to them are kept, the roles are not.
fn builtin_role(name: &str) -> bool {
    matches!(name, "cluster-admin" | "admin" | "edit" | "view") || name.starts_with("system:")
}

/// Errors of the keeper; `label()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing the snapshot ConfigMap: {0}")]
    Write(#[source] kube::Error),
    #[error("the Flux snapshot is {size} bytes compressed, over the ConfigMap limit of {MAX_SNAPSHOT_BYTES} bytes; restore from Git instead, or snapshot fewer objects")]
    TooLarge { size: usize },
    #[error("the stored snapshot is unreadable: {0}")]
    Corrupt(String),
    #[error("re-applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Flux controllers {0:?} are missing and there is no snapshot to restore them from")]
    NoSnapshot(Vec<String>),
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "snapshot_read",
            Self::Write(_) => "snapshot_write",
            Self::TooLarge { .. } => "snapshot_too_large",
            Self::Corrupt(_) => "snapshot_corrupt",
            Self::Apply { .. } => "restore_apply",
            Self::NoSnapshot(_) => "no_snapshot",
        }
    }
}

/// Remove what the API server sets, so the manifest can be applied anew.
pub fn strip(obj: &Value) -> Value {
    let mut o = obj.clone();
    let is_service = o.get("kind").and_then(Value::as_str) == Some("Service");
    if let Some(m) = o.as_object_mut() {
        m.remove("status");
    }
    if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
        // Service addresses are the API server's to allocate again.
        if is_service {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        }
    }
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
            "ownerReferences",
            "finalizers",
        ] {
            meta.remove(f);
        }
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
            a.remove("deployment.kubernetes.io/revision");
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    o
}

/// `Kind namespace/name` of a manifest.
fn describe(o: &Value) -> (String, String, String) {
    let s = |p: &str| {
        o.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    (s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
}

/// The snapshot: manifests in restore order.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub objects: Vec<Value>,
}

impl Snapshot {
    /// Canonical JSON and its SHA-256.
    pub fn encode(&self) -> (Vec<u8>, String) {
        let json =
            serde_json::to_vec(&json!({"version": 1, "objects": self.objects})).unwrap_or_default();
        let sha = ring::digest::digest(&ring::digest::SHA256, &json)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (json, sha)
    }

    /// Gzip of the canonical JSON, refused over the ConfigMap limit.
    pub fn compress(&self) -> Result<(Vec<u8>, String), Error> {
        let (json, sha) = self.encode();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&json)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let bytes = gz.finish().map_err(|e| Error::Corrupt(e.to_string()))?;
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(Error::TooLarge { size: bytes.len() });
        }
        Ok((bytes, sha))
    }

    /// Decode a stored snapshot (bounded: 64 MiB uncompressed).
    pub fn decompress(gz: &[u8]) -> Result<Self, Error> {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .take(64 * 1024 * 1024)
            .read_to_end(&mut json)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let v: Value = serde_json::from_slice(&json).map_err(|e| Error::Corrupt(e.to_string()))?;
        match v.get("objects") {
            Some(Value::Array(a)) if v.get("version") == Some(&json!(1)) => {
                Ok(Self { objects: a.clone() })
            }
            _ => Err(Error::Corrupt("no version 1 objects list".into())),
        }
    }

    /// Deployment names in the snapshot.
    pub fn deployments(&self) -> BTreeSet<String> {
        self.objects
            .iter()
            .map(describe)
            .filter(|(k, _, _)| k == "Deployment")
            .map(|(_, _, n)| n)
            .collect()
    }
}

/// A Deployment is available: condition Available=True, or availableReplicas > 0.
pub fn available(d: &Value) -> bool {
    let cond = d
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Available")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        });
    cond || d
        .pointer("/status/availableReplicas")
        .and_then(Value::as_i64)
        .is_some_and(|n| n > 0)
}

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn to_value(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

/// Snapshots and restores the Flux controllers.
pub struct Keeper {
    client: Client,
    cfg: Config,
    metrics: Metrics,
    skew: Arc<SkewState>,
    recorder: Recorder,
    snapshot: Option<Snapshot>,
    stored_sha: Option<String>,
    last_snapshot: Option<Instant>,
    /// When each missing controller was first seen missing.
    gone_since: BTreeMap<String, Instant>,
    reported_no_snapshot: bool,
    /// Last restore: for a while after it, objects deleted late are re-applied too.
    last_restore: Option<Instant>,
    /// Controllers seen running by this process (expected from then on).
    seen: BTreeSet<String>,
    /// When the watch showed a controller's deletion starting (deletionTimestamp).
    deleted_at: BTreeMap<String, Instant>,
    /// Restored controllers not available yet, with when their loss started.
    awaiting: BTreeMap<String, Instant>,
}

impl Keeper {
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
            client,
            cfg,
            metrics,
            skew,
            snapshot: None,
            stored_sha: None,
            last_snapshot: None,
            gone_since: BTreeMap::new(),
            reported_no_snapshot: false,
            last_restore: None,
            seen: BTreeSet::new(),
            deleted_at: BTreeMap::new(),
            awaiting: BTreeMap::new(),
        }
    }

    fn cm_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.cfg.snapshot_namespace,
            &ar("", "v1", "ConfigMap", "configmaps"),
        )
    }

    /// Load the stored snapshot (after a restart or a leader change).
    pub async fn load(&mut self) -> Result<(), Error> {
        let cm = self
            .cm_api()
            .get_opt(&self.cfg.snapshot_name)
            .await
            .map_err(|source| Error::Read {
                what: "the snapshot ConfigMap",
                source,
            })?;
        let Some(cm) = cm else { return Ok(()) };
        let v = to_value(&cm);
        let b64 = v
            .get("binaryData")
            .and_then(|b| b.get(SNAPSHOT_KEY))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Corrupt(format!("no binaryData.{SNAPSHOT_KEY}")))?;
        use base64::Engine;
        let gz = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let snap = Snapshot::decompress(&gz)?;
        self.stored_sha = Some(snap.encode().1);
        tracing::info!(
            objects = snap.objects.len(),
            "flux guard: loaded the stored Flux snapshot"
        );
        self.snapshot = Some(snap);
        Ok(())
    }

    /// Read the current manifests of the healthy Flux.
    pub async fn take(&self, deployments: &[Value]) -> Result<Snapshot, Error> {
        let ns = &self.cfg.flux_namespace;
        let mut objects = Vec::new();
        // CRDs (labelled part-of=flux, in a toolkit.fluxcd.io group).
        let crds: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &ar(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
            ),
        );
        let list = crds
            .list(&ListParams::default().labels(FLUX_PART_OF))
            .await
            .map_err(|source| Error::Read {
                what: "Flux CRDs",
                source,
            })?;
        for c in &list.items {
            let v = to_value(c);
            if v.pointer("/spec/group")
                .and_then(Value::as_str)
                .is_some_and(|g| g.ends_with(".toolkit.fluxcd.io"))
            {
                objects.push(strip(&v));
            }
        }
        // ServiceAccounts the controllers run as.
        let sa_names: BTreeSet<String> = deployments
            .iter()
            .filter_map(|d| {
                d.pointer("/spec/template/spec/serviceAccountName")
                    .and_then(Value::as_str)
            })
            .filter(|n| !n.is_empty() && *n != "default")
            .map(str::to_string)
            .collect();
        let sas: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &ar("", "v1", "ServiceAccount", "serviceaccounts"),
        );
        for n in &sa_names {
            if let Some(sa) = sas.get_opt(n).await.map_err(|source| Error::Read {
                what: "Flux ServiceAccounts",
                source,
            })? {
                objects.push(strip(&to_value(&sa)));
            }
        }
        // ClusterRoleBindings naming those ServiceAccounts, and their non-built-in ClusterRoles.
        let crbs: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &ar(
                "rbac.authorization.k8s.io",
                "v1",
                "ClusterRoleBinding",
                "clusterrolebindings",
            ),
        );
        let list = crbs
            .list(&ListParams::default())
            .await
            .map_err(|source| Error::Read {
                what: "ClusterRoleBindings",
                source,
            })?;
        let mut roles = BTreeSet::new();
        let mut bindings = Vec::new();
        for b in &list.items {
            let v = to_value(b);
            if !binds_flux(&v, ns, &sa_names) {
                continue;
            }
            if v.pointer("/roleRef/kind").and_then(Value::as_str) == Some("ClusterRole") {
                if let Some(r) = v.pointer("/roleRef/name").and_then(Value::as_str) {
                    if !builtin_role(r) {
                        roles.insert(r.to_string());
                    }
                }
            }
            bindings.push(strip(&v));
        }
        // RoleBindings of the Flux namespace naming them (namespaced installs,
        // leader election), their Roles, and the ClusterRoles they bind.
        let rbs: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &ar(
                "rbac.authorization.k8s.io",
                "v1",
                "RoleBinding",
                "rolebindings",
            ),
        );
        let list = rbs
            .list(&ListParams::default())
            .await
            .map_err(|source| Error::Read {
                what: "Flux RoleBindings",
                source,
            })?;
        let mut ns_roles = BTreeSet::new();
        let mut ns_bindings = Vec::new();
        for b in &list.items {
            let v = to_value(b);
            if !binds_flux(&v, ns, &sa_names) {
                continue;
            }
            match (
                v.pointer("/roleRef/kind").and_then(Value::as_str),
                v.pointer("/roleRef/name").and_then(Value::as_str),
            ) {
                (Some("Role"), Some(r)) => {
                    ns_roles.insert(r.to_string());
                }
                (Some("ClusterRole"), Some(r)) if !builtin_role(r) => {
                    roles.insert(r.to_string());
                }
                _ => {}
            }
            ns_bindings.push(strip(&v));
        }
        let crs: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &ar(
                "rbac.authorization.k8s.io",
                "v1",
                "ClusterRole",
                "clusterroles",
            ),
        );
        for r in &roles {
            if let Some(role) = crs.get_opt(r).await.map_err(|source| Error::Read {
                what: "ClusterRoles",
                source,
            })? {
                objects.push(strip(&to_value(&role)));
            }
        }
        objects.extend(bindings);
        let nsr: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &ar("rbac.authorization.k8s.io", "v1", "Role", "roles"),
        );
        for r in &ns_roles {
            if let Some(role) = nsr.get_opt(r).await.map_err(|source| Error::Read {
                what: "Flux Roles",
                source,
            })? {
                objects.push(strip(&to_value(&role)));
            }
        }
        objects.extend(ns_bindings);
        // Flux's NetworkPolicies (allow-egress, allow-scraping, allow-webhooks):
        // without allow-egress restored controllers cannot reach their sources.
        let nps: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &ar(
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
            ),
        );
        let list = nps
            .list(&ListParams::default().labels(FLUX_PART_OF))
            .await
            .map_err(|source| Error::Read {
                what: "Flux NetworkPolicies",
                source,
            })?;
        objects.extend(list.items.iter().map(|n| strip(&to_value(n))));
        // Services selecting controller pods (source-controller serves the artifacts).
        let pod_labels: Vec<&serde_json::Map<String, Value>> = deployments
            .iter()
            .filter_map(|d| {
                d.pointer("/spec/template/metadata/labels")
                    .and_then(Value::as_object)
            })
            .collect();
        let svcs: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &ar("", "v1", "Service", "services"),
        );
        let list = svcs
            .list(&ListParams::default())
            .await
            .map_err(|source| Error::Read {
                what: "Flux Services",
                source,
            })?;
        for svc in &list.items {
            let v = to_value(svc);
            let Some(sel) = v.pointer("/spec/selector").and_then(Value::as_object) else {
                continue;
            };
            if !sel.is_empty()
                && pod_labels
                    .iter()
                    .any(|l| sel.iter().all(|(k, val)| l.get(k) == Some(val)))
            {
                objects.push(strip(&v));
            }
        }
        for d in deployments {
            objects.push(strip(d));
        }
        Ok(Snapshot { objects })
    }

    /// Write the snapshot when it changed.
    async fn store(&mut self, snap: Snapshot) -> Result<(), Error> {
        let (gz, sha) = snap.compress()?;
        if self.stored_sha.as_deref() == Some(sha.as_str()) {
            self.snapshot = Some(snap);
            return Ok(());
        }
        use base64::Engine;
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.cfg.snapshot_name,
                "namespace": self.cfg.snapshot_namespace,
                "labels": {"app.kubernetes.io/managed-by": "continuum-agent"},
                "annotations": {
                    ANNOTATION_SNAPSHOT_SHA: sha,
                    ANNOTATION_SNAPSHOT_AT: jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                },
            },
            "binaryData": {SNAPSHOT_KEY: base64::engine::general_purpose::STANDARD.encode(&gz)},
        });
        self.cm_api()
            .patch(
                &self.cfg.snapshot_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await
            .map_err(Error::Write)?;
        self.metrics.snapshots.inc();
        self.metrics.snapshot_bytes.set(gz.len() as i64);
        tracing::info!(
            objects = snap.objects.len(), bytes = gz.len(), sha = %sha,
            configmap = %format!("{}/{}", self.cfg.snapshot_namespace, self.cfg.snapshot_name),
            "flux guard: stored Flux snapshot"
        );
        self.stored_sha = Some(sha);
        self.snapshot = Some(snap);
        Ok(())
    }

    /// Re-apply every object of the snapshot that no longer exists; returns the restored Deployments.
    pub async fn restore(&self, snap: &Snapshot) -> Result<Vec<(String, ObjectReference)>, Error> {
        let mut restored = Vec::new();
        for (group, version, kind, plural, namespaced) in KINDS {
            let res = ar(group, version, kind, plural);
            for o in snap
                .objects
                .iter()
                .filter(|o| o.get("kind").and_then(Value::as_str) == Some(kind))
            {
                let (_, ns, name) = describe(o);
                // Only the controllers configured now: one dropped from the list stays gone.
                if *kind == "Deployment" && !self.cfg.controllers.contains(&name) {
                    continue;
                }
                let api: Api<DynamicObject> = if *namespaced {
                    Api::namespaced_with(self.client.clone(), &ns, &res)
                } else {
                    Api::all_with(self.client.clone(), &res)
                };
                let err = |source| Error::Apply {
                    kind: kind.to_string(),
                    name: name.clone(),
                    source,
                };
                if api.get_opt(&name).await.map_err(err)?.is_some() {
                    continue;
                }
                let applied = api
                    .patch(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(o),
                    )
                    .await
                    .map_err(|source| Error::Apply {
                        kind: kind.to_string(),
                        name: name.clone(),
                        source,
                    })?;
                self.metrics.restores.with_label_values(&[kind]).inc();
                tracing::warn!(kind, namespace = %ns, name = %name, "flux guard: re-applied missing Flux object from the snapshot");
                if *kind == "Deployment" {
                    restored.push((
                        name.clone(),
                        ObjectReference {
                            api_version: Some("apps/v1".into()),
                            kind: Some("Deployment".into()),
                            namespace: Some(ns.clone()),
                            name: Some(name.clone()),
                            uid: applied.metadata.uid.clone(),
                            ..Default::default()
                        },
                    ));
                }
            }
        }
        Ok(restored)
    }

    async fn publish(
        &self,
        reference: &ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "FluxGuard".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            self.metrics.events_failed.inc();
            tracing::warn!(error = %e, reason, "could not publish Event");
        }
    }

    fn flux_release_ref(&self) -> ObjectReference {
        let (ns, name) = self
            .cfg
            .flux_release
            .split_once('/')
            .unwrap_or(("flux-system", self.cfg.flux_release.as_str()));
        ObjectReference {
            api_version: Some("helm.toolkit.fluxcd.io/v2".into()),
            kind: Some("HelmRelease".into()),
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    /// One evaluation over the current Flux Deployments.
    async fn evaluate(&mut self, deployments: &BTreeMap<String, Value>) -> Result<(), Error> {
        let now = Instant::now();
        let running: BTreeSet<String> = deployments.keys().cloned().collect();
        let mut known = self.seen.clone();
        if let Some(s) = &self.snapshot {
            known.extend(s.deployments());
        }
        let expected = expected_controllers(&self.cfg.controllers, &running, &known);
        let wanted: Vec<&String> = expected.iter().collect();
        self.seen.extend(
            wanted
                .iter()
                .filter(|c| running.contains(**c))
                .map(|c| c.to_string()),
        );
        let missing: Vec<String> = wanted
            .iter()
            .filter(|c| !deployments.contains_key(c.as_str()))
            .map(|c| c.to_string())
            .collect();
        self.gone_since.retain(|c, _| missing.contains(c));
        for m in &missing {
            let since = self.deleted_at.get(m).copied().unwrap_or(now);
            self.gone_since.entry(m.clone()).or_insert(since);
        }
        self.deleted_at
            .retain(|c, _| missing.contains(c) || deployments.contains_key(c));
        // Restored controllers that are available again: the full time to restore.
        let back: Vec<(String, Instant)> = self
            .awaiting
            .iter()
            .filter(|(c, _)| deployments.get(*c).is_some_and(available))
            .map(|(c, t)| (c.clone(), *t))
            .collect();
        for (name, since) in back {
            self.awaiting.remove(&name);
            let secs = now.duration_since(since).as_secs_f64();
            self.metrics.restore_available_seconds.observe(secs);
            tracing::info!(deployment = %name, namespace = %self.cfg.flux_namespace, time_to_available_s = secs,
                "flux guard: restored Flux controller is available again");
        }
        let present: Vec<Value> = wanted
            .iter()
            .filter_map(|c| deployments.get(c.as_str()).cloned())
            .collect();
        let healthy = missing.is_empty() && present.iter().all(available);
        self.metrics.flux_healthy.set(i64::from(healthy));
        if !present.is_empty() {
            if let Some(s) = self.skew.set_running(skew::running_from(&present)) {
                let note = format!(
                    "Flux version skew: {} (running {}, HelmRelease {} would install {})",
                    s.differences.join("; "),
                    s.running,
                    self.skew.release(),
                    s.desired
                );
                tracing::warn!(running = %s.running, desired = %s.desired, "{note}");
                let r = self.flux_release_ref();
                self.publish(&r, true, "FluxVersionSkew", note).await;
            }
        }
        let settling = self
            .last_restore
            .is_some_and(|t| now.duration_since(t) < AFTER_RESTORE);
        // Restored controllers take a while to become available: late deletions
        // of the other objects are re-applied meanwhile too.
        if settling && missing.is_empty() {
            if let Some(snap) = self.snapshot.clone() {
                // A Deployment deleted before the watch says so is re-applied here: reported too.
                let restored = self.restore(&snap).await?;
                self.report_restored(restored, now).await;
            }
            return Ok(());
        }
        if healthy {
            self.reported_no_snapshot = false;
            let due = self
                .last_snapshot
                .is_none_or(|t| now.duration_since(t) >= self.cfg.resnapshot_interval);
            let changed = self.snapshot.as_ref().is_none_or(|s| {
                let current: BTreeSet<String> = present
                    .iter()
                    .map(|d| serde_json::to_string(&strip(d)).unwrap_or_default())
                    .collect();
                let stored: BTreeSet<String> = s
                    .objects
                    .iter()
                    .filter(|o| o.get("kind").and_then(Value::as_str) == Some("Deployment"))
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect();
                current != stored
            });
            if due || changed {
                let snap = self.take(&present).await?;
                self.store(snap).await?;
                self.last_snapshot = Some(now);
            }
            return Ok(());
        }
        if missing.is_empty() {
            return Ok(());
        }
        let Some(snap) = self.snapshot.clone() else {
            let e = Error::NoSnapshot(missing);
            if !self.reported_no_snapshot {
                self.reported_no_snapshot = true;
                return Err(e);
            }
            return Ok(());
        };
        tracing::error!(missing = %missing.join(","), "flux guard: Flux controllers are gone; restoring from the snapshot");
        let restored = self.restore(&snap).await?;
        self.last_restore = Some(Instant::now());
        self.report_restored(restored, now).await;
        Ok(())
    }

    /// Metric, log line and Event for each re-applied Deployment; the loss
    /// started when it was seen gone, else at its deletionTimestamp, else `now`.
    async fn report_restored(&mut self, restored: Vec<(String, ObjectReference)>, now: Instant) {
        let done = Instant::now();
        for (name, reference) in restored {
            let deleted = self.deleted_at.remove(&name);
            let since = self.gone_since.remove(&name).or(deleted).unwrap_or(now);
            self.awaiting.insert(name.clone(), since);
            let secs = done.duration_since(since).as_secs_f64();
            self.metrics.restore_seconds.observe(secs);
            tracing::warn!(deployment = %name, namespace = %self.cfg.flux_namespace, time_to_restore_s = secs,
                "flux guard: Flux controller restored from snapshot");
            self.publish(
                &reference,
                true,
                "FluxControllerRestored",
                format!("Flux controller {name} was deleted; re-applied from the snapshot {}/{} with server-side apply {secs:.3}s after it was seen gone", self.cfg.snapshot_namespace, self.cfg.snapshot_name),
            )
            .await;
        }
    }

    /// Remember when a controller's deletion started (its deletionTimestamp);
    /// a live object without one (re-created) clears it.
    fn note_deletion(&mut self, o: &DynamicObject, deleted: bool) {
        let Some(name) = &o.metadata.name else { return };
        match &o.metadata.deletion_timestamp {
            Some(t) => {
                let at = loss_start(Instant::now(), jiff::Timestamp::now(), Some(t.0));
                self.deleted_at.entry(name.clone()).or_insert(at);
            }
            None if !deleted => {
                self.deleted_at.remove(name);
            }
            None => {}
        }
    }

    /// Watch the Flux Deployments and keep snapshot and controllers in place, until aborted.
    pub async fn run(mut self) {
        if let Err(e) = self.load().await {
            self.metrics.errors.with_label_values(&[e.label()]).inc();
            tracing::warn!(error = %e, "flux guard: could not load the stored snapshot");
        }
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.cfg.flux_namespace,
            &ar("apps", "v1", "Deployment", "deployments"),
        );
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut current: BTreeMap<String, Value> = BTreeMap::new();
        let mut buffer: BTreeMap<String, Value> = BTreeMap::new();
        let mut synced = false;
        let mut retry = false;
        let mut tick = tokio::time::interval(RETRY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_eval = Instant::now();
        loop {
            let changed = tokio::select! {
                ev = stream.next() => match ev {
                    None => return,
                    Some(Err(e)) => {
                        self.metrics.errors.with_label_values(&["watch_deployments"]).inc();
                        tracing::warn!(error = %e, "flux guard: Deployment watch error");
                        false
                    }
                    Some(Ok(ev)) => {
                        let name = |o: &DynamicObject| o.metadata.name.clone().unwrap_or_default();
                        match ev {
                            watcher::Event::Init => { buffer.clear(); false }
                            watcher::Event::InitApply(o) => { buffer.insert(name(&o), to_value(&o)); false }
                            watcher::Event::InitDone => { current = std::mem::take(&mut buffer); synced = true; true }
                            watcher::Event::Apply(o) => { self.note_deletion(&o, false); current.insert(name(&o), to_value(&o)); true }
                            watcher::Event::Delete(o) => { self.note_deletion(&o, true); current.remove(&name(&o)); true }
                        }
                    }
                },
                _ = tick.tick() => retry
                    || last_eval.elapsed() >= self.cfg.resnapshot_interval,
            };
            if !changed || !synced {
                continue;
            }
            last_eval = Instant::now();
            match self.evaluate(&current).await {
                Ok(()) => {
                    retry = !self.gone_since.is_empty()
                        || self
                            .last_restore
                            .is_some_and(|t| t.elapsed() < AFTER_RESTORE)
                }
                Err(e) => {
                    retry = true;
                    self.metrics.errors.with_label_values(&[e.label()]).inc();
                    tracing::error!(error = %e, label = e.label(), "flux guard: Flux snapshot/restore failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_and_round_trip() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "helm-controller", "namespace": "flux-system", "uid": "u", "resourceVersion": "9",
                "generation": 2, "creationTimestamp": "t", "managedFields": [], "labels": {"a": "b"},
                "annotations": {"deployment.kubernetes.io/revision": "3"}},
            "spec": {"replicas": 1}, "status": {"availableReplicas": 1}});
        let s = strip(&d);
        assert_eq!(
            s,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "helm-controller", "namespace": "flux-system", "labels": {"a": "b"}},
            "spec": {"replicas": 1}})
        );
        assert!(available(&d));
        let svc = json!({"kind": "Service", "metadata": {"name": "source-controller"},
            "spec": {"clusterIP": "10.43.0.9", "clusterIPs": ["10.43.0.9"], "ports": [{"port": 80}], "selector": {"app": "source-controller"}}});
        assert_eq!(
            strip(&svc)["spec"],
            json!({"ports": [{"port": 80}], "selector": {"app": "source-controller"}})
        );
        assert!(!available(&s));
        let snap = Snapshot { objects: vec![s] };
        let (gz, _) = snap.compress().unwrap();
        assert_eq!(Snapshot::decompress(&gz).unwrap(), snap);
        assert_eq!(snap.deployments(), ["helm-controller".to_string()].into());
        assert_eq!(
            Snapshot::decompress(b"junk").unwrap_err().label(),
            "snapshot_corrupt"
        );
    }

    #[test]
    fn optional_controllers_never_seen_are_not_lost() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let wanted: Vec<String> = [
            "helm-controller",
            "source-controller",
            "image-reflector-controller",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cases: [(&[&str], &[&str], &[&str]); 5] = [
            // Image automation never installed: only the running ones are expected.
            (
                &["helm-controller", "source-controller"],
                &[],
                &["helm-controller", "source-controller"],
            ),
            // Known from the snapshot (or seen) and gone now: expected, so missing.
            (
                &["source-controller"],
                &["helm-controller", "image-reflector-controller"],
                &[
                    "helm-controller",
                    "source-controller",
                    "image-reflector-controller",
                ],
            ),
            // Nothing running, nothing known: all expected (Flux is not there at all).
            (
                &[],
                &[],
                &[
                    "helm-controller",
                    "source-controller",
                    "image-reflector-controller",
                ],
            ),
            // Nothing running, snapshot knows two: those two.
            (
                &[],
                &["helm-controller", "source-controller"],
                &["helm-controller", "source-controller"],
            ),
            // Something running that is not wanted does not count.
            (
                &["other"],
                &[],
                &[
                    "helm-controller",
                    "source-controller",
                    "image-reflector-controller",
                ],
            ),
        ];
        for (running, known, want) in cases {
            assert_eq!(
                expected_controllers(&wanted, &set(running), &set(known)),
                want.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "running {running:?} known {known:?}"
            );
        }
    }

    #[test]
    fn loss_starts_at_the_deletion_timestamp_when_recent() {
        let now = Instant::now();
        let wall: jiff::Timestamp = "2026-01-01T00:00:10Z".parse().unwrap();
        let at = |s: &str| Some(s.parse::<jiff::Timestamp>().unwrap());
        assert_eq!(loss_start(now, wall, None), now);
        if let Some(earlier) = now.checked_sub(Duration::from_secs(3)) {
            assert_eq!(loss_start(now, wall, at("2026-01-01T00:00:07Z")), earlier);
        }
        // In the future (clock skew) or long ago (a stale object): not trusted.
        assert_eq!(loss_start(now, wall, at("2026-01-01T00:00:20Z")), now);
        assert_eq!(loss_start(now, wall, at("2025-12-31T00:00:00Z")), now);
    }

    #[test]
    fn over_the_configmap_limit_is_a_clear_error() {
        // Incompressible data: pseudo-random strings.
        let mut x: u64 = 1;
        let big: String = (0..2_500_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        let snap = Snapshot {
            objects: vec![json!({"kind": "ConfigMap", "data": {"x": big}})],
        };
        let e = snap.compress().unwrap_err();
        assert_eq!(e.label(), "snapshot_too_large");
        assert!(e.to_string().contains("ConfigMap limit"));
    }
}
