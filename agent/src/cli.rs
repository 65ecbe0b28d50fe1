//! Command-line arguments and entry points of the Kubernetes subcommands.

use std::net::SocketAddr;
use std::time::Duration;

use crate::agent::{Agent, AgentOptions};
use crate::hr_recovery::{
    self, controller::Ctx, goduration, guardrail::Guardrail, metrics::Metrics, Config,
};

fn parse_duration(s: &str) -> Result<Duration, String> {
    goduration::parse(s)
        .ok_or_else(|| format!("invalid duration {s:?} (Go syntax: 300ms, 5s, 5m, 1h30m)"))
}

/// How to reach the Kubernetes API.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// API server URL (e.g. the test API server's http://127.0.0.1:PORT). Default: in-cluster config or kubeconfig.
    #[arg(long, env = "CONTINUUM_KUBE_URL")]
    pub kube_url: Option<String>,
    /// Bearer token sent with --kube-url.
    #[arg(long, env = "CONTINUUM_KUBE_TOKEN")]
    pub kube_token: Option<String>,
}

impl KubeArgs {
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        match &self.kube_url {
            None => Ok(kube::Client::try_default().await?),
            Some(url) => {
                let mut cfg = kube::Config::new(url.parse()?);
                cfg.read_timeout = None;
                if let Some(t) = &self.kube_token {
                    cfg.headers.push((
                        http::header::AUTHORIZATION,
                        http::HeaderValue::from_str(&format!("Bearer {t}"))?,
                    ));
                }
                Ok(kube::Client::try_from(cfg)?)
            }
        }
    }
}

/// Stuck HelmRelease recovery tunables.
#[derive(Debug, Clone, clap::Args)]
pub struct HrArgs {
    /// How long a stuck condition must hold before acting (Go duration).
    #[arg(long = "hr-threshold", env = "CONTINUUM_HR_THRESHOLD", default_value = "5m", value_parser = parse_duration)]
    pub threshold: Duration,
    /// Guardrail: more than this many recoveries in one pass stops acting and alerts.
    #[arg(
        long = "hr-max-actions",
        env = "CONTINUUM_HR_MAX_ACTIONS",
        default_value_t = 10
    )]
    pub max_actions: usize,
    /// Controller mode: length of one guardrail pass (Go duration).
    #[arg(long = "hr-guardrail-window", env = "CONTINUUM_HR_GUARDRAIL_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub guardrail_window: Duration,
}

impl HrArgs {
    pub fn config(&self, dry_run: bool) -> Config {
        Config {
            threshold: self.threshold,
            max_actions: self.max_actions,
            guardrail_window: self.guardrail_window,
            dry_run,
        }
    }
}

