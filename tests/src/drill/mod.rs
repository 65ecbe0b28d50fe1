//! The region-kill drill: two regions (PostgreSQL primary and strict
//! synchronous standby, one `continuum-agent failover` each), one or three
//! witnesses, a writer recording every acknowledged commit. Each iteration
//! SIGKILLs every process of the primary's region, measures the time until
//! the first write is acknowledged by the other region (RTO), checks that
//! every acknowledged write is there, rebuilds the killed region as the new
//! standby (pg_rewind), then fails back with `continuum-agent switchover`
//! (planned, no rebuild) under the same writer, measuring the switchover's
//! downtime (fence on the old primary to first write on the new one).
//!
//! [`Cluster`] is also the harness of `tests/tests/switchover.rs`.

pub mod report;
pub mod writer;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use continuum_shared::lease::{HolderId, LeaseName};
use continuum_shared::quorum::{MajorityView, QuorumClient, QuorumConfig};
use continuum_shared::transport::https::TlsMaterial;
use continuum_shared::transport::{witness_transport, LeaseTransport, WitnessProtocol};

use crate::pg_proc::PgRegion;
use crate::pki::Pki;
use crate::witness_proc::{free_port, WitnessOpts, WitnessProc};

pub use report::{IterationReport, Report};

const LEASE: &str = "continuum/drill/db";
const REGIONS: [&str; 2] = ["region-a", "region-b"];

/// How to run the drill.
#[derive(Debug, Clone)]
pub struct DrillOpts {
    pub iterations: usize,
    pub witnesses: usize,
    pub ttl_ms: u64,
    /// Writes on the primary before each kill.
    pub warmup: Duration,
}

/// Region names of the drill (index 0 and 1).
pub const REGION_NAMES: [&str; 2] = REGIONS;

pub use crate::bins::workspace_bin;

/// Builds the agent and witness binaries of the running profile (under
/// `cargo run`/`cargo test`; see [`crate::bins`]).
pub fn build_sibling_binaries() -> Result<()> {
    workspace_bin("continuum-agent").map(|_| ())
}

/// One region's agent process.
struct AgentProc {
    child: Option<Child>,
    log: PathBuf,
}

/// Per-agent settings beyond the region's database.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    pub ttl_ms: u64,
    /// `--admin-listen` port.
    pub admin_port: u16,
    pub handover_timeout_ms: u64,
    /// `--rejoin` value.
    pub rejoin: &'static str,
}

