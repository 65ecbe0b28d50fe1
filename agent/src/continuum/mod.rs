//! Kubernetes side of failover: the `Continuum` custom resource, the
//! CloudNativePG back-end and the controller that drives it
//! (`continuum-agent continuum`), leader-elected like the other
//! Deployment-mode controllers.

pub mod cnpg;
pub mod controller;
pub mod crd;
pub mod database;
pub mod dbfacts;
pub mod switchover;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use continuum_shared::lease::HolderId;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use prometheus::{IntGauge, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::health::{self, HealthState};
use crate::leader::{self, LeaderConfig};
use controller::{ControllerConfig, Ctx, Metrics};

/// `continuum-agent continuum`: fail CNPG Clusters over between regions as
/// the `Continuum` resources of this cluster describe.
#[derive(Debug, Clone, clap::Args)]
pub struct ContinuumArgs {
    /// This region's id: one of each Continuum's `spec.regions[].name`.
    #[arg(long, env = "CONTINUUM_REGION")]
    pub region: String,
    /// Decision period per Continuum, milliseconds.
    #[arg(long, env = "CONTINUUM_TICK_MS", default_value_t = 100)]
    pub tick_ms: u64,
    /// Largest clock-rate difference to any witness (fraction).
    #[arg(long, env = "CONTINUUM_MAX_DRIFT", default_value_t = 0.01)]
    pub max_drift: f64,
    /// Safety margin subtracted from every lease deadline, milliseconds.
    #[arg(long, env = "CONTINUUM_MARGIN_MS", default_value_t = 200)]
    pub margin_ms: u64,
    /// How often a steady primary re-records its lease metadata (confirmed
    /// LSN) at the witnesses, milliseconds; only for Continuums whose
    /// region names a `connectionSecretRef`.
    #[arg(long, env = "CONTINUUM_META_REFRESH_MS", default_value_t = continuum_shared::failover::META_REFRESH.as_millis() as u64)]
    pub meta_refresh_ms: u64,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "CONTINUUM_LEASE_NAMESPACE",
        default_value = "continuum-system"
    )]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "CONTINUUM_LEADER_LEASE",
        default_value = "continuum-failover"
    )]
    pub leader_lease: String,
    /// Leader-election identity (defaults to the pod name from HOSTNAME).
    #[arg(long, env = "CONTINUUM_IDENTITY")]
    pub identity: Option<String>,
    /// Leader Lease duration, seconds. Keep it below the Continuums' TTL: if
    /// the leading pod dies without SIGTERM, its witness leases run out after
    /// one TTL, and a replica that is not leading by then lets the other
    /// region promote. (On SIGTERM the leader releases the Lease: the
    /// replica takes over at its next attempt, about a fifth of this.)
    #[arg(long, env = "CONTINUUM_LEADER_LEASE_SECONDS", default_value_t = 4)]
    pub leader_lease_seconds: u64,
    /// Plain HTTP port for /metrics, /healthz, /readyz.
    #[arg(long, env = "CONTINUUM_HEALTH_LISTEN", default_value = "0.0.0.0:9465")]
    pub health_listen: SocketAddr,
}

/// Options of a running Continuum controller (tests build these directly).
#[derive(Debug, Clone)]
pub struct Options {
    pub controller: ControllerConfig,
    pub health_addr: SocketAddr,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
}

/// A running controller with its health port and leader election; every
/// task stops when dropped (the fence guards of held leases excepted: they
/// fence at the last deadline unless another agent of this region adopts
/// the grant first). [`ContinuumAgent::shutdown`] stops it gracefully.
pub struct ContinuumAgent {
    pub health_addr: SocketAddr,
    pub leading: watch::Receiver<bool>,
    pub registry: Registry,
    ctx: Arc<Ctx>,
    leases: Api<Lease>,
    leader_cfg: LeaderConfig,
    health_task: Option<JoinHandle<()>>,
    leader_task: Option<JoinHandle<()>>,
    supervisor: Option<JoinHandle<()>>,
}