/// Flux guard (seed 000): CRD storedVersions pre-flight check, Flux controller
/// snapshot/restore, Flux version skew. Runs while leading.
#[derive(Debug, Clone, clap::Args)]
pub struct FluxGuardArgs {
    /// Turn the whole Flux guard off.
    #[arg(long, env = "CONTINUUM_FLUX_GUARD_DISABLED")]
    pub flux_guard_disabled: bool,
    /// Turn off only the pre-flight CRD check of HelmRelease chart revisions.
    #[arg(long, env = "CONTINUUM_FLUX_GUARD_NO_PREFLIGHT")]
    pub flux_guard_no_preflight: bool,
    /// Turn off only the Flux controller snapshot and restore.
    #[arg(long, env = "CONTINUUM_FLUX_GUARD_NO_RESTORE")]
    pub flux_guard_no_restore: bool,
    /// Namespace of the Flux controllers.
    #[arg(long, env = "CONTINUUM_FLUX_NAMESPACE", default_value = "flux-system")]
    pub flux_namespace: String,
    /// Flux controller Deployments (comma separated) that must be available once seen; their loss triggers a restore.
    /// Ones never running here (image automation is optional) are not a loss.
    #[arg(
        long,
        env = "CONTINUUM_FLUX_CONTROLLERS",
        value_delimiter = ',',
        default_value = "helm-controller,source-controller,kustomize-controller,notification-controller,image-reflector-controller,image-automation-controller"
    )]
    pub flux_controllers: Vec<String>,
    /// The HelmRelease (namespace/name) that installs Flux, for the version-skew check.
    #[arg(
        long,
        env = "CONTINUUM_FLUX_RELEASE",
        default_value = "flux-system/bp-flux"
    )]
    pub flux_release: String,
    /// Namespace of the ConfigMap holding the Flux snapshot.
    #[arg(
        long,
        env = "CONTINUUM_FLUX_SNAPSHOT_NAMESPACE",
        default_value = "continuum-system"
    )]
    pub flux_snapshot_namespace: String,
    /// Name of the ConfigMap holding the Flux snapshot.
    #[arg(
        long,
        env = "CONTINUUM_FLUX_SNAPSHOT_NAME",
        default_value = "continuum-flux-snapshot"
    )]
    pub flux_snapshot_name: String,
    /// Largest chart artifact downloaded, in bytes.
    #[arg(
        long,
        env = "CONTINUUM_FLUX_GUARD_MAX_CHART_BYTES",
        default_value_t = 20 * 1024 * 1024
    )]
    pub flux_guard_max_chart_bytes: u64,
    /// Timeout of one chart artifact download (Go duration).
    #[arg(long, env = "CONTINUUM_FLUX_GUARD_FETCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub flux_guard_fetch_timeout: Duration,
    /// Re-take the Flux snapshot at least this often while Flux is healthy (Go duration).
    #[arg(long, env = "CONTINUUM_FLUX_SNAPSHOT_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub flux_snapshot_interval: Duration,
}

impl FluxGuardArgs {
    /// The guard's configuration, `None` when disabled.
    pub fn config(&self) -> Option<crate::flux_guard::Config> {
        if self.flux_guard_disabled || (self.flux_guard_no_preflight && self.flux_guard_no_restore)
        {
            return None;
        }
        Some(crate::flux_guard::Config {
            flux_namespace: self.flux_namespace.clone(),
            controllers: self
                .flux_controllers
                .iter()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            flux_release: self.flux_release.clone(),
            snapshot_namespace: self.flux_snapshot_namespace.clone(),
            snapshot_name: self.flux_snapshot_name.clone(),
            max_chart_bytes: self.flux_guard_max_chart_bytes,
            fetch_timeout: self.flux_guard_fetch_timeout,
            resnapshot_interval: self.flux_snapshot_interval,
            preflight: !self.flux_guard_no_preflight,
            restore: !self.flux_guard_no_restore,
        })
    }
}

/// `continuum-agent run`: controllers, leader election, health port.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub hr: HrArgs,
    #[command(flatten)]
    pub flux_guard: FluxGuardArgs,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "CONTINUUM_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "CONTINUUM_LEASE_NAMESPACE",
        default_value = "continuum-system"
    )]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "CONTINUUM_LEASE_NAME", default_value = "continuum-agent")]
    pub lease_name: String,
    /// This instance's identity in the Lease (default: $POD_NAME, else the hostname).
    #[arg(long, env = "CONTINUUM_IDENTITY")]
    pub identity: Option<String>,
    /// Leader Lease duration (Go duration).
    #[arg(long, env = "CONTINUUM_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
}

/// `continuum-agent hr-recovery --once [--dry-run]`.
#[derive(Debug, Clone, clap::Args)]
pub struct HrRecoveryArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub hr: HrArgs,
    /// Run one pass and exit (exit status 1 if the guardrail tripped or an action failed).
    #[arg(long, required = true)]
    pub once: bool,
    /// Print what would be done without writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("continuum-agent-{}", std::process::id()))
}

