//! `continuum-agent pivot ...` subcommands.

use super::git::{self, GitPivotArgs};
use crate::cli::KubeArgs;

/// `continuum-agent pivot <subcommand>`.
#[derive(Debug, Clone, clap::Args)]
pub struct PivotArgs {
    #[command(subcommand)]
    pub command: PivotCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PivotCommand {
    /// Rewrite Flux source URLs in Git (clone, edit, commit, push), then ask Flux
    /// to reconcile the GitRepository. Git first, so the cluster never reverts it.
    Sources(SourcesArgs),
    /// Watch HelmRepository/OCIRepository/GitRepository objects and report URLs outside the
    /// Sovereign and pivots that reverted (metrics and the JSON `/status` on --health-addr).
    WatchSources(WatchSourcesArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct WatchSourcesArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Hosts inside the Sovereign (comma-separated): `harbor.x.y` exact, `.x.y` any subdomain.
    #[arg(
        long,
        env = "CONTINUUM_LOCAL_HOSTS",
        value_delimiter = ',',
        required = true
    )]
    pub local_hosts: Vec<String>,
    /// Address of /metrics, /healthz, /readyz and /status (JSON: sources
    /// outside the Sovereign, pivots that reverted).
    #[arg(long, env = "CONTINUUM_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: std::net::SocketAddr,
    /// Instance name in Events (default: $POD_NAME).
    #[arg(long, env = "POD_NAME", default_value = "continuum-agent")]
    pub instance: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SourcesArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Git remote holding the declarations (e.g. the local Gitea repository).
    #[arg(long = "git", env = "CONTINUUM_PIVOT_GIT")]
    pub remote: String,
    /// Branch to rewrite and push.
    #[arg(long, env = "CONTINUUM_PIVOT_BRANCH", default_value = "main")]
    pub branch: String,
    /// Directory in the repository whose *.yaml/*.yml declarations are rewritten.
    #[arg(
        long,
        env = "CONTINUUM_PIVOT_PATH",
        default_value = "clusters/_template/bootstrap-kit"
    )]
    pub path: String,
    /// URL prefix to replace (e.g. oci://ghcr.io/openova-io).
    #[arg(long, env = "CONTINUUM_PIVOT_FROM")]
    pub from: String,
    /// Replacement prefix (e.g. oci://harbor.<fqdn>/openova-io).
    #[arg(long, env = "CONTINUUM_PIVOT_TO")]
    pub to: String,
    /// Print the diff and the commit message; commit, push and annotate nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// GitRepository (namespace/name) to annotate with reconcile.fluxcd.io/requestedAt after the push.
    #[arg(
        long,
        env = "CONTINUUM_PIVOT_GITREPOSITORY",
        default_value = "flux-system/openova"
    )]
    pub gitrepository: String,
    /// Skip the reconcile request (e.g. no cluster access from where this runs).
    #[arg(long)]
    pub no_reconcile: bool,
    /// Commit author name.
    #[arg(
        long,
        env = "CONTINUUM_PIVOT_AUTHOR_NAME",
        default_value = "continuum-agent"
    )]
    pub author_name: String,
    /// Commit author email.
    #[arg(
        long,
        env = "CONTINUUM_PIVOT_AUTHOR_EMAIL",
        default_value = "continuum-agent@openova.io"
    )]
    pub author_email: String,
}

pub fn run(args: PivotArgs) -> anyhow::Result<()> {
    match args.command {
        PivotCommand::Sources(a) => sources(a),
        PivotCommand::WatchSources(a) => watch_sources(a),
    }
}

fn sources(a: SourcesArgs) -> anyhow::Result<()> {
    let (ns, name) = a
        .gitrepository
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--gitrepository must be namespace/name"))?;
    let report = git::pivot(&GitPivotArgs {
        remote: a.remote.clone(),
        branch: a.branch.clone(),
        path: a.path.clone(),
        from: a.from.clone(),
        to: a.to.clone(),
        dry_run: a.dry_run,
        author_name: a.author_name.clone(),
        author_email: a.author_email.clone(),
    })
    .map_err(|e| {
        tracing::error!(error = %e, label = e.label(), "pivot sources failed: nothing pushed");
        anyhow::anyhow!("{} ({})", e, e.label())
    })?;
    if a.dry_run {
        print!("{}", report.diff);
        println!(
            "--- commit message (not committed: --dry-run) ---\n{}",
            report.message
        );
        return Ok(());
    }
    let commit = report.commit.clone().unwrap_or_default();
    tracing::info!(remote = %a.remote, branch = %a.branch, commit = %commit, rewrites = report.rewrites, files = report.files.len(), reason = "pivot declarations in Git first", "pushed source pivot");
    println!(
        "pushed {commit} to {} {}: {} rewrite(s) in {} file(s)",
        a.remote,
        a.branch,
        report.rewrites,
        report.files.len()
    );
    if a.no_reconcile {
        return Ok(());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = a.kube.client().await?;
            let at = jiff::Timestamp::now().to_string();
            git::request_reconcile(client, ns, name, &at).await?;
            tracing::info!(gitrepository = %a.gitrepository, requested_at = %at, "requested Flux reconcile");
            println!("requested reconcile of GitRepository {}", a.gitrepository);
            anyhow::Ok(())
        })
}

fn watch_sources(a: WatchSourcesArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let client = a.kube.client().await?;
            let registry = prometheus::Registry::new();
            let metrics = super::watch::Metrics::new(&registry)?;
            let watch = super::watch::SourceWatch::start(
                client,
                super::LocalHosts(a.local_hosts.clone()),
                metrics,
                a.instance.clone(),
            );
            let (health, health_task) = crate::health::serve_with_status(
                a.health_addr,
                crate::health::HealthState::without_guardrail(registry),
                Some(super::watch::status_provider(&watch)),
            )
            .await?;
            tracing::info!(health = %health, "source pivot watcher running");
            tokio::signal::ctrl_c().await?;
            health_task.abort();
            drop(watch);
            anyhow::Ok(())
        })
}
