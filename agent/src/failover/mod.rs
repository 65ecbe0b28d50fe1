//! Failover runner, direct PostgreSQL back-end (the region-kill drill and
//! non-CNPG deployments): observe -> decide -> apply, once per tick.
//!
//! The decision is [`continuum_shared::failover::decide`]; this module only
//! observes (lease, majority view, database) and applies the one action it
//! returns. Two things run beside the loop so that a slow database call can
//! never stretch the time this region acts as primary (invariant 2):
//!
//! * a renewer task per grant, renewing about every TTL/3 until its
//!   conservative deadline;
//! * a fence guard that fences the database the instant the deadline passes
//!   without a renewal, whatever the loop is doing.

mod link;
mod observe;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use continuum_shared::failover::{self, Action, DbState, Held, Mode, Observation, SyncPolicy};
use continuum_shared::lease::{HolderId, LeaseMeta, LeaseName};
use continuum_shared::pg::backend as pg;
use continuum_shared::quorum::{Grant, QuorumClient, QuorumConfig};
use continuum_shared::transport::https::{HttpsTransport, TlsMaterial};
use continuum_shared::transport::LeaseTransport;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, Instant};

/// `continuum-agent failover`: keep this region's database primary while it
/// holds the lease, fence it the instant it does not, promote the standby
/// when the primary's region is gone.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// This region's holder id (a DNS label; the standby's application_name).
    #[arg(long, env = "CONTINUUM_REGION")]
    pub region: String,
    /// The other region's holder id.
    #[arg(long, env = "CONTINUUM_PEER_REGION")]
    pub peer: String,
    /// Lease name at the witnesses, e.g. `continuum/db/app`.
    #[arg(long, env = "CONTINUUM_LEASE", default_value = "continuum/default/db")]
    pub lease: String,
    /// Witness HTTPS URL; repeat (or comma-separate) for several. A majority
    /// must agree for any lease decision.
    #[arg(
        long = "witness",
        env = "CONTINUUM_WITNESSES",
        value_delimiter = ',',
        required_unless_present = "witness_link_peers"
    )]
    pub witnesses: Vec<String>,
    /// YAML link config (key file, UDP listen address, virtual IP, peers) of
    /// the WireGuard control link: reach the `--witness-link-peer` witnesses
    /// over it, and serve region health of every link peer as `/status` JSON
    /// and metrics on the health port. See docs/control-link.md.
    #[arg(long, env = "CONTINUUM_WITNESS_LINK_CONFIG")]
    pub witness_link_config: Option<PathBuf>,
    /// Name (in `--witness-link-config`) of a witness to reach over the link;
    /// repeat (or comma-separate) for several. Counts toward the majority
    /// like a `--witness` URL.
    #[arg(
        long = "witness-link-peer",
        env = "CONTINUUM_WITNESS_LINK_PEERS",
        value_delimiter = ',',
        requires = "witness_link_config"
    )]
    pub witness_link_peers: Vec<String>,
    /// CA that signed the witnesses' server certificates.
    #[arg(long, env = "CONTINUUM_TLS_CA")]
    pub tls_ca: PathBuf,
    /// This agent's client certificate (PEM).
    #[arg(long, env = "CONTINUUM_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// This agent's client key (PEM).
    #[arg(long, env = "CONTINUUM_TLS_KEY")]
    pub tls_key: PathBuf,
    /// libpq connection string of this region's database (superuser).
    #[arg(long, env = "CONTINUUM_PG_CONNINFO")]
    pub pg_conninfo: String,
    /// Lease TTL in milliseconds. Failover takes at least this long.
    #[arg(long, env = "CONTINUUM_TTL_MS", default_value_t = 5000)]
    pub ttl_ms: u64,
    /// automatic: the standby promotes itself; manual: it waits for an operator.
    #[arg(long, env = "CONTINUUM_MODE", value_enum, default_value = "automatic")]
    pub mode: ModeArg,
    /// required: writes block while the standby is away; preferred: record
    /// "no synchronous standby" at the witnesses, then go on without it.
    #[arg(
        long,
        env = "CONTINUUM_SYNC_POLICY",
        value_enum,
        default_value = "preferred"
    )]
    pub sync_policy: PolicyArg,
    /// Largest clock-rate difference to any witness (fraction).
    #[arg(long, env = "CONTINUUM_MAX_DRIFT", default_value_t = 0.01)]
    pub max_drift: f64,
    /// Safety margin subtracted from every lease deadline, milliseconds.
    #[arg(long, env = "CONTINUUM_MARGIN_MS", default_value_t = 200)]
    pub margin_ms: u64,
    /// Decision loop period, milliseconds.
    #[arg(long, env = "CONTINUUM_TICK_MS", default_value_t = 100)]
    pub tick_ms: u64,
    /// Plain HTTP port for /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "CONTINUUM_HEALTH_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub health_listen: SocketAddr,
    /// Write a JSON status document here after every action (for drills and
    /// operators without a metrics stack).
    #[arg(long, env = "CONTINUUM_STATUS_FILE")]
    pub status_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Automatic,
    Manual,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PolicyArg {
    Required,
    Preferred,
}