impl AgentProc {
    #[allow(clippy::too_many_arguments)]
    fn start(
        bin: &PathBuf,
        dir: &std::path::Path,
        region: usize,
        pg: &PgRegion,
        peer: &PgRegion,
        witnesses: &[String],
        pki: &Pki,
        opts: &AgentOpts,
    ) -> Result<AgentProc> {
        let log = dir.join(format!("agent-{}.log", REGIONS[region]));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .arg("failover")
            .args(["--region", REGIONS[region], "--peer", REGIONS[1 - region]])
            .args(["--lease", LEASE])
            .arg(format!("--witness={}", witnesses.join(",")))
            .arg("--tls-ca")
            .arg(&pki.ca_cert)
            .arg("--tls-cert")
            .arg(&pki.client.cert)
            .arg("--tls-key")
            .arg(&pki.client.key)
            .args(["--pg-conninfo", &pg.conninfo()])
            .args(["--ttl-ms", &opts.ttl_ms.to_string()])
            .args(["--health-listen", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", opts.admin_port)])
            .arg("--pg-data-dir")
            .arg(pg.data_dir())
            .arg("--pg-bin-dir")
            .arg(pg.bin())
            .arg("--pg-log-file")
            .arg(pg.log_path())
            .args(["--peer-pg-conninfo", &peer.conninfo()])
            .args([
                "--handover-timeout-ms",
                &opts.handover_timeout_ms.to_string(),
            ])
            .args(["--rejoin", opts.rejoin])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(AgentProc {
            child: Some(child),
            log,
        })
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Everything the drill runs: witnesses, two PostgreSQL regions (region 0
/// starts as primary) with the drill tables, one agent per region.
pub struct Cluster {
    dir: tempfile::TempDir,
    pki: Arc<Pki>,
    _witnesses: Vec<WitnessProc>,
    witness_urls: Vec<String>,
    pub pg: [PgRegion; 2],
    agents: [Option<AgentProc>; 2],
    agent_bin: PathBuf,
    agent_opts: [AgentOpts; 2],
    quorum: QuorumClient,
}

impl Cluster {
    /// Builds binaries, starts `witnesses` witnesses and both regions'
    /// databases, creates the drill tables; agents are not started yet.
    pub async fn new(
        witnesses: usize,
        ttl_ms: u64,
        handover_timeout_ms: u64,
        rejoin: &'static str,
    ) -> Result<Cluster> {
        build_sibling_binaries()?;
        let agent_bin = workspace_bin("continuum-agent")?;
        // WitnessProc finds the witness binary the same way; fail early if absent.
        workspace_bin("continuum-witness")?;
        let dir = tempfile::Builder::new()
            .prefix("continuum-drill-")
            .tempdir()?;
        let pki = Arc::new(Pki::generate()?);
        let mut procs = Vec::new();
        for _ in 0..witnesses {
            procs.push(WitnessProc::start(
                WitnessOpts::default().with_pki(pki.clone()),
            )?);
        }
        let witness_urls: Vec<String> = procs.iter().map(|w| w.api_url()).collect();
        let tls = TlsMaterial::from_files(&pki.ca_cert, &pki.client.cert, &pki.client.key)?;
        let mut transports: Vec<Arc<dyn LeaseTransport>> = Vec::new();
        for u in &witness_urls {
            transports.push(witness_transport(
                WitnessProtocol::Stream,
                u,
                &tls,
                Duration::from_millis(500),
            )?);
        }
        let quorum = QuorumClient::new(transports, QuorumConfig::default())?;
        let a = tokio::task::block_in_place(|| PgRegion::primary(REGIONS[0], REGIONS[1]))?;
        let b = tokio::task::block_in_place(|| PgRegion::standby_of(&a, REGIONS[1]))?;
        {
            let c = a.connect().await?;
            c.batch_execute(
                "CREATE TABLE drill_writes (id bigint PRIMARY KEY, region int NOT NULL, \
                   at timestamptz NOT NULL DEFAULT clock_timestamp()); \
                 CREATE TABLE drill_probe (id bigserial PRIMARY KEY);",
            )
            .await
            .context("create drill tables")?;
        }
        let opts = |_: usize| -> Result<AgentOpts> {
            Ok(AgentOpts {
                ttl_ms,
                admin_port: free_port()?,
                handover_timeout_ms,
                rejoin,
            })
        };
        Ok(Cluster {
            dir,
            pki,
            _witnesses: procs,
            witness_urls,
            pg: [a, b],
            agents: [None, None],
            agent_bin,
            agent_opts: [opts(0)?, opts(1)?],
            quorum,
        })
    }

    pub fn ttl_ms(&self) -> u64 {
        self.agent_opts[0].ttl_ms
    }

    pub fn start_agent(&mut self, region: usize) -> Result<()> {
        let a = AgentProc::start(
            &self.agent_bin,
            self.dir.path(),
            region,
            &self.pg[region],
            &self.pg[1 - region],
            &self.witness_urls,
            &self.pki,
            &self.agent_opts[region],
        )?;
        self.agents[region] = Some(a);
        Ok(())
    }

    /// SIGKILL the region's agent (its database keeps running).
    pub fn kill_agent(&mut self, region: usize) {
        if let Some(a) = self.agents[region].as_mut() {
            a.kill9();
        }
    }

    /// The admin endpoint URL of a region's agent.
    pub fn admin_url(&self, region: usize) -> String {
        format!("http://127.0.0.1:{}", self.agent_opts[region].admin_port)
    }

    /// `GET /failover/status` of a region's agent.
    pub fn admin_status(&self, region: usize) -> Option<serde_json::Value> {
        let addr: std::net::SocketAddr =
            format!("127.0.0.1:{}", self.agent_opts[region].admin_port)
                .parse()
                .ok()?;
        let (code, body) = crate::witness_proc::http_get(addr, "/failover/status").ok()?;
        (code == 200).then(|| serde_json::from_str(body.trim()).ok())?
    }

    /// Runs `continuum-agent switchover --to <region>` against both agents;
    /// returns its stdout (one JSON line).
    pub fn switchover(&self, to: usize, timeout_s: u64) -> Result<String> {
        let out = Command::new(&self.agent_bin)
            .arg("--log-format=text")
            .arg("switchover")
            .args(["--to", REGIONS[to]])
            .args(["--agent", &self.admin_url(0), "--agent", &self.admin_url(1)])
            .args(["--timeout-s", &timeout_s.to_string()])
            .stdin(Stdio::null())
            .output()
            .context("run continuum-agent switchover")?;
        if !out.status.success() {
            bail!(
                "switchover to {} failed ({}): {}{}\nagent {} log:\n{}\nagent {} log:\n{}",
                REGIONS[to],
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                REGIONS[0],
                self.agent_log_tail(0),
                REGIONS[1],
                self.agent_log_tail(1),
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub async fn view(&self) -> Option<MajorityView> {
        let name = LeaseName::new(LEASE).ok()?;
        self.quorum.read_majority(&name).await.ok()
    }

    /// Full text of a region's agent log.
    pub fn agent_log(&self, region: usize) -> String {
        self.agents[region]
            .as_ref()
            .and_then(|a| std::fs::read_to_string(&a.log).ok())
            .unwrap_or_default()
    }

    pub fn agent_log_tail(&self, region: usize) -> String {
        self.agents[region]
            .as_ref()
            .map(|a| crate::witness_proc::tail(&a.log, 25))
            .unwrap_or_default()
    }

    /// Waits until `primary` holds the lease, the witnesses record `standby`
    /// as its synchronous standby, and `primary` accepts a write.
    pub async fn wait_steady(&self, primary: usize, standby: usize, bound: Duration) -> Result<()> {
        let start = Instant::now();
        let want_holder = HolderId::new(REGIONS[primary])?;
        let want_sync = HolderId::new(REGIONS[standby])?;
        loop {
            if let Some(v) = self.view().await {
                let holds = v.holder.as_ref().is_some_and(|(h, _)| *h == want_holder);
                let named = v
                    .meta
                    .as_ref()
                    .is_some_and(|(_, m)| m.sync_standby.as_ref() == Some(&want_sync));
                if holds && named && self.accepts_write(primary).await {
                    return Ok(());
                }
            }
            if start.elapsed() > bound {
                bail!(
                    "{} did not become a steady primary with {} as synchronous standby within {bound:?}\n\
                     agent {} log:\n{}\nagent {} log:\n{}",
                    REGIONS[primary],
                    REGIONS[standby],
                    REGIONS[primary],
                    self.agent_log_tail(primary),
                    REGIONS[standby],
                    self.agent_log_tail(standby),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many of the writer's acknowledged writes a region's database holds.
    pub async fn acked_present(&self, region: usize, log: &writer::WriterLog) -> Result<i64> {
        let ids: Vec<i64> = log.acks.iter().map(|a| a.id).collect();
        let c = self.pg[region].connect().await?;
        let row = c
            .query_one(
                "SELECT count(*) FROM drill_writes WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .with_context(|| format!("count acknowledged writes on {}", REGION_NAMES[region]))?;
        Ok(row.get(0))
    }

    /// Whether a region's database commits a probe row within 500 ms.
    pub async fn accepts_write(&self, region: usize) -> bool {
        let Ok(c) = self.pg[region].connect().await else {
            return false;
        };
        let q = c.execute("INSERT INTO drill_probe DEFAULT VALUES", &[]);
        matches!(
            tokio::time::timeout(Duration::from_millis(500), q).await,
            Ok(Ok(_))
        )
    }
}

/// Runs the drill and returns its report.
pub async fn region_kill(opts: DrillOpts) -> Result<Report> {
    anyhow::ensure!(opts.iterations >= 1, "--iterations must be at least 1");
    anyhow::ensure!(
        opts.witnesses == 1 || opts.witnesses == 3,
        "--witnesses must be 1 or 3"
    );
    let handover_timeout = (opts.ttl_ms * 4).max(10_000);
    let mut cluster = Cluster::new(opts.witnesses, opts.ttl_ms, handover_timeout, "off").await?;
    cluster.start_agent(0)?;
    cluster.start_agent(1)?;

    let settle = Duration::from_millis(opts.ttl_ms * 4 + 20_000);
    let mut iterations = Vec::new();
    let mut next_id = 1i64;
    let drill_start = Instant::now();
    for n in 0..opts.iterations {
        // Region 0 is the primary at the start of every iteration: killed,
        // rebuilt, then failed back to by a planned switchover.
        cluster.wait_steady(0, 1, settle).await?;
        let mut it = one_iteration(&mut cluster, n, 0, &mut next_id, &opts, drill_start).await?;
        cluster.wait_steady(1, 0, settle).await?;
        let sw = switchover_phase(&mut cluster, 1, 0, &mut next_id, &opts).await?;
        it.switchover_ms = sw.downtime_ms;
        it.switchover_gap_ms = sw.gap_ms;
        it.switchover_acked_writes = sw.acked;
        it.lost_acked_writes += sw.lost;
        it.split_brain += sw.split;
        it.switchover_rebuilt = sw.rebuilt;
        iterations.push(it);
    }
    Ok(Report::new(&opts, iterations))
}

/// What one planned switchover under the writer showed.
pub struct SwitchoverFigures {
    /// Fence on the old primary to the first write acknowledged by the new.
    pub downtime_ms: Option<f64>,
    /// Last write acknowledged by the old primary to the first by the new.
    pub gap_ms: Option<f64>,
    pub acked: u64,
    pub lost: u64,
    /// 1 if the old primary acknowledged anything after the new one's first.
    pub split: u64,
    /// The old primary needed pg_rewind to follow (should never happen).
    pub rebuilt: bool,
    /// The command's JSON line.
    pub output: String,
}

fn unix_ms_of(anchor: (std::time::SystemTime, Instant), at: Instant) -> f64 {
    let base = anchor
        .0
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    base + at.saturating_duration_since(anchor.1).as_secs_f64() * 1000.0
        - anchor.1.saturating_duration_since(at).as_secs_f64() * 1000.0
}

/// Runs `continuum-agent switchover` from `from` to `to` under a writer and
/// checks every acknowledged write is on the new primary, the old primary
/// never acknowledged after the new one did, and the old primary follows
/// without a rebuild.
pub async fn switchover_phase(
    cluster: &mut Cluster,
    from: usize,
    to: usize,
    next_id: &mut i64,
    opts: &DrillOpts,
) -> Result<SwitchoverFigures> {
    let conninfos: Vec<String> = cluster.pg.iter().map(|p| p.conninfo()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let anchor = (std::time::SystemTime::now(), Instant::now());
    let writer = tokio::spawn(writer::run(conninfos, from, *next_id, stop.clone()));
    tokio::time::sleep(opts.warmup / 2).await;
    let output = tokio::task::block_in_place(|| cluster.switchover(to, 60))?;
    // Writes on the new primary for a moment, then stop.
    let bound = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let acked_new = cluster.accepts_write(to).await;
        if (acked_new && Instant::now() + Duration::from_secs(19) > bound) || Instant::now() > bound
        {
            break;
        }
    }
    tokio::time::sleep(opts.warmup / 4).await;
    stop.store(true, Ordering::Relaxed);
    let log = writer.await.context("writer task")?;
    *next_id = log
        .acks
        .iter()
        .map(|a| a.id)
        .max()
        .unwrap_or(*next_id)
        .max(*next_id)
        + 10_000;

    let present = cluster.acked_present(to, &log).await?;
    let first_new = log
        .acks
        .iter()
        .filter(|a| a.region == to)
        .map(|a| a.at)
        .min();
    let last_old = log
        .acks
        .iter()
        .filter(|a| a.region == from && first_new.is_none_or(|f| a.at < f))
        .map(|a| a.at)
        .max();
    let split = first_new.is_some_and(|f| log.acks.iter().any(|a| a.region == from && a.at > f));
    // The old primary's agent reports when it fenced.
    let mut fenced_at = None;
    let mut rebuilt = false;
    let wait = Instant::now() + Duration::from_secs(10);
    while Instant::now() < wait {
        if let Some(st) = cluster.admin_status(from) {
            let h = &st["last_handover"];
            fenced_at = h["fenced_at_unix_ms"].as_f64();
            if h["followed_at_unix_ms"].is_number() {
                rebuilt = h["rebuilt"].as_bool().unwrap_or(false);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_secs_f64() * 1000.0),
        _ => None,
    };
    Ok(SwitchoverFigures {
        downtime_ms: match (fenced_at, first_new) {
            (Some(f), Some(n)) => Some(unix_ms_of(anchor, n) - f),
            _ => None,
        },
        gap_ms: ms(last_old, first_new),
        acked: log.acks.len() as u64,
        lost: (log.acks.len() as i64 - present).max(0) as u64,
        split: u64::from(split),
        rebuilt,
        output,
    })
}

async fn one_iteration(
    cluster: &mut Cluster,
    n: usize,
    primary: usize,
    next_id: &mut i64,
    opts: &DrillOpts,
    drill_start: Instant,
) -> Result<IterationReport> {
    let standby = 1 - primary;
    let conninfos: Vec<String> = cluster.pg.iter().map(|p| p.conninfo()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(writer::run(conninfos, primary, *next_id, stop.clone()));
    tokio::time::sleep(opts.warmup).await;

    // Kill every process of the primary's region: agent first, then the
    // database, both with SIGKILL.
    let killed_at = Instant::now();
    if let Some(a) = cluster.agents[primary].as_mut() {
        a.kill9();
    }
    tokio::task::block_in_place(|| cluster.pg[primary].kill9())?;

    // Watch the failover: lease expiry at a majority, promotion of the standby.
    let mut expired_at = None;
    let mut promoted_at = None;
    let bound = Duration::from_millis(opts.ttl_ms * 3 + 15_000);
    while killed_at.elapsed() < bound && (expired_at.is_none() || promoted_at.is_none()) {
        if expired_at.is_none() {
            if let Some(v) = cluster.view().await {
                let other_holds = v
                    .holder
                    .as_ref()
                    .is_some_and(|(h, _)| h.as_str() == REGIONS[standby]);
                if v.expired_at_majority || other_holds {
                    expired_at = Some(Instant::now());
                }
            }
        }
        if promoted_at.is_none() {
            if let Ok(c) = cluster.pg[standby].connect().await {
                if let Ok(r) = c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    if !r.get::<_, bool>(0) {
                        promoted_at = Some(Instant::now());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the new primary take writes for a moment, then stop the writer.
    let first_ack_bound = Instant::now() + bound;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() > first_ack_bound || writer.is_finished() {
            break;
        }
        // Stop once the writer has been acknowledged by the standby for 1 s.
        if promoted_at.is_some_and(|p| p.elapsed() > Duration::from_secs(1) + opts.warmup / 4) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let log = writer.await.context("writer task")?;
    *next_id = log
        .acks
        .iter()
        .map(|a| a.id)
        .max()
        .unwrap_or(*next_id)
        .max(*next_id)
        + 10_000;

    // Every acknowledged write must be on the survivor.
    let present = cluster.acked_present(standby, &log).await?;
    let lost = log.acks.len() as i64 - present;
    let c = cluster.pg[standby].connect().await?;
    let epoch_row = c
        .query_opt("SELECT epoch FROM continuum.epoch WHERE id = 1", &[])
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, i64>(0));

    let first_ack_survivor = log
        .acks
        .iter()
        .filter(|a| a.region == standby && a.at > killed_at)
        .map(|a| a.at)
        .min();
    // Split brain: the killed region acknowledging anything after the
    // survivor's first acknowledgement.
    let split = first_ack_survivor
        .is_some_and(|first| log.acks.iter().any(|a| a.region == primary && a.at > first));
    let ms = |t: Option<Instant>| t.map(|t| t.duration_since(killed_at).as_secs_f64() * 1000.0);
    let it = IterationReport {
        iteration: n + 1,
        killed: REGIONS[primary].to_string(),
        promoted: REGIONS[standby].to_string(),
        epoch: epoch_row.and_then(|e| u64::try_from(e).ok()),
        acked_writes: log.acks.len() as u64,
        lost_acked_writes: lost.max(0) as u64,
        split_brain: u64::from(split),
        rto_ms: ms(first_ack_survivor),
        lease_expired_ms: ms(expired_at),
        promoted_ms: ms(promoted_at),
        killed_at_ms: killed_at.duration_since(drill_start).as_secs_f64() * 1000.0,
        switchover_ms: None,
        switchover_gap_ms: None,
        switchover_acked_writes: 0,
        switchover_rebuilt: false,
        acks_ms: log
            .acks
            .iter()
            .filter(|a| a.at + Duration::from_secs(3) > killed_at)
            .map(|a| {
                (
                    a.region,
                    a.at.checked_duration_since(killed_at)
                        .map(|d| d.as_secs_f64() * 1000.0)
                        .unwrap_or_else(|| {
                            -(killed_at.duration_since(a.at).as_secs_f64() * 1000.0)
                        }),
                )
            })
            .collect(),
    };
    if it.rto_ms.is_none() {
        bail!(
            "iteration {}: {} never acknowledged a write after {} was killed\nagent {} log:\n{}\n{} log:\n{}",
            n + 1,
            REGIONS[standby],
            REGIONS[primary],
            REGIONS[standby],
            cluster.agent_log_tail(standby),
            REGIONS[standby],
            cluster.pg[standby].log_tail()
        );
    }

    // Bring the killed region back as the new standby (invariant 5: it never
    // resumes as primary by itself), with its agent.
    let survivor_conn = {
        let (l, r) = cluster.pg.split_at_mut(1);
        if primary == 0 {
            (&mut l[0], &r[0])
        } else {
            (&mut r[0], &l[0])
        }
    };
    let (former, survivor) = survivor_conn;
    if let Err(e) = former.rewind_onto(survivor).await {
        eprintln!("drill: pg_rewind failed ({e:#}); rebuilding from a base backup");
        former.basebackup_onto(survivor).await?;
    }
    cluster.start_agent(primary)?;
    Ok(it)
}