impl Drop for ContinuumAgent {
    fn drop(&mut self) {
        for t in [&self.health_task, &self.leader_task, &self.supervisor]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

impl ContinuumAgent {
    pub async fn start(client: Client, opts: Options) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry)?;
        let leader_gauge = IntGauge::new(
            "continuum_failover_controller_leader",
            "1 while this instance holds the failover controller's leader Lease",
        )?;
        registry.register(Box::new(leader_gauge.clone()))?;
        let (health_addr, health_task) = health::serve(
            opts.health_addr,
            HealthState::without_guardrail(registry.clone()),
        )
        .await?;
        let leader_cfg = LeaderConfig::new(
            &opts.lease_namespace,
            &opts.lease_name,
            &opts.identity,
            opts.lease_duration,
        );
        let leases: Api<Lease> = Api::namespaced(client.clone(), &opts.lease_namespace);
        let (leading_rx, _lease_rx, leader_task) = leader::elect(&client, leader_cfg.clone());
        let ctx = Arc::new(Ctx::new(client, opts.controller.clone(), metrics));
        let start_ctx = ctx.clone();
        let stop_ctx = ctx.clone();
        let supervisor = leader::supervise(
            leading_rx.clone(),
            leader_gauge,
            "Continuum controller",
            move || tokio::spawn(controller::run(start_ctx.clone())),
            move |ctl| {
                let ctx = stop_ctx.clone();
                async move {
                    ctl.abort();
                    // Its reconciles are gone once the task is: no runner
                    // is left in use when they are dropped below.
                    let _ = ctl.await;
                    // Stop renewing: the next leader must not find this
                    // instance still holding leases it no longer watches.
                    ctx.stop_all().await;
                }
            },
        );
        Ok(Self {
            health_addr,
            leading: leading_rx,
            registry,
            ctx,
            leases,
            leader_cfg,
            health_task: Some(health_task),
            leader_task: Some(leader_task),
            supervisor: Some(supervisor),
        })
    }

    /// Graceful stop (SIGTERM): stop campaigning, stop the controller (every
    /// runner is dropped, so each held lease's fence guard starts watching
    /// for a successor), release the leader Lease if this instance holds it
    /// (the other replica takes over at its next attempt, about a fifth of
    /// the leader Lease, and adopts the live grants), then wait for every
    /// fence guard to end: stood down because the new leader adopted and
    /// recorded, or fenced at its last deadline (invariant 2 either way).
    /// Takes at most about one Continuum TTL after the controller stopped.
    pub async fn shutdown(mut self) {
        let identity = self.leader_cfg.identity.clone();
        tracing::info!(%identity, reason = "shutdown requested", "stopping the Continuum controller");
        if let Some(t) = self.leader_task.take() {
            t.abort();
            let _ = t.await;
        }
        // The election ended: the supervisor stops the controller and returns.
        if let Some(t) = self.supervisor.take() {
            let _ = t.await;
        }
        match leader::release(&self.leases, &self.leader_cfg).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(%identity, reason = "not the holder", "leader Lease left as it is")
            }
            Err(e) => {
                tracing::warn!(%identity, error = %e, "could not release the leader Lease: the other replica takes over when it expires")
            }
        }
        self.ctx.wait_for_guards().await;
        if let Some(t) = self.health_task.take() {
            t.abort();
        }
        tracing::info!(%identity, reason = "every held lease was handed over or fenced", "Continuum controller stopped");
    }
}

/// Entry point of `continuum-agent continuum`.
pub fn run(args: ContinuumArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let region = HolderId::new(args.region.clone()).context("--region")?;
        let identity = args
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("continuum-{region}"));
        let client = Client::try_default()
            .await
            .context("Kubernetes client")?;
        let opts = Options {
            controller: ControllerConfig {
                region,
                tick: Duration::from_millis(args.tick_ms.max(10)),
                max_drift: args.max_drift,
                margin: Duration::from_millis(args.margin_ms),
                instance: identity.clone(),
                meta_refresh: Duration::from_millis(args.meta_refresh_ms.max(100)),
            },
            health_addr: args.health_listen,
            lease_namespace: args.lease_namespace.clone(),
            lease_name: args.leader_lease.clone(),
            identity,
            lease_duration: Duration::from_secs(args.leader_lease_seconds.max(2)),
        };
        let agent = ContinuumAgent::start(client, opts).await?;
        tracing::info!(health = %agent.health_addr, region = %args.region, "Continuum controller running");
        // Kubernetes stops a pod with SIGTERM (then SIGKILL after
        // terminationGracePeriodSeconds); a terminal sends SIGINT.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        let signal = tokio::select! {
            _ = term.recv() => "SIGTERM",
            r = tokio::signal::ctrl_c() => {
                r.context("SIGINT handler")?;
                "SIGINT"
            }
        };
        tracing::info!(signal, reason = "graceful shutdown: release leadership, hand held leases over or fence them", "signal received");
        agent.shutdown().await;
        Ok(())
    })
}

/// Entry point of `continuum-agent crds`.
pub fn print_crds() -> anyhow::Result<()> {
    print!("{}", crd::crd_yaml().context("serialize CRD")?);
    Ok(())
}
