//! The long-running agent (`continuum-agent run`): health port, leader election,
//! and the HelmRelease recovery controller while leading.
//! The Flux guard runs beside it while leading when enabled.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use prometheus::{IntGauge, Registry};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::flux_guard;
use crate::health::{self, HealthState};
use crate::hr_recovery::controller::{self, Ctx};
use crate::hr_recovery::guardrail::Guardrail;
use crate::hr_recovery::metrics::Metrics;
use crate::hr_recovery::{self, Config};
use crate::leader::{self, LeaderConfig};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub hr: Config,
    pub health_addr: SocketAddr,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
}

/// A running agent; everything stops when dropped.
pub struct Agent {
    pub health_addr: SocketAddr,
    pub leading: watch::Receiver<bool>,
    pub guard: Arc<Mutex<Guardrail>>,
    pub registry: Registry,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Agent {
    pub async fn start(client: Client, opts: AgentOptions) -> anyhow::Result<Self> {
        Self::start_with_flux_guard(client, opts, None).await
    }

    /// [`Agent::start`], plus the Flux guard (seed 000) while leading when `flux_guard` is set.
    pub async fn start_with_flux_guard(
        client: Client,
        opts: AgentOptions,
        flux_guard: Option<flux_guard::Config>,
    ) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry)?;
        let flux_guard = match flux_guard {
            Some(cfg) => {
                let m = flux_guard::metrics::Metrics::new(&registry)?;
                let skew = Arc::new(flux_guard::skew::SkewState::new(
                    cfg.flux_release.clone(),
                    m.clone(),
                ));
                Some((cfg, m, skew))
            }
            None => None,
        };
        let fg_client = client.clone();
        let fg_identity = opts.identity.clone();
        let leader_gauge = IntGauge::new(
            "continuum_agent_leader",
            "1 while this instance holds the leader Lease",
        )?;
        registry.register(Box::new(leader_gauge.clone()))?;
        let guard = Arc::new(Mutex::new(Guardrail::new(
            opts.hr.max_actions,
            opts.hr.guardrail_window,
        )));
        let (health_addr, health_task) = health::serve(
            opts.health_addr,
            HealthState {
                registry: registry.clone(),
                guard: Some(guard.clone()),
            },
        )
        .await?;

        let (leading_rx, mut lease_rx, leader_task) = leader::elect(
            &client,
            LeaderConfig::new(
                &opts.lease_namespace,
                &opts.lease_name,
                &opts.identity,
                opts.lease_duration,
            ),
        );

        let ctx = Arc::new(Ctx::new(
            client,
            opts.hr.clone(),
            metrics.clone(),
            opts.identity.clone(),
            guard.clone(),
        ));
        let (trigger_tx, trigger_rx) = mpsc::channel::<()>(4);
        let trigger_rx = Arc::new(tokio::sync::Mutex::new(trigger_rx));

        // Guardrail acknowledgement: an annotation on the leader Lease at or after the trip.
        let ack_guard = guard.clone();
        let ack_metrics = metrics.clone();
        let ack_task = tokio::spawn(async move {
            while lease_rx.changed().await.is_ok() {
                let ack = lease_rx
                    .borrow()
                    .as_ref()
                    .and_then(|l| l.metadata.annotations.as_ref())
                    .and_then(|a| a.get(hr_recovery::ANNOTATION_GUARDRAIL_ACK))
                    .and_then(|v| hr_recovery::model::parse_time(v));
                if let Some(ack) = ack {
                    let acked = ack_guard
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .acknowledge(ack);
                    if acked {
                        ack_metrics.guardrail_tripped.set(0);
                        tracing::info!(ack = %ack, "guardrail acknowledged by operator; re-evaluating every HelmRelease");
                        let _ = trigger_tx.try_send(());
                    }
                }
            }
        });

        // Run the controllers only while leading.
        let supervisor = leader::supervise(
            leading_rx.clone(),
            leader_gauge,
            "hr-recovery controller",
            move || {
                let rx = trigger_rx.clone();
                let reconcile_all = futures::stream::unfold(rx, |rx| async move {
                    let got = rx.lock().await.recv().await;
                    got.map(|()| ((), rx))
                });
                let ctl = tokio::spawn(controller::run(ctx.clone(), reconcile_all));
                let guard_tasks = flux_guard.as_ref().map(|(cfg, m, skew)| {
                    flux_guard::spawn(
                        fg_client.clone(),
                        cfg.clone(),
                        m.clone(),
                        skew.clone(),
                        fg_identity.clone(),
                    )
                });
                (ctl, guard_tasks)
            },
            |(ctl, guard_tasks)| async move {
                ctl.abort();
                drop(guard_tasks);
            },
        );
        Ok(Self {
            health_addr,
            leading: leading_rx,
            guard,
            registry,
            tasks: vec![health_task, leader_task, ack_task, supervisor],
        })
    }
}
