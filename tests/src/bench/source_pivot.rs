//! `bench source-pivot`: the source watcher (`continuum-agent pivot
//! watch-sources`, the Deployment of manifests/components/source-pivot, with
//! its args; only the health listener is the bench's) as a separate process
//! against the test API server (served from this process) loaded with
//! manifests/rbac/source-pivot.yaml, watching `CONTINUUM_BENCH_SOURCES`
//! (default 50) Flux sources: HelmRepository, OCIRepository and GitRepository
//! in turn, every one pointing outside the Sovereign at first.
//!
//! Figures: CPU per second over an idle window (every source watched and
//! reported external, nothing changing), then two bursts: the pivot (step 06's
//! live patch: every source's URL moved inside the Sovereign, until /status
//! lists none outside) and the revert (Flux re-applying the old URLs from Git:
//! until /status lists every source as reverted, one Warning Event each):
//! CPU-seconds, average and highest rate over a 100 ms window; RSS. Printed
//! next to the manifest's requests and limits.
//!
//! `pivot sources` (the one-shot Git rewrite run by an operator, not a
//! workload) is not measured here.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use continuum_agent::source_pivot::watch::SOURCE_KINDS;
use continuum_testapi::{ResourceSpec, TestApi};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

use super::manifest;
use super::procstat::{self, AgentProc, CpuMark, CpuSpan};

const NS: &str = "flux-system";
const LOCAL_HOSTS: &str = "harbor.bench.example.org,.svc.cluster.local";

fn sources() -> usize {
    std::env::var("CONTINUUM_BENCH_SOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Source `i`: its kind's ApiResource, name, URL outside and URL inside the Sovereign.
fn source(i: usize) -> (ApiResource, String, String, String) {
    let (g, v, k, p) = SOURCE_KINDS[i % SOURCE_KINDS.len()];
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), p);
    let name = format!("src-{i}");
    let (outside, inside) = if k == "GitRepository" {
        (
            format!("https://github.com/openova-io/repo-{i}.git"),
            format!("http://gitea-http.gitea.svc.cluster.local:3000/openova/repo-{i}.git"),
        )
    } else {
        (
            format!("oci://ghcr.io/openova-io/chart-{i}"),
            format!("oci://harbor.bench.example.org/openova-io/chart-{i}"),
        )
    };
    (ar, name, outside, inside)
}

fn status(health: SocketAddr) -> Option<Value> {
    let (code, body) = crate::witness_proc::http_get(health, "/status").ok()?;
    (code == 200).then_some(())?;
    serde_json::from_str(body.trim()).ok()
}

fn count(doc: &Option<Value>, key: &str) -> Option<usize> {
    doc.as_ref()?[key].as_array().map(Vec::len)
}

/// Sets every source's URL to the outside (`inside == false`) or inside one.
async fn set_all(admin: &kube::Client, inside: bool) -> anyhow::Result<()> {
    for i in 0..sources() {
        let (ar, name, outside, local) = source(i);
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &ar);
        let url = if inside { local } else { outside };
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"url": url}})),
        )
        .await?;
    }
    Ok(())
}

struct Burst {
    cpu: CpuSpan,
    peak_mcores: f64,
}

