//! `bench continuum`: the Continuum controller (`continuum-agent continuum`,
//! CloudNativePG back-end) as two separate processes, one per region, each
//! against its own test API server (served from this process) loaded with
//! manifests/rbac/continuum-controller.yaml, and three witness processes over
//! HTTPS. The agents run the args of manifests/base/failover.yaml (only the
//! health listener is the bench's).
//!
//! For each configuration (Continuum TTL x number of Continuums): CPU from
//! start to steady state (region a primary for every Continuum, b standby),
//! CPU per second over an idle window on the primary side (renewing every
//! lease at the witnesses every TTL/3, a decision per Continuum per tick) and
//! the standby side (reading the witnesses, watching), RSS, and the burst of
//! a failover: region a's agent SIGKILLed, CPU of b's agent from the kill to
//! every Continuum promoted (its CNPG Cluster's replica.primary = b) and
//! recorded Primary, with the highest rate over a 100 ms window. Printed
//! next to the manifest's requests and limits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use continuum_agent::continuum::cnpg;
use continuum_testapi::TestApi;
use serde_json::{json, Value};

use super::manifest::{self, Container};
use super::procstat::{self, AgentProc, CpuMark, CpuSpan, Mem};
use crate::continuum_fixture as fixture;
use crate::pki::Pki;
use crate::witness_proc::{WitnessOpts, WitnessProc};

const NS: &str = "db";
use crate::continuum_fixture::GROUP;