/// Prometheus series of the failover runner.
#[derive(Clone)]
struct Metrics {
    actions: IntCounterVec,
    errors: IntCounterVec,
    epoch: IntGauge,
    holding: IntGauge,
    primary: IntGauge,
    fenced: IntGauge,
}

impl Metrics {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        let actions = IntCounterVec::new(
            Opts::new(
                "continuum_failover_actions_total",
                "Failover actions applied, by action.",
            ),
            &["action"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "continuum_failover_action_errors_total",
                "Failover actions that failed, by action and error.",
            ),
            &["action", "error"],
        )?;
        let epoch = IntGauge::new(
            "continuum_failover_epoch",
            "Epoch of the lease this region holds (0: none).",
        )?;
        let holding = IntGauge::new(
            "continuum_failover_lease_held",
            "1 while this region holds the lease by its conservative deadline.",
        )?;
        let primary = IntGauge::new(
            "continuum_failover_database_primary",
            "1 while this region's database is out of recovery.",
        )?;
        let fenced = IntGauge::new(
            "continuum_failover_database_fenced",
            "1 while this region's database refuses writes by the fence.",
        )?;
        for c in [&actions, &errors] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [&epoch, &holding, &primary, &fenced] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            actions,
            errors,
            epoch,
            holding,
            primary,
            fenced,
        })
    }
}

/// What this region's runner knows between ticks.
struct Runner {
    args: FailoverArgs,
    region: HolderId,
    peer: HolderId,
    lease: LeaseName,
    client: Arc<QuorumClient>,
    ttl: Duration,
    /// The current grant, kept fresh by the renewer task.
    grant: watch::Sender<Option<Grant>>,
    /// Metadata stored at a majority during the current epoch.
    recorded: Option<LeaseMeta>,
    meta_seq: u64,
    /// This process has held the lease (the unsafe no-fence test hook only
    /// skips fences after that, so bootstrap still works).
    held_once: bool,
    metrics: Metrics,
    status: Arc<Mutex<serde_json::Value>>,
}

