//! Flux guard (seed 000): keep a chart from breaking the CRDs Flux stores its
//! objects in, and bring Flux back if its controllers are deleted anyway.
//!
//! * Pre-flight guard ([`guard`]): every HelmRelease chart revision not checked yet
//!   is fetched from its source artifact ([`source`], [`fetch`]), its CRDs are
//!   extracted ([`chart`]) and compared with the live CRDs by the pure
//!   [`decide`]; a violation suspends the HelmRelease with an Event, an
//!   annotation and a metric. An operator override annotation lets a reviewed
//!   revision through.
//! * Flux controller loss ([`snapshot`]): while the Flux controllers are
//!   available their manifests are kept in a ConfigMap the agent owns; when they
//!   disappear the snapshot is re-applied with server-side apply.
//! * Version skew ([`skew`]): running Flux version against the one the Flux
//!   HelmRelease would install.

pub mod chart;
pub mod crd;
pub mod decide;
pub mod fetch;
pub mod guard;
pub mod metrics;
pub mod release;
pub mod skew;
pub mod snapshot;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::task::JoinHandle;

/// Operator override: a HelmRelease chart revision (or `revision@digest`) reviewed by a human.
pub const ANNOTATION_OVERRIDE: &str = "dr.openova.io/flux-guard-override";
/// The last chart revision the guard checked and let through (`revision@digest`).
pub const ANNOTATION_CHECKED: &str = "dr.openova.io/flux-guard-checked";
/// `templates/` CRD names of the last checked revision (comma separated): Helm
/// deletes those a later revision drops.
pub const ANNOTATION_CRDS: &str = "dr.openova.io/flux-guard-crds";
/// Set while the guard holds the HelmRelease suspended: the blocked revision.
pub const ANNOTATION_BLOCKED: &str = "dr.openova.io/flux-guard-blocked";
/// Why the revision is blocked (human readable, the Event's text).
pub const ANNOTATION_BLOCKED_REASON: &str = "dr.openova.io/flux-guard-blocked-reason";
/// Field manager of every write.
pub const FIELD_MANAGER: &str = "continuum-flux-guard";
/// Shown in every block: how to make a storage version change safe.
pub const SAFE_PROCEDURE: &str = "safe procedure: keep the stored versions served and migrate storage first (re-write every object so it is stored in the new storage version, e.g. kubectl get <kind> -A -o json | kubectl replace -f -), then patch the CRD's status.storedVersions to the new storage version only (kubectl patch crd <name> --subresource=status --type=merge -p '{\"status\":{\"storedVersions\":[\"<new>\"]}}'), then retry; or, once reviewed, annotate the HelmRelease with dr.openova.io/flux-guard-override=<revision>";

/// Tunables of the Flux guard.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespace of the Flux controllers.
    pub flux_namespace: String,
    /// Deployments that make Flux healthy; their loss triggers a restore. Those
    /// never seen running (optional image automation) are not expected.
    pub controllers: Vec<String>,
    /// `namespace/name` of the HelmRelease that installs Flux (version skew).
    pub flux_release: String,
    /// Where the snapshot ConfigMap lives.
    pub snapshot_namespace: String,
    pub snapshot_name: String,
    /// Largest chart artifact fetched, in bytes.
    pub max_chart_bytes: u64,
    /// Whole-request timeout of an artifact fetch.
    pub fetch_timeout: Duration,
    /// Re-take the snapshot at least this often while Flux is healthy.
    pub resnapshot_interval: Duration,
    /// Run the pre-flight guard.
    pub preflight: bool,
    /// Snapshot and restore the Flux controllers.
    pub restore: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            flux_namespace: "flux-system".into(),
            controllers: [
                "helm-controller",
                "source-controller",
                "kustomize-controller",
                "notification-controller",
                "image-reflector-controller",
                "image-automation-controller",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            flux_release: "flux-system/bp-flux".into(),
            snapshot_namespace: "continuum-system".into(),
            snapshot_name: "continuum-flux-snapshot".into(),
            max_chart_bytes: 20 * 1024 * 1024,
            fetch_timeout: Duration::from_secs(30),
            resnapshot_interval: Duration::from_secs(600),
            preflight: true,
            restore: true,
        }
    }
}

/// The running Flux guard tasks; they stop when this is dropped (losing leadership).
pub struct Running {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Start the enabled parts of the guard. `instance` names this agent in Events.
pub fn spawn(
    client: Client,
    cfg: Config,
    metrics: metrics::Metrics,
    skew: Arc<skew::SkewState>,
    instance: String,
) -> Running {
    let mut tasks = Vec::new();
    if cfg.preflight {
        let ctx = Arc::new(guard::Ctx::new(
            client.clone(),
            cfg.clone(),
            metrics.clone(),
            skew.clone(),
            instance.clone(),
        ));
        tasks.push(tokio::spawn(guard::run(ctx)));
    }
    if cfg.restore {
        let keeper = snapshot::Keeper::new(client, cfg, metrics, skew, instance);
        tasks.push(tokio::spawn(keeper.run()));
    }
    Running { tasks }
}