/// (Continuum ttlSeconds, Continuums per region): 5 s is the CRD's default.
/// `CONTINUUM_BENCH_CONTINUUMS` (e.g. `1,20`) sets the counts.
fn configs() -> Vec<(u32, usize)> {
    let counts: Vec<usize> = std::env::var("CONTINUUM_BENCH_CONTINUUMS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 20]);
    [5, 2]
        .into_iter()
        .flat_map(|ttl| counts.iter().map(move |n| (ttl, *n)))
        .collect()
}

struct Figures {
    ttl_s: u32,
    continuums: usize,
    startup_a: CpuSpan,
    startup_b: CpuSpan,
    /// Highest rate over 100 ms from spawn to steady state, a and b.
    startup_peak_mcores: (f64, f64),
    idle_a: CpuSpan,
    idle_b: CpuSpan,
    mem_a: Mem,
    mem_b: Mem,
    /// Kill of a -> every Cluster of b promoted.
    promote: CpuSpan,
    /// Kill of a -> every Continuum of b recorded Primary, epoch 2.
    recorded: CpuSpan,
    failover_peak_mcores: f64,
    mem_b_after: Mem,
    forbidden: usize,
}

pub async fn run(json_out: bool) -> anyhow::Result<()> {
    let reference = manifest::container(
        "manifests/base/failover.yaml",
        "Deployment",
        "continuum-failover",
        "failover",
    )?;
    let idle_s = procstat::idle_s(30);
    // Built (under cargo) and found before anything is timed.
    crate::bins::workspace_bin("continuum-agent")?;
    crate::bins::workspace_bin("continuum-witness")?;
    let pki = Arc::new(Pki::generate()?);
    let dir = tempfile::tempdir()?;
    let mut runs = Vec::new();
    for (ttl, n) in configs() {
        if !json_out {
            eprintln!("continuum: TTL {ttl} s, {n} Continuum(s) ...");
        }
        runs.push(one(&reference, &pki, dir.path(), ttl, n, idle_s).await?);
    }
    if json_out {
        let rows: Vec<Value> = runs
            .iter()
            .map(|f| {
                json!({
                    "ttl_s": f.ttl_s, "continuums": f.continuums,
                    "cpu_startup_primary_s": f.startup_a.cpu_s, "cpu_startup_standby_s": f.startup_b.cpu_s,
                    "startup_wall_s": f.startup_a.wall_s + f.startup_b.wall_s,
                    "cpu_startup_primary_peak_100ms_mcores": f.startup_peak_mcores.0,
                    "cpu_startup_standby_peak_100ms_mcores": f.startup_peak_mcores.1,
                    "cpu_idle_primary_mcores": f.idle_a.mcores(), "cpu_idle_standby_mcores": f.idle_b.mcores(),
                    "rss_primary_mib": f.mem_a.rss_mib, "rss_primary_peak_mib": f.mem_a.peak_mib,
                    "rss_standby_mib": f.mem_b.rss_mib,
                    "failover_promoted_wall_s": f.promote.wall_s, "failover_promoted_cpu_s": f.promote.cpu_s,
                    "failover_recorded_wall_s": f.recorded.wall_s, "failover_recorded_cpu_s": f.recorded.cpu_s,
                    "failover_cpu_mcores": f.recorded.mcores(), "failover_peak_100ms_mcores": f.failover_peak_mcores,
                    "rss_standby_after_failover_mib": f.mem_b_after.rss_mib,
                    "rss_standby_after_failover_peak_mib": f.mem_b_after.peak_mib,
                    "forbidden_requests": f.forbidden,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"bench": "continuum", "reference": reference.json(), "idle_window_s": idle_s,
                   "machine": "shared 2-core", "runs": rows})
        );
        return Ok(());
    }
    println!("continuum: `continuum-agent continuum` (args of {}), region a primary and region b standby as separate processes, each against its own test API server; 3 witness processes; shared 2-core machine", reference.manifest);
    println!("  reference: {}", reference.line());
    println!("  TTL  CRs | startup CPU-s a / b (peak m/100ms) | idle m (a primary / b standby, {idle_s} s) | RSS MiB a / b (peak) | failover (b): promoted s / CPU-s, recorded s / CPU-s, avg m, peak m/100ms | RSS b after (peak) | 403s");
    for f in &runs {
        println!(
            "  {:>2} s {:>4} | {:>5.2} / {:<5.2} ({:.0} / {:.0}) | {:>6.2} / {:<6.2}                   | {:>4.1} / {:<4.1} ({:.1} / {:.1}) | {:.2} / {:.2}, {:.2} / {:.2}, {:.0}, {:.0} | {:.1} ({:.1}) | {}",
            f.ttl_s, f.continuums,
            f.startup_a.cpu_s, f.startup_b.cpu_s, f.startup_peak_mcores.0, f.startup_peak_mcores.1,
            f.idle_a.mcores(), f.idle_b.mcores(),
            f.mem_a.rss_mib, f.mem_b.rss_mib, f.mem_a.peak_mib, f.mem_b.peak_mib,
            f.promote.wall_s, f.promote.cpu_s, f.recorded.wall_s, f.recorded.cpu_s,
            f.recorded.mcores(), f.failover_peak_mcores,
            f.mem_b_after.rss_mib, f.mem_b_after.peak_mib,
            f.forbidden,
        );
    }
    // Against the manifest: the busiest configuration's figures.
    let max = |g: &dyn Fn(&Figures) -> f64| runs.iter().map(g).fold(0.0, f64::max);
    let worst_mem = Mem {
        rss_mib: max(&|f| f.mem_b_after.rss_mib.max(f.mem_a.rss_mib)),
        peak_mib: max(&|f| f.mem_b_after.peak_mib.max(f.mem_a.peak_mib)),
    };
    let [cpu, mem] = reference.compare(
        max(&|f| f.idle_a.mcores().max(f.idle_b.mcores())),
        max(&|f| f.failover_peak_mcores),
        worst_mem,
    );
    println!("  vs manifest, busiest configuration (burst = failover peak over 100 ms):");
    println!("    {cpu}");
    println!("    {mem}");
    Ok(())
}

fn sync_on(peer: &str) -> Value {
    json!({"synchronous": {"method": "first", "number": 1, "standbyNamesPre": [peer], "maxStandbyNamesFromCluster": 0, "standbyNamesPost": [], "dataDurability": "required"}})
}

fn role_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/rbac/continuum-controller.yaml")
}

/// One region's cluster: `n` Continuums `app-<i>`, each over CNPG Clusters
/// `pg-a-<i>` (primary) and `pg-b-<i>` (its replica cluster).
async fn region(
    name: &str,
    peer: &str,
    n: usize,
    pki: &Pki,
    witnesses: &[WitnessProc],
    ttl: u32,
) -> anyhow::Result<TestApi> {
    let api = TestApi::start_with_role(&role_path()).await?;
    fixture::register_kinds(&api);
    let admin = api.admin_client()?;
    fixture::put_witness_tls(&admin, NS, pki).await?;
    let urls: Vec<String> = witnesses.iter().map(|w| w.api_url()).collect();
    for i in 0..n {
        let (own, other) = (format!("pg-{name}-{i}"), format!("pg-{peer}-{i}"));
        fixture::create_cluster(
            &admin,
            NS,
            &own,
            json!({"instances": 3, "replica": {"self": own, "primary": format!("pg-a-{i}"), "source": other},
                   "postgresql": sync_on(&other)}),
        )
        .await?;
        fixture::create_continuum(
            &admin,
            NS,
            &format!("app-{i}"),
            &json!({
                "regions": [{"name": "a", "cnpg": {"name": format!("pg-a-{i}")}}, {"name": "b", "cnpg": {"name": format!("pg-b-{i}")}}],
                "witnesses": {"urls": urls, "tlsSecretRef": {"name": "witness-tls"}},
                "ttlSeconds": ttl, "mode": "automatic", "syncPolicy": "preferred",
            }),
        )
        .await?;
    }
    Ok(api)
}

/// `continuum` reads a kubeconfig (it has no --kube-url).
fn kubeconfig(dir: &Path, name: &str, url: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("kubeconfig-{name}"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {url}\n\
             users:\n- name: agent\n  user:\n    token: agent\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: agent\n\
             current-context: t\n"
        ),
    )
    .with_context(|| path.display().to_string())?;
    Ok(path)
}

