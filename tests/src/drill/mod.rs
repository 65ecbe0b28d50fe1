//! The region-kill drill: two regions (PostgreSQL primary and strict
//! synchronous standby, one `continuum-agent failover` each), one or three
//! witnesses, a writer recording every acknowledged commit. Each iteration
//! SIGKILLs every process of the primary's region, measures the time until
//! the first write is acknowledged by the other region (RTO), checks that
//! every acknowledged write is there, then rebuilds the killed region as the
//! new standby (pg_rewind) so the next iteration fails back the other way.

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
use continuum_shared::transport::https::{HttpsTransport, TlsMaterial};
use continuum_shared::transport::LeaseTransport;

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

impl AgentProc {
    fn start(
        bin: &PathBuf,
        dir: &std::path::Path,
        region: usize,
        pg: &PgRegion,
        witnesses: &[String],
        pki: &Pki,
        ttl_ms: u64,
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
            .args(["--ttl-ms", &ttl_ms.to_string()])
            .args(["--health-listen", &format!("127.0.0.1:{}", free_port()?)])
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

/// Everything the drill runs.
struct Cluster {
    dir: tempfile::TempDir,
    pki: Arc<Pki>,
    _witnesses: Vec<WitnessProc>,
    witness_urls: Vec<String>,
    pg: [PgRegion; 2],
    agents: [Option<AgentProc>; 2],
    agent_bin: PathBuf,
    ttl_ms: u64,
    quorum: QuorumClient,
}

impl Cluster {
    fn start_agent(&mut self, region: usize) -> Result<()> {
        let a = AgentProc::start(
            &self.agent_bin,
            self.dir.path(),
            region,
            &self.pg[region],
            &self.witness_urls,
            &self.pki,
            self.ttl_ms,
        )?;
        self.agents[region] = Some(a);
        Ok(())
    }

    async fn view(&self) -> Option<MajorityView> {
        let name = LeaseName::new(LEASE).ok()?;
        self.quorum.read_majority(&name).await.ok()
    }

    fn agent_log_tail(&self, region: usize) -> String {
        self.agents[region]
            .as_ref()
            .map(|a| crate::witness_proc::tail(&a.log, 15))
            .unwrap_or_default()
    }

    /// Waits until `primary` holds the lease, the witnesses record `standby`
    /// as its synchronous standby, and `primary` accepts a write.
    async fn wait_steady(&self, primary: usize, standby: usize, bound: Duration) -> Result<()> {
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

    async fn accepts_write(&self, region: usize) -> bool {
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
    build_sibling_binaries()?;
    let agent_bin = workspace_bin("continuum-agent")?;
    // WitnessProc finds the witness binary the same way; fail early if absent.
    workspace_bin("continuum-witness")?;

    let dir = tempfile::Builder::new()
        .prefix("continuum-drill-")
        .tempdir()?;
    let pki = Arc::new(Pki::generate()?);
    let mut witnesses = Vec::new();
    for _ in 0..opts.witnesses {
        witnesses.push(WitnessProc::start(
            WitnessOpts::default().with_pki(pki.clone()),
        )?);
    }
    let witness_urls: Vec<String> = witnesses.iter().map(|w| w.api_url()).collect();
    let tls = TlsMaterial::from_files(&pki.ca_cert, &pki.client.cert, &pki.client.key)?;
    let mut transports: Vec<Arc<dyn LeaseTransport>> = Vec::new();
    for u in &witness_urls {
        transports.push(Arc::new(HttpsTransport::new(
            u,
            &tls,
            Duration::from_millis(500),
        )?));
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
    let mut cluster = Cluster {
        dir,
        pki,
        _witnesses: witnesses,
        witness_urls,
        pg: [a, b],
        agents: [None, None],
        agent_bin,
        ttl_ms: opts.ttl_ms,
        quorum,
    };
    cluster.start_agent(0)?;
    cluster.start_agent(1)?;

    let settle = Duration::from_millis(opts.ttl_ms * 4 + 20_000);
    let mut iterations = Vec::new();
    let mut primary = 0usize;
    let mut next_id = 1i64;
    let drill_start = Instant::now();
    for n in 0..opts.iterations {
        let standby = 1 - primary;
        cluster.wait_steady(primary, standby, settle).await?;
        let it = one_iteration(&mut cluster, n, primary, &mut next_id, &opts, drill_start).await?;
        iterations.push(it);
        primary = standby;
    }
    Ok(Report::new(&opts, iterations))
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
    let ids: Vec<i64> = log.acks.iter().map(|a| a.id).collect();
    let c = cluster.pg[standby].connect().await?;
    let row = c
        .query_one(
            "SELECT count(*) FROM drill_writes WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .context("count acknowledged writes on the survivor")?;
    let present: i64 = row.get(0);
    let lost = ids.len() as i64 - present;
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
        acked_writes: ids.len() as u64,
        lost_acked_writes: lost.max(0) as u64,
        split_brain: u64::from(split),
        rto_ms: ms(first_ack_survivor),
        lease_expired_ms: ms(expired_at),
        promoted_ms: ms(promoted_at),
        killed_at_ms: killed_at.duration_since(drill_start).as_secs_f64() * 1000.0,
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