/// One thread: the controllers are I/O-bound (2,000 HelmReleases sync in a few
/// hundred ms), and a single thread keeps one malloc arena, which matters for the
/// agent's 30 MB memory budget.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let client = args.kube.client().await?;
        let opts = AgentOptions {
            hr: args.hr.config(false),
            health_addr: args.health_addr,
            lease_namespace: args.lease_namespace,
            lease_name: args.lease_name,
            identity: args.identity.unwrap_or_else(default_identity),
            lease_duration: args.lease_duration,
        };
        let agent = Agent::start_with_flux_guard(client, opts, args.flux_guard.config()).await?;
        tracing::info!(health = %agent.health_addr, "continuum-agent running");
        tokio::signal::ctrl_c().await?;
        drop(agent);
        Ok(())
    })
}

pub fn hr_recovery(args: HrRecoveryArgs) -> anyhow::Result<()> {
    let code = runtime()?.block_on(async move {
        let client = args.kube.client().await?;
        let mut cfg = args.hr.config(args.dry_run);
        // One pass: the window never rolls over.
        cfg.guardrail_window = Duration::from_secs(u64::MAX / 4);
        let metrics = Metrics::new(&prometheus::Registry::new())?;
        let guard = std::sync::Arc::new(std::sync::Mutex::new(Guardrail::new(
            cfg.max_actions,
            cfg.guardrail_window,
        )));
        let ctx = Ctx::new(client, cfg, metrics, default_identity(), guard);
        let report = hr_recovery::pass::run_once(&ctx).await?;
        for l in &report.lines {
            println!("{l}");
        }
        let verb = if args.dry_run {
            "would recover"
        } else {
            "recovered"
        };
        println!(
            "{verb} {} HelmRelease(s), {} error(s), guardrail {}",
            report.acted,
            report.errors,
            if report.guardrail_tripped {
                "TRIPPED"
            } else {
                "ok"
            }
        );
        anyhow::Ok(if report.guardrail_tripped || report.errors > 0 {
            1
        } else {
            0
        })
    })?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Once {
        #[command(flatten)]
        a: HrRecoveryArgs,
    }

    #[derive(Parser)]
    struct Fg {
        #[command(flatten)]
        a: FluxGuardArgs,
    }

    #[test]
    fn flux_guard_flags() {
        let d = Fg::try_parse_from(["x"]).unwrap().a.config().unwrap();
        let want = crate::flux_guard::Config::default();
        assert_eq!(d.controllers, want.controllers);
        // Image automation is part of Flux's default install: its loss is a loss too.
        for c in ["image-reflector-controller", "image-automation-controller"] {
            assert!(d.controllers.iter().any(|x| x == c), "{c} in the defaults");
        }
        assert_eq!(
            (d.flux_release.as_str(), d.max_chart_bytes, d.fetch_timeout),
            (
                "flux-system/bp-flux",
                want.max_chart_bytes,
                want.fetch_timeout
            )
        );
        assert!(d.preflight && d.restore);
        let p = Fg::try_parse_from([
            "x",
            "--flux-controllers",
            "helm-controller, source-controller",
            "--flux-guard-no-restore",
            "--flux-guard-fetch-timeout",
            "5s",
        ])
        .unwrap()
        .a
        .config()
        .unwrap();
        assert_eq!(p.controllers, ["helm-controller", "source-controller"]);
        assert!(p.preflight && !p.restore);
        assert_eq!(p.fetch_timeout, Duration::from_secs(5));
        assert!(Fg::try_parse_from(["x", "--flux-guard-disabled"])
            .unwrap()
            .a
            .config()
            .is_none());
        assert!(Fg::try_parse_from(["x", "--flux-guard-fetch-timeout", "5"]).is_err());
    }

    #[test]
    fn once_flags() {
        let p = Once::try_parse_from([
            "x",
            "--once",
            "--dry-run",
            "--hr-threshold",
            "90s",
            "--hr-max-actions",
            "3",
        ])
        .unwrap();
        assert!(p.a.once && p.a.dry_run);
        assert_eq!(p.a.hr.threshold, Duration::from_secs(90));
        assert_eq!(p.a.hr.max_actions, 3);
        assert!(Once::try_parse_from(["x"]).is_err(), "--once is required");
        assert!(
            Once::try_parse_from(["x", "--once", "--hr-threshold", "5"]).is_err(),
            "unitless duration"
        );
    }
}