pub fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: FailoverArgs) -> anyhow::Result<()> {
    let region = HolderId::new(args.region.clone()).context("--region")?;
    let peer = HolderId::new(args.peer.clone()).context("--peer")?;
    anyhow::ensure!(region != peer, "--region and --peer must differ");
    let lease = LeaseName::new(args.lease.clone()).context("--lease")?;
    let ttl = Duration::from_millis(args.ttl_ms);
    // A witness call must finish well inside one renewal period.
    let call_timeout = (ttl / 6).max(Duration::from_millis(100));
    let mut witnesses: Vec<Arc<dyn LeaseTransport>> = Vec::new();
    if !args.witnesses.is_empty() {
        let tls = TlsMaterial::from_files(&args.tls_ca, &args.tls_cert, &args.tls_key)
            .context("TLS material")?;
        for url in &args.witnesses {
            witnesses.push(Arc::new(
                HttpsTransport::new(url, &tls, call_timeout)
                    .with_context(|| format!("witness {url}"))?,
            ));
        }
    }
    let registry = Registry::new();
    // Witnesses over the control link, and region health (`/status`).
    let witness_link = match &args.witness_link_config {
        Some(path) => {
            let l = link::start(
                path,
                &args.witness_link_peers,
                &args.region,
                &args.pg_conninfo,
                call_timeout,
                &registry,
            )
            .await?;
            witnesses.extend(l.transports.iter().cloned());
            Some(l)
        }
        None => None,
    };
    let cfg = QuorumConfig {
        max_drift: args.max_drift,
        margin: Duration::from_millis(args.margin_ms),
        ..QuorumConfig::default()
    };
    cfg.validate(ttl).context("lease timing")?;
    let client = Arc::new(QuorumClient::new(witnesses, cfg).context("quorum client")?);

    let metrics = Metrics::new(&registry)?;
    let health = crate::health::HealthState::without_guardrail(registry.clone());
    let status = witness_link.as_ref().map(|l| l.status.clone());
    let (bound, _health_task) =
        crate::health::serve_with_status(args.health_listen, health, status)
            .await
            .with_context(|| format!("health port {}", args.health_listen))?;
    tracing::info!(health = %bound, %region, %peer, lease = %lease, ttl_ms = args.ttl_ms, witnesses = ?args.witnesses, link_witnesses = ?args.witness_link_peers, "failover runner starting");

    let (grant_tx, grant_rx) = watch::channel(None);
    let status = Arc::new(Mutex::new(serde_json::json!({ "region": region.as_str() })));
    tokio::spawn(fence_guard(
        grant_rx,
        args.pg_conninfo.clone(),
        metrics.clone(),
    ));
    let mut runner = Runner {
        args,
        region,
        peer,
        lease,
        client,
        ttl,
        grant: grant_tx,
        recorded: None,
        meta_seq: 0,
        held_once: false,
        metrics,
        status,
    };
    runner.run_loop().await
}

/// UNSAFE, debug builds only: `CONTINUUM_TEST_UNSAFE_NO_FENCE=1` skips every
/// fence action, so the partition tests can show their checker catches a
/// region that keeps acknowledging writes after losing the lease.
#[cfg(debug_assertions)]
fn unsafe_no_fence() -> bool {
    std::env::var_os("CONTINUUM_TEST_UNSAFE_NO_FENCE").is_some_and(|v| v == "1")
}

/// Release builds never skip the fence.
#[cfg(not(debug_assertions))]
fn unsafe_no_fence() -> bool {
    false
}

/// Fences the database the moment the held grant's deadline passes. Runs
/// apart from the decision loop so a stuck database call cannot delay it.
async fn fence_guard(grant: watch::Receiver<Option<Grant>>, conninfo: String, metrics: Metrics) {
    crate::lease_guard::fence_at_deadline(grant, |g, reason| {
        let conninfo = conninfo.clone();
        let metrics = metrics.clone();
        async move {
            if unsafe_no_fence() {
                tracing::error!(action = "fence", reason, epoch = %g.epoch, "UNSAFE test hook: fence skipped");
                return;
            }
            tracing::warn!(action = "fence", reason, epoch = %g.epoch, "fencing the database");
            metrics.actions.with_label_values(&["fence"]).inc();
            if let Err(e) = pg::fence(&conninfo).await {
                metrics.errors.with_label_values(&["fence", e.label()]).inc();
                tracing::error!(action = "fence", error = %e, "fence failed; the decision loop retries");
            }
        }
    })
    .await
}