fn spawn_agent(
    reference: &Container,
    dir: &Path,
    region: &str,
    api: &TestApi,
) -> anyhow::Result<AgentProc> {
    let health = procstat::loopback_addr()?;
    let mut args = reference.args_without(&["--health-listen"]);
    args.push(format!("--health-listen={health}"));
    AgentProc::spawn(
        dir,
        &format!("continuum-{region}"),
        &args,
        &[
            ("CONTINUUM_REGION", region.to_string()),
            ("CONTINUUM_IDENTITY", format!("bench-{region}")),
            ("CONTINUUM_LEASE_NAMESPACE", "continuum-system".into()),
            (
                "KUBECONFIG",
                kubeconfig(dir, region, &api.url())?.display().to_string(),
            ),
        ],
    )
}

/// Every Continuum's status in `api` satisfies `f`.
fn all_status(api: &TestApi, n: usize, f: impl Fn(&Value) -> bool) -> bool {
    (0..n).all(|i| {
        api.object(GROUP, "continuums", NS, &format!("app-{i}"))
            .is_some_and(|o| f(&o["status"]))
    })
}

async fn one(
    reference: &Container,
    pki: &Arc<Pki>,
    dir: &Path,
    ttl: u32,
    n: usize,
    idle_s: u64,
) -> anyhow::Result<Figures> {
    let witnesses: Vec<WitnessProc> = (0..3)
        .map(|_| WitnessProc::start(WitnessOpts::default().with_pki(pki.clone())))
        .collect::<anyhow::Result<_>>()?;
    let api_a = region("a", "b", n, pki, &witnesses, ttl).await?;
    let api_b = region("b", "a", n, pki, &witnesses, ttl).await?;
    let limit = Duration::from_secs(60);

    // a first, so it is the one holding every lease.
    let mut a = spawn_agent(reference, dir, "a", &api_a)?;
    let mark_a = CpuMark::new(&[a.pid()]);
    a.wait_for("a primary for every Continuum", limit, || {
        all_status(&api_a, n, |s| s["phase"] == "Primary" && s["epoch"] == 1)
    })
    .await?;
    let startup_a = mark_a.span()[0];
    let startup_peak_a = a.peak_mcores();
    let mut b = spawn_agent(reference, dir, "b", &api_b)?;
    let mark_b = CpuMark::new(&[b.pid()]);
    b.wait_for("b standby for every Continuum", limit, || {
        all_status(&api_b, n, |s| {
            s["phase"] == "Standby" && s["primaryRegion"] == "a"
        })
    })
    .await?;
    let startup_b = mark_b.span()[0];
    let startup_peak_b = b.peak_mcores();
    // Settle (b's first status writes, a's synchronous-standby bookkeeping).
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.ensure_running()?;
    b.ensure_running()?;

    let idle = procstat::idle(&[a.pid(), b.pid()], idle_s).await;
    a.ensure_running()?;
    let (mem_a, mem_b) = (procstat::mem(a.pid()), procstat::mem(b.pid()));

    // Region death: a SIGKILLed, b takes over once the leases run out.
    let fail = CpuMark::new(&[b.pid()]);
    b.reset_peak();
    a.kill();
    b.wait_for("b promoted for every Continuum", limit, || {
        (0..n).all(|i| {
            api_b
                .object(cnpg::GROUP, cnpg::PLURAL, NS, &format!("pg-b-{i}"))
                .is_some_and(|c| c["spec"]["replica"]["primary"] == format!("pg-b-{i}"))
        })
    })
    .await?;
    let promote = fail.span()[0];
    b.wait_for("b recorded Primary for every Continuum", limit, || {
        all_status(&api_b, n, |s| {
            s["phase"] == "Primary" && s["epoch"] == 2 && s["primaryRegion"] == "b"
        })
    })
    .await?;
    let recorded = fail.span()[0];
    let failover_peak_mcores = b.peak_mcores();
    let mem_b_after = procstat::mem(b.pid());
    let forbidden = [&api_a, &api_b]
        .iter()
        .map(|s| s.requests().iter().filter(|r| r.code == 403).count())
        .sum();
    drop(b);
    drop(witnesses);
    Ok(Figures {
        ttl_s: ttl,
        continuums: n,
        startup_a,
        startup_b,
        startup_peak_mcores: (startup_peak_a, startup_peak_b),
        idle_a: idle[0],
        idle_b: idle[1],
        mem_a,
        mem_b,
        promote,
        recorded,
        failover_peak_mcores,
        mem_b_after,
        forbidden,
    })
}