pub async fn run(json_out: bool) -> anyhow::Result<()> {
    let reference = manifest::container(
        "manifests/components/source-pivot/source-pivot.yaml",
        "Deployment",
        "continuum-source-pivot",
        "source-pivot",
    )?;
    let idle_s = procstat::idle_s(60);
    // Built (under cargo) and found before anything is timed.
    crate::bins::workspace_bin("continuum-agent")?;
    let n = sources();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let srv = TestApi::start_with_role(&root.join("manifests/rbac/source-pivot.yaml")).await?;
    for (g, v, k, p) in SOURCE_KINDS {
        srv.register(ResourceSpec::new(g, v, p, k, true, true));
    }
    let admin = srv.admin_client()?;
    for i in 0..n {
        let (ar, name, outside, _) = source(i);
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &ar);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": ar.api_version, "kind": ar.kind,
                "metadata": {"name": name, "namespace": NS},
                "spec": {"url": outside, "interval": "10m"},
            }))?,
        )
        .await?;
    }

    let dir = tempfile::tempdir()?;
    let health = procstat::loopback_addr()?;
    let mut args = reference.args_without(&["--health-addr"]);
    args.extend([
        format!("--health-addr={health}"),
        format!("--kube-url={}", srv.url()),
        "--kube-token=agent".into(),
    ]);
    let started = Instant::now();
    let mut agent = AgentProc::spawn(
        dir.path(),
        "source-pivot",
        &args,
        &[
            ("CONTINUUM_LOCAL_HOSTS", LOCAL_HOSTS.to_string()),
            ("POD_NAME", "bench-source-pivot".to_string()),
        ],
    )?;
    let limit = Duration::from_secs(60);
    agent
        .wait_for("every source listed as external", limit, || {
            let s = status(health);
            s.as_ref().is_some_and(|s| s["sources"] == n) && count(&s, "external") == Some(n)
        })
        .await?;
    let startup_s = started.elapsed().as_secs_f64();
    let startup_cpu = procstat::cpu_s(agent.pid()).unwrap_or(f64::NAN);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = procstat::idle(&[agent.pid()], idle_s).await[0];
    agent.ensure_running()?;
    let mem_idle = procstat::mem(agent.pid());

    // Step 06's live patch.
    let mark = CpuMark::new(&[agent.pid()]);
    agent.reset_peak();
    set_all(&admin, true).await?;
    agent
        .wait_for("no source outside", limit, || {
            count(&status(health), "external") == Some(0)
        })
        .await?;
    let pivot = Burst {
        cpu: mark.span()[0],
        peak_mcores: agent.peak_mcores(),
    };
    // Flux re-applies the old URLs: every source reverted, one Warning Event each.
    let mark = CpuMark::new(&[agent.pid()]);
    agent.reset_peak();
    set_all(&admin, false).await?;
    let reverted_events = || {
        srv.objects("events.k8s.io", "events")
            .iter()
            .filter(|e| e["reason"] == "SourcePivotReverted")
            .count()
    };
    agent
        .wait_for("every source reverted and its Warning Event", limit, || {
            count(&status(health), "reverted") == Some(n) && reverted_events() >= n
        })
        .await?;
    let revert = Burst {
        cpu: mark.span()[0],
        peak_mcores: agent.peak_mcores(),
    };
    let mem = procstat::mem(agent.pid());
    let forbidden = srv.requests().iter().filter(|r| r.code == 403).count();
    drop(agent);

    let burst_json = |b: &Burst| json!({"cpu_s": b.cpu.cpu_s, "wall_s": b.cpu.wall_s, "mcores": b.cpu.mcores(), "peak_100ms_mcores": b.peak_mcores});
    if json_out {
        println!(
            "{}",
            json!({
                "bench": "source-pivot", "reference": reference.json(), "machine": "shared 2-core",
                "sources": n, "startup_s": startup_s, "cpu_startup_s": startup_cpu,
                "idle_window_s": idle_s, "cpu_idle_mcores": idle.mcores(), "rss_idle_mib": mem_idle.rss_mib,
                "pivot": burst_json(&pivot), "revert": burst_json(&revert),
                "rss_mib": mem.rss_mib, "rss_peak_mib": mem.peak_mib, "forbidden_requests": forbidden,
            })
        );
        return Ok(());
    }
    println!("source-pivot: `continuum-agent pivot watch-sources` (args of {}) as a separate process against the test API server, {n} Flux sources; shared 2-core machine", reference.manifest);
    println!("  reference: {}", reference.line());
    println!("  start to every source listed: {startup_s:.2} s, {startup_cpu:.2} CPU-s");
    println!(
        "  idle ({idle_s} s, {n} sources watched, all external): {:.2} millicores, RSS {:.1} MiB",
        idle.mcores(),
        mem_idle.rss_mib
    );
    for (what, b) in [
        ("pivot (every URL moved inside)", &pivot),
        ("revert (every URL back, one Warning Event each)", &revert),
    ] {
        println!(
            "  {what}: {:.2} s, {:.3} CPU-s = {:.1} millicores average, peak {:.0} m over 100 ms",
            b.cpu.wall_s,
            b.cpu.cpu_s,
            b.cpu.mcores(),
            b.peak_mcores
        );
    }
    println!(
        "  RSS after: {:.1} MiB, peak {:.1} MiB; 403 answers: {forbidden}",
        mem.rss_mib, mem.peak_mib
    );
    // Bursts shorter than a 100 ms window have no peak: their average stands in.
    let burst = |b: &Burst| {
        if b.peak_mcores.is_nan() {
            b.cpu.mcores()
        } else {
            b.peak_mcores
        }
    };
    let [cpu, mem] = reference.compare(idle.mcores(), burst(&pivot).max(burst(&revert)), mem);
    println!("  vs manifest (burst = peak over 100 ms, or the average of a shorter burst):");
    println!("    {cpu}");
    println!("    {mem}");
    Ok(())
}
