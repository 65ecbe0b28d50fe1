//! `continuum-agent node-pivot`: the DaemonSet-mode entry point.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::controller::{NodePivot, NodePivotOptions};
use super::Paths;
use crate::cli::KubeArgs;

/// `continuum-agent node-pivot`: keep this node's k3s registries.yaml at the
/// version named by the cutover status ConfigMap.
#[derive(Debug, Clone, clap::Args)]
pub struct NodePivotArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// This node's name (downward API `spec.nodeName`).
    #[arg(long, env = "CONTINUUM_NODE_NAME")]
    pub node_name: String,
    /// Namespace of the cutover status ConfigMap (and of the per-node report ConfigMap).
    #[arg(
        long,
        env = "CONTINUUM_PIVOT_NAMESPACE",
        default_value = "catalyst-system"
    )]
    pub status_namespace: String,
    /// Cutover status ConfigMap watched for the flip (seed 002).
    #[arg(long, env = "CONTINUUM_PIVOT_CONFIGMAP", default_value = super::DEFAULT_STATUS_CONFIGMAP)]
    pub status_configmap: String,
    /// Key in the status ConfigMap: `v1`, `v2`, or empty (cutover not started).
    #[arg(long, env = "CONTINUUM_PIVOT_KEY", default_value = super::DEFAULT_STATUS_KEY)]
    pub status_key: String,
    /// ConfigMap (same namespace) where every node reports its state under its node name.
    #[arg(
        long,
        env = "CONTINUUM_PIVOT_REPORT_CONFIGMAP",
        default_value = "continuum-node-pivot-status"
    )]
    pub report_configmap: String,
    /// The k3s registries file (hostPath mount). Backup: `<file>.bak`; pre-pivot snapshot: `<file>.continuum-v1`.
    #[arg(
        long,
        env = "CONTINUUM_REGISTRIES_FILE",
        default_value = "/etc/rancher/k3s/registries.yaml"
    )]
    pub registries_file: PathBuf,
    /// Declared mirror map (YAML or JSON) rendered as v2.
    #[arg(
        long,
        env = "CONTINUUM_MIRROR_MAP",
        default_value = "/etc/continuum/pivot/mirror-map.yaml"
    )]
    pub mirror_map: PathBuf,
    /// Mounted Secret directory with the registry credentials named by the mirror map.
    #[arg(long, env = "CONTINUUM_REGISTRY_SECRET_DIR")]
    pub secret_dir: Option<PathBuf>,
    /// Declared v1 registries.yaml; default: the snapshot taken before the first v2 write.
    #[arg(long, env = "CONTINUUM_V1_FILE")]
    pub v1_file: Option<PathBuf>,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "CONTINUUM_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
}

impl NodePivotArgs {
    pub fn options(&self) -> NodePivotOptions {
        NodePivotOptions {
            namespace: self.status_namespace.clone(),
            configmap: self.status_configmap.clone(),
            key: self.status_key.clone(),
            report_configmap: self.report_configmap.clone(),
            node_name: self.node_name.clone(),
            paths: Paths {
                target: self.registries_file.clone(),
                v1_file: self.v1_file.clone(),
            },
            mirror_map: self.mirror_map.clone(),
            secret_dir: self.secret_dir.clone(),
            health_addr: self.health_addr,
        }
    }
}

pub fn run(args: NodePivotArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let client = args.kube.client().await?;
            let np = NodePivot::start(client, args.options()).await?;
            tracing::info!(health = %np.health_addr, node = %args.node_name, "node-pivot running");
            tokio::signal::ctrl_c().await?;
            drop(np);
            Ok(())
        })
}