/// Bounds a database call: a stuck call must not hold the decision loop.
async fn timed<T>(
    bound: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, (&'static str, String)> {
    tokio::time::timeout(bound, fut)
        .await
        .map_err(|_| ("timeout", format!("no answer within {bound:?}")))
}

impl Runner {
    async fn run_loop(&mut self) -> anyhow::Result<()> {
        let tick = Duration::from_millis(self.args.tick_ms.max(10));
        let mut last_reason = "";
        loop {
            let started = Instant::now();
            let action = self.observe_and_decide().await;
            match &action {
                Action::Wait { reason } => {
                    if *reason != last_reason {
                        tracing::info!(action = "wait", reason, "waiting");
                        last_reason = reason;
                    }
                }
                other => {
                    last_reason = "";
                    self.apply(other.clone()).await;
                    // Act on the consequence at once (e.g. promote right
                    // after acquiring): RTO is made of these steps.
                    continue;
                }
            }
            sleep_until(started + tick).await;
        }
    }

    async fn observe_and_decide(&mut self) -> Action {
        let now = std::time::Instant::now();
        let grant = self.grant.borrow().clone();
        let held = grant.as_ref().map(|g| Held {
            epoch: g.epoch,
            deadline: g.deadline.into_std(),
        });
        let db = observe::database(&self.args.pg_conninfo, &self.peer).await;
        let db = match db {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!(error = %e, "database not answering");
                None
            }
        };
        let view = match self.client.read_majority(&self.lease).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(error = %e, "no majority view");
                None
            }
        };
        if held.is_none_or(|h| now >= h.deadline) {
            // A lost epoch's record is not ours any more.
            self.recorded = None;
        }
        self.update_gauges(held, db.as_ref(), now);
        failover::decide(&Observation {
            now,
            region: &self.region,
            peer: &self.peer,
            mode: match self.args.mode {
                ModeArg::Automatic => Mode::Automatic,
                ModeArg::Manual => Mode::Manual,
            },
            policy: match self.args.sync_policy {
                PolicyArg::Required => SyncPolicy::Required,
                PolicyArg::Preferred => SyncPolicy::Preferred,
            },
            held,
            view: view.as_ref(),
            db: db.as_ref(),
            recorded: self.recorded.as_ref(),
        })
    }

    fn update_gauges(&self, held: Option<Held>, db: Option<&DbState>, now: std::time::Instant) {
        let holding = held.filter(|h| now < h.deadline);
        self.metrics.holding.set(i64::from(holding.is_some()));
        self.metrics
            .epoch
            .set(holding.map_or(0, |h| h.epoch.0 as i64));
        if let Some(db) = db {
            self.metrics.primary.set(i64::from(db.primary));
            self.metrics.fenced.set(i64::from(db.fenced));
        }
    }

    async fn apply(&mut self, action: Action) {
        let label = action.label();
        let t0 = Instant::now();
        let result = self.apply_inner(&action).await;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.metrics.actions.with_label_values(&[label]).inc();
        match result {
            Ok(detail) => {
                tracing::info!(action = label, ?action, took_ms = ms, detail = %detail, "failover action applied");
                self.write_status(label, &detail);
            }
            Err((err_label, e)) => {
                self.metrics
                    .errors
                    .with_label_values(&[label, err_label])
                    .inc();
                tracing::warn!(action = label, ?action, took_ms = ms, error = %e, "failover action failed; will decide again");
                // Do not spin on a failing action.
                sleep(Duration::from_millis(self.args.tick_ms.max(10))).await;
            }
        }
    }

    async fn apply_inner(&mut self, action: &Action) -> Result<String, (&'static str, String)> {
        let conninfo = self.args.pg_conninfo.clone();
        let pg_err = |e: continuum_shared::pg::PgError| (e.label(), e.to_string());
        // Every database call is bounded: a stuck call must not hold the loop.
        let bound = self.ttl.max(Duration::from_secs(2));
        match action {
            Action::Wait { reason } => Ok((*reason).to_string()),
            Action::Fence { reason } if self.held_once && unsafe_no_fence() => {
                // Do not spin: the loop would decide Fence again at once.
                sleep(Duration::from_millis(self.args.tick_ms.max(10))).await;
                Ok(format!("{reason}; UNSAFE test hook: fence skipped"))
            }
            Action::Fence { reason } => {
                let r = timed(bound, pg::fence(&conninfo)).await?.map_err(pg_err)?;
                Ok(format!(
                    "{reason}; fenced in {:?}, {} backends terminated",
                    r.total, r.terminated
                ))
            }
            Action::Acquire { reason } => {
                let g = self
                    .client
                    .acquire(&self.lease, &self.region, self.ttl)
                    .await
                    .map_err(|e| (e.label(), e.to_string()))?;
                let epoch = g.epoch;
                self.recorded = None;
                self.held_once = true;
                self.grant.send_replace(Some(g.clone()));
                tokio::spawn(crate::lease_guard::renewer(
                    self.client.clone(),
                    g,
                    self.grant.clone(),
                ));
                Ok(format!("{reason}; holding epoch {epoch}"))
            }
            Action::Promote { epoch } => {
                let r = timed(bound, pg::promote(&conninfo, pg::PromoteOptions::default()))
                    .await?
                    .map_err(pg_err)?;
                Ok(format!(
                    "promoted at epoch {epoch}: lsn_at_promotion={:?} catch_up_wait={:?} promote={:?} total={:?}",
                    r.lsn_at_promotion.map(|l| l.to_string()),
                    r.catch_up_wait,
                    r.promote,
                    r.total
                ))
            }
            Action::Unfence { standby } => {
                timed(
                    bound,
                    pg::unfence(&conninfo, standby.as_ref().map(|s| s.as_str())),
                )
                .await?
                .map_err(pg_err)?;
                Ok(format!("unfenced, requiring standby {standby:?}"))
            }
            Action::SetRequiredStandby { standby } => {
                timed(
                    bound,
                    pg::set_synchronous_standby(&conninfo, standby.as_ref().map(|s| s.as_str())),
                )
                .await?
                .map_err(pg_err)?;
                Ok(format!("now requiring standby {standby:?}"))
            }
            Action::RecordEpoch { epoch } => {
                timed(
                    bound,
                    observe::record_epoch(&conninfo, *epoch, &self.region),
                )
                .await?
                .map_err(|e| ("record_epoch", e))?;
                Ok(format!("epoch {epoch} recorded in the database"))
            }
            Action::UpdateMeta { sync_standby } => {
                let grant = self.grant.borrow().clone();
                let Some(grant) = grant else {
                    return Err(("not_holding", "no grant to update metadata under".into()));
                };
                let confirmed_lsn = match pg::primary_facts(&conninfo).await {
                    Ok(f) => f.confirmed_lsn().map(|l| l.0),
                    Err(_) => None,
                };
                self.meta_seq += 1;
                let meta = LeaseMeta {
                    sync_standby: sync_standby.clone(),
                    confirmed_lsn,
                    seq: self.meta_seq,
                };
                self.client
                    .update_meta(&grant, &meta)
                    .await
                    .map_err(|e| (e.label(), e.to_string()))?;
                self.recorded = Some(meta);
                Ok(format!(
                    "witnesses record synchronous standby {sync_standby:?} at epoch {}",
                    grant.epoch
                ))
            }
        }
    }

    fn write_status(&self, action: &str, detail: &str) {
        let Some(path) = &self.args.status_file else {
            return;
        };
        let doc = {
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            s["last_action"] = serde_json::json!({ "action": action, "detail": detail });
            s["epoch"] = serde_json::json!(self.grant.borrow().as_ref().map(|g| g.epoch.0));
            s.clone()
        };
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        if std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::debug!(path = %path.display(), "status file not written");
        }
    }
}
