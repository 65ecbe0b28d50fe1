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

pub mod admin;
mod link;
pub mod observe;
pub mod switchover;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use continuum_shared::failover::{
    self, Action, DbState, Held, Mode, Observation, OfflineDb, SyncPolicy,
};
use continuum_shared::lease::{Epoch, HolderId, LeaseMeta, LeaseName};
use continuum_shared::pg::backend as pg;
use continuum_shared::pg::rejoin::{self, Tools};
use continuum_shared::pg::server::{self, LocalServer};
use continuum_shared::quorum::{Grant, QuorumClient, QuorumConfig};
use continuum_shared::transport::https::TlsMaterial;
use continuum_shared::transport::LeaseTransport;
use continuum_shared::transport::{witness_transport, WitnessProtocol};
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
    /// Protocol to the `--witness` URLs (both on the witness's API port):
    /// `stream` pipelines every call over one TLS connection per witness;
    /// `https` sends one `POST /v1/lease` per call.
    #[arg(long, env = "CONTINUUM_WITNESS_PROTOCOL", default_value = "stream")]
    pub witness_protocol: WitnessProtocol,
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
    /// How often a steady primary re-records its lease metadata at the
    /// witnesses, so they carry a current confirmed LSN (milliseconds).
    #[arg(long, env = "CONTINUUM_META_REFRESH_MS", default_value_t = failover::META_REFRESH.as_millis() as u64)]
    pub meta_refresh_ms: u64,
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
    /// Admin endpoint (`GET /failover/status`, `POST /failover/handover?to=`)
    /// used by `continuum-agent switchover`. Unauthenticated: bind it to
    /// loopback or an operator-only network. Off when not set.
    #[arg(long, env = "CONTINUUM_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// This region's PostgreSQL data directory, on this host. Needed for a
    /// planned handover (clean stop, restart as a standby) and for --rejoin.
    #[arg(long, env = "CONTINUUM_PG_DATA_DIR")]
    pub pg_data_dir: Option<PathBuf>,
    /// Directory with pg_ctl, pg_controldata, pg_rewind, pg_basebackup.
    #[arg(
        long,
        env = "CONTINUUM_PG_BIN_DIR",
        default_value = "/usr/lib/postgresql/15/bin"
    )]
    pub pg_bin_dir: PathBuf,
    /// Server log for restarts by the agent (`pg_ctl start --log`); default:
    /// `<pg-data-dir>.log`.
    #[arg(long, env = "CONTINUUM_PG_LOG_FILE")]
    pub pg_log_file: Option<PathBuf>,
    /// libpq connection string (superuser) of the PEER region's database:
    /// a former primary follows it (`primary_conninfo`, with this region as
    /// application_name) and rewinds from it.
    #[arg(long, env = "CONTINUUM_PEER_PG_CONNINFO")]
    pub peer_pg_conninfo: Option<String>,
    /// How long a stopped old primary waits for its successor to take the
    /// lease before it abandons the handover and starts fenced again; also
    /// how long any region honours another region's handover intent.
    #[arg(long, env = "CONTINUUM_HANDOVER_TIMEOUT_MS", default_value_t = 30_000)]
    pub handover_timeout_ms: u64,
    /// What a fenced former primary does once the other region holds a newer
    /// epoch: `off` stays fenced and logs what to do; `rewind` rebuilds it as
    /// a standby with pg_rewind (falling back to a base backup); `basebackup`
    /// always takes a fresh base backup. Needs --pg-data-dir and
    /// --peer-pg-conninfo.
    #[arg(long, env = "CONTINUUM_REJOIN", value_enum, default_value = "off")]
    pub rejoin: RejoinArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RejoinArg {
    Off,
    Rewind,
    Basebackup,
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
    /// When `recorded` was stored (its refresh is due [`failover::META_REFRESH`] later).
    recorded_at: Option<std::time::Instant>,
    meta_seq: u64,
    /// The decision loop's kept database session.
    observe_conn: observe::ObserveConn,
    /// (epoch, seq) of the newest metadata in the last majority read.
    seen_meta: Option<(continuum_shared::lease::Epoch, u64)>,
    /// This process has held the lease (the unsafe no-fence test hook only
    /// skips fences after that, so bootstrap still works).
    held_once: bool,
    /// When this process last tried to adopt a grant an earlier process of
    /// this region left (at most once per TTL, and never after holding).
    adopt_tried_at: Option<std::time::Instant>,
    /// The database as last observed (an adoption that fails fences an
    /// unfenced primary at once).
    last_db: Option<DbState>,
    metrics: Metrics,
    status: Arc<Mutex<serde_json::Value>>,
    /// The data directory, when this agent manages it (`--pg-data-dir`).
    server: Option<LocalServer>,
    admin: admin::Admin,
    /// The live handover intent this agent has seen (epoch, successor) and
    /// since when: its deadline is that instant + `--handover-timeout-ms`.
    intent_seen: Option<((Epoch, HolderId), std::time::Instant)>,
    /// Handover milestones (unix ms) for the status: fenced, stopped, released.
    handover_marks: serde_json::Value,
    last_wait: &'static str,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The account to run PostgreSQL's tools as: the data directory's owner
/// when this agent runs as root (PostgreSQL refuses to run as root).
fn tools_for(args: &FailoverArgs, data_dir: &std::path::Path) -> anyhow::Result<Tools> {
    use std::os::unix::fs::MetadataExt;
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    let run_as = if euid == 0 {
        let m = std::fs::metadata(data_dir)
            .with_context(|| format!("--pg-data-dir {}", data_dir.display()))?;
        Some((m.uid(), m.gid()))
    } else {
        None
    };
    Ok(Tools {
        bin_dir: args.pg_bin_dir.clone(),
        run_as,
        timeout: Duration::from_secs(120),
    })
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
            witnesses.push(
                witness_transport(args.witness_protocol, url, &tls, call_timeout)
                    .with_context(|| format!("witness {url}"))?,
            );
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

    let server = match &args.pg_data_dir {
        Some(dir) => Some(LocalServer {
            tools: tools_for(&args, dir)?,
            data_dir: dir.clone(),
            log_file: args
                .pg_log_file
                .clone()
                .unwrap_or_else(|| dir.with_extension("log")),
        }),
        None => None,
    };
    if args.rejoin != RejoinArg::Off {
        anyhow::ensure!(
            server.is_some() && args.peer_pg_conninfo.is_some(),
            "--rejoin needs --pg-data-dir and --peer-pg-conninfo"
        );
    }
    let admin: admin::Admin = Arc::new(Mutex::new(admin::AdminShared {
        region: region.clone(),
        peer: peer.clone(),
        request: None,
        status: serde_json::json!({ "region": region.as_str(), "role": "unknown" }),
    }));
    if let Some(addr) = args.admin_listen {
        let (bound, _task) = admin::serve(addr, admin.clone())
            .await
            .with_context(|| format!("admin endpoint {addr}"))?;
        tracing::info!(admin = %bound, "admin endpoint serving /failover/status and /failover/handover");
    }
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
        recorded_at: None,
        meta_seq: 0,
        observe_conn: observe::ObserveConn::default(),
        seen_meta: None,
        held_once: false,
        adopt_tried_at: None,
        last_db: None,
        metrics,
        status,
        server,
        admin,
        intent_seen: None,
        handover_marks: serde_json::json!({}),
        last_wait: "",
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
                    self.last_wait = reason;
                    if *reason != last_reason {
                        tracing::info!(action = "wait", reason, "waiting");
                        if *reason == "fenced: a newer epoch was granted; rejoin as a replica" {
                            tracing::warn!(
                                reason,
                                "this former primary stays fenced: rebuild it as a standby of the new primary \
                                 (pg_rewind, or run the agent with --rejoin rewind --pg-data-dir --peer-pg-conninfo)"
                            );
                        }
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
        let db = observe::database(&self.observe_conn, &self.args.pg_conninfo, &self.peer).await;
        let db = match db {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!(error = %e, "database not answering");
                None
            }
        };
        let offline = match (&db, &self.server) {
            (None, Some(srv)) if !server::postmaster_running(&srv.data_dir) => {
                match srv.controldata().await {
                    Ok(c) => Some(OfflineDb {
                        clean_primary: c.clean_primary_shutdown(),
                        checkpoint_lsn: c.checkpoint.0,
                    }),
                    Err(e) => {
                        tracing::debug!(error = %e, "control file not readable");
                        None
                    }
                }
            }
            _ => None,
        };
        let view = match self.client.read_majority(&self.lease).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(error = %e, "no majority view");
                None
            }
        };
        if let Some(v) = &view {
            self.seen_meta = v.meta.as_ref().map(|(e, m)| (*e, m.seq));
        }
        if held.is_none_or(|h| now >= h.deadline) {
            // A lost epoch's record is not ours any more.
            self.recorded = None;
            self.recorded_at = None;
        }
        // The handover deadline counts from when this agent first saw the
        // intent (a restarted agent waits a full timeout again: safe, the
        // witnesses arbitrate anyway).
        let intent_key = view
            .as_ref()
            .and_then(|v| failover::live_intent(v).map(|h| (v.max_epoch, h.to.clone())));
        match (&intent_key, &self.intent_seen) {
            (Some(k), Some((seen, _))) if k == seen => {}
            (Some(k), _) => self.intent_seen = Some((k.clone(), now)),
            (None, _) => self.intent_seen = None,
        }
        let timeout = Duration::from_millis(self.args.handover_timeout_ms);
        let handover_deadline = self.intent_seen.as_ref().map(|(_, t)| *t + timeout);
        let request = {
            let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            // A request nobody could act on for a whole timeout is dropped.
            if a.request
                .as_ref()
                .is_some_and(|(_, t)| t.elapsed() > timeout)
            {
                tracing::warn!(
                    reason = "not acted on within the handover timeout",
                    "handover request dropped"
                );
                a.request = None;
            }
            a.request.as_ref().map(|(to, _)| to.clone())
        };
        let may_adopt =
            !self.held_once && self.adopt_tried_at.is_none_or(|t| t.elapsed() >= self.ttl);
        self.last_db = db.clone();
        self.update_gauges(held, db.as_ref(), now);
        self.publish_status(held, db.as_ref(), offline.as_ref(), view.as_ref(), now);
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
            offline: offline.as_ref(),
            handover_request: request.as_ref(),
            handover_deadline,
            rejoin: self.args.rejoin != RejoinArg::Off,
            may_adopt,
            meta_refresh_due: self
                .recorded_at
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.args.meta_refresh_ms)),
        })
    }

    /// Refreshes the admin endpoint's status document.
    fn publish_status(
        &self,
        held: Option<Held>,
        db: Option<&DbState>,
        offline: Option<&OfflineDb>,
        view: Option<&continuum_shared::quorum::MajorityView>,
        now: std::time::Instant,
    ) {
        let holding = held.filter(|h| now < h.deadline);
        let role = match (db, offline) {
            (Some(d), _) if d.primary && d.fenced => "fenced",
            (Some(d), _) if d.primary && holding.is_some() => "primary",
            (Some(d), _) if d.primary => "primary_without_lease",
            (Some(_), _) => "standby",
            (None, Some(_)) => "stopped",
            (None, None) => "unknown",
        };
        let ours = self.recorded.as_ref().and_then(|m| m.handover.as_ref());
        let live = view.and_then(failover::live_intent);
        let handover = match ours.or(live) {
            Some(h) => {
                let mut v = self.handover_marks.clone();
                v["to"] = serde_json::json!(h.to.as_str());
                v["final_lsn"] = serde_json::json!(h.final_lsn);
                v
            }
            None => serde_json::Value::Null,
        };
        let doc = serde_json::json!({
            "region": self.region.as_str(),
            "peer": self.peer.as_str(),
            "role": role,
            "holding": holding.is_some(),
            "epoch": holding.map(|h| h.epoch.0),
            "db_epoch": db.map(|d| d.epoch.0),
            "max_epoch": view.map(|v| v.max_epoch.0),
            "holder": view.and_then(|v| v.holder.as_ref()).map(|(h, e)| serde_json::json!({"region": h.as_str(), "epoch": e.0})),
            "handover": handover,
            "recorded": self.recorded.as_ref().map(|m| serde_json::json!({
                "sync_standby": m.sync_standby.as_ref().map(|s| s.as_str()),
                "confirmed_lsn": m.confirmed_lsn.map(|l| continuum_shared::pg::Lsn(l).to_string()),
            })),
            "last_handover": self.handover_marks,
            "waiting": self.last_wait,
        });
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        a.status = doc;
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
        let refresh = failover::is_meta_refresh(&action, self.recorded.as_ref());
        let t0 = Instant::now();
        let result = self.apply_inner(&action).await;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.metrics.actions.with_label_values(&[label]).inc();
        match result {
            Ok(detail) if refresh => {
                // Every few seconds while steady: not worth an info line.
                tracing::debug!(action = label, took_ms = ms, detail = %detail, "lease metadata refreshed");
            }
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

    /// Starts holding `g` (taken or adopted): the renewer keeps it fresh
    /// and the fence guard watches its deadline. Nothing is recorded at the
    /// witnesses for it yet (an adopted epoch's record may have reached only
    /// some of them: it is written again).
    fn hold(&mut self, g: Grant) {
        self.recorded = None;
        self.recorded_at = None;
        self.held_once = true;
        self.grant.send_replace(Some(g.clone()));
        tokio::spawn(crate::lease_guard::renewer(
            self.client.clone(),
            g,
            self.grant.clone(),
        ));
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
                if self.recorded.as_ref().is_some_and(|m| m.handover.is_some()) {
                    self.handover_marks["fenced_at_unix_ms"] = serde_json::json!(unix_ms());
                }
                Ok(format!(
                    "{reason}; fenced in {:?}, {} backends terminated",
                    r.total, r.terminated
                ))
            }
            Action::StopForHandover => {
                let srv = self.server.as_ref().ok_or((
                    "no_data_dir",
                    "a handover needs --pg-data-dir to stop the database cleanly".to_string(),
                ))?;
                let t0 = Instant::now();
                srv.stop_fast().await.map_err(pg_err)?;
                self.handover_marks["stopped_at_unix_ms"] = serde_json::json!(unix_ms());
                Ok(format!(
                    "handover: database stopped cleanly in {:?} (fast shutdown; the successor received WAL up to the shutdown checkpoint)",
                    t0.elapsed()
                ))
            }
            Action::Release { reason } => {
                let grant = self.grant.borrow().clone();
                let Some(grant) = grant else {
                    return Err(("not_holding", "no grant to release".into()));
                };
                // Stop renewing (and the fence guard) before releasing.
                self.grant.send_replace(None);
                let released = self.client.release(&grant).await;
                self.recorded = None;
                self.recorded_at = None;
                self.handover_marks["released_at_unix_ms"] = serde_json::json!(unix_ms());
                Ok(format!(
                    "{reason}; epoch {} released at {released} witness(es)",
                    grant.epoch
                ))
            }
            Action::FollowPeer { reason } => self.follow_peer(reason).await,
            Action::StartFenced { reason } => {
                let srv = self.server.as_ref().ok_or((
                    "no_data_dir",
                    "starting the database needs --pg-data-dir".to_string(),
                ))?;
                rejoin::fence_offline(&srv.data_dir).map_err(pg_err)?;
                rejoin::fix_owner(&srv.tools, &srv.data_dir).map_err(pg_err)?;
                srv.start().await.map_err(pg_err)?;
                self.handover_marks["abandoned_at_unix_ms"] = serde_json::json!(unix_ms());
                Ok(format!("{reason}; started as a fenced primary"))
            }
            Action::Rejoin { reason } => self.rejoin(reason).await,
            Action::Acquire { reason } => {
                let g = self
                    .client
                    .acquire(&self.lease, &self.region, self.ttl)
                    .await
                    .map_err(|e| (e.label(), e.to_string()))?;
                let epoch = g.epoch;
                self.hold(g);
                Ok(format!("{reason}; holding epoch {epoch}"))
            }
            Action::Adopt { epoch, handover } => {
                self.adopt_tried_at = Some(std::time::Instant::now());
                match self
                    .client
                    .adopt(&self.lease, &self.region, *epoch, self.ttl)
                    .await
                {
                    Ok(g) => {
                        self.hold(g);
                        self.recorded = handover.clone();
                        Ok(format!(
                            "continuing this region's grant left by an earlier process: holding epoch {epoch}, no fence"
                        ))
                    }
                    Err(e) => {
                        let unfenced = self
                            .last_db
                            .as_ref()
                            .is_some_and(|d| d.primary && !d.fenced);
                        if unfenced {
                            let r = timed(bound, pg::fence(&conninfo)).await?.map_err(pg_err)?;
                            return Err((
                                e.label(),
                                format!("adoption refused ({e}): fenced in {:?}", r.total),
                            ));
                        }
                        Err((e.label(), format!("adoption refused: {e}")))
                    }
                }
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
            Action::UpdateMeta {
                sync_standby,
                handover,
            } => {
                let grant = self.grant.borrow().clone();
                let Some(grant) = grant else {
                    return Err(("not_holding", "no grant to update metadata under".into()));
                };
                let confirmed_lsn = match pg::primary_facts(&conninfo).await {
                    Ok(f) => f.confirmed_lsn().map(|l| l.0),
                    Err(_) => self.recorded.as_ref().and_then(|m| m.confirmed_lsn),
                };
                let seen = self
                    .seen_meta
                    .filter(|(e, _)| *e == grant.epoch)
                    .map(|(_, s)| s);
                self.meta_seq = LeaseMeta::next_seq(self.meta_seq, seen);
                let meta = LeaseMeta {
                    sync_standby: sync_standby.clone(),
                    confirmed_lsn,
                    seq: self.meta_seq,
                    handover: handover.clone(),
                    // No successor watch in this runner: no writer ids.
                    ..LeaseMeta::default()
                };
                self.client
                    .update_meta(&grant, &meta)
                    .await
                    .map_err(|e| (e.label(), e.to_string()))?;
                self.recorded = Some(meta);
                self.recorded_at = Some(std::time::Instant::now());
                if let Some(h) = handover {
                    // The request is now a durable intent at the witnesses.
                    self.admin.lock().unwrap_or_else(|e| e.into_inner()).request = None;
                    if h.final_lsn.is_none() {
                        self.handover_marks = serde_json::json!({
                            "to": h.to.as_str(),
                            "intent_at_unix_ms": unix_ms(),
                            "from_epoch": grant.epoch.0,
                        });
                    }
                    return Ok(format!(
                        "witnesses record a handover to {} at epoch {} (final WAL position {:?})",
                        h.to,
                        grant.epoch,
                        h.final_lsn
                            .map(|l| continuum_shared::pg::Lsn(l).to_string())
                    ));
                }
                Ok(format!(
                    "witnesses record synchronous standby {sync_standby:?} at epoch {}",
                    grant.epoch
                ))
            }
        }
    }

    /// `primary_conninfo` for following the peer, naming this region.
    fn follow_conninfo(&self) -> Result<(String, String), (&'static str, String)> {
        let peer = self.args.peer_pg_conninfo.clone().ok_or((
            "no_peer_conninfo",
            "following the peer needs --peer-pg-conninfo".to_string(),
        ))?;
        let primary_conninfo = format!("{peer} application_name={}", self.region);
        Ok((peer, primary_conninfo))
    }

    /// Restart the cleanly stopped former primary as a standby of the peer.
    /// No rebuild when its WAL ends before the peer's timeline fork (a clean
    /// handover); otherwise pg_rewind, logged as such.
    async fn follow_peer(&mut self, reason: &str) -> Result<String, (&'static str, String)> {
        let pg_err = |e: continuum_shared::pg::PgError| (e.label(), e.to_string());
        let srv = self.server.clone().ok_or((
            "no_data_dir",
            "following the peer needs --pg-data-dir".to_string(),
        ))?;
        let (peer, primary_conninfo) = self.follow_conninfo()?;
        let t0 = Instant::now();
        let local = srv.controldata().await.map_err(pg_err)?;
        let (peer_tli, history) = pg::timeline_history(&peer).await.map_err(pg_err)?;
        let clean = continuum_shared::pg::decide::follows_without_rewind(
            local.timeline,
            local.checkpoint,
            peer_tli,
            &history,
        );
        let how = if clean {
            rejoin::follow_offline(&srv.data_dir, &primary_conninfo).map_err(pg_err)?;
            "no rebuild: its WAL is a prefix of the peer's timeline"
        } else {
            tracing::warn!(action = "follow_peer", timeline = local.timeline, checkpoint = %local.checkpoint, peer_timeline = peer_tli,
                reason = "WAL diverged from the peer's timeline", "rewinding before following (pg_rewind)");
            rejoin::rewind_as_standby(&srv.tools, &srv.data_dir, &peer, &primary_conninfo)
                .await
                .map_err(pg_err)?;
            "diverged: rewound with pg_rewind"
        };
        rejoin::fix_owner(&srv.tools, &srv.data_dir).map_err(pg_err)?;
        srv.start().await.map_err(pg_err)?;
        self.handover_marks["followed_at_unix_ms"] = serde_json::json!(unix_ms());
        self.handover_marks["rebuilt"] = serde_json::json!(!clean);
        Ok(format!(
            "{reason}; restarted as a standby of {} in {:?} ({how}; local timeline {} checkpoint {}, peer timeline {peer_tli})",
            self.peer,
            t0.elapsed(),
            local.timeline,
            local.checkpoint
        ))
    }

    /// Rebuild the fenced former primary as a standby of the new holder.
    async fn rejoin(&mut self, reason: &str) -> Result<String, (&'static str, String)> {
        let pg_err = |e: continuum_shared::pg::PgError| (e.label(), e.to_string());
        let srv = self
            .server
            .clone()
            .ok_or(("no_data_dir", "--rejoin needs --pg-data-dir".to_string()))?;
        let (peer, primary_conninfo) = self.follow_conninfo()?;
        let t0 = Instant::now();
        srv.stop_fast().await.map_err(pg_err)?;
        let report = match self.args.rejoin {
            RejoinArg::Basebackup => {
                rejoin::basebackup_as_standby(&srv.tools, &srv.data_dir, &peer, &primary_conninfo)
                    .await
            }
            _ => match rejoin::rewind_as_standby(&srv.tools, &srv.data_dir, &peer, &primary_conninfo)
                .await
            {
                Ok(r) => Ok(r),
                Err(e) => {
                    tracing::warn!(action = "rejoin", error = %e, reason = "pg_rewind failed", "falling back to a base backup");
                    rejoin::basebackup_as_standby(&srv.tools, &srv.data_dir, &peer, &primary_conninfo)
                        .await
                }
            },
        }
        .map_err(pg_err)?;
        rejoin::fix_owner(&srv.tools, &srv.data_dir).map_err(pg_err)?;
        srv.start().await.map_err(pg_err)?;
        Ok(format!(
            "{reason}; rebuilt as a standby of {} with {:?} in {:?}",
            self.peer,
            report.method,
            t0.elapsed()
        ))
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
