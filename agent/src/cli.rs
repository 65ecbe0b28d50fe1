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

/// `continuum-agent run`: controllers, leader election, health port.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub hr: HrArgs,
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
        let agent = Agent::start(client, opts).await?;
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
