//! `bench witness`: the witness (embedded store, HTTPS + client certificates,
//! release build) against a real etcd doing the same job, with the same client
//! concurrency, in one run:
//!
//! - renewals: witness `Renew` vs etcd lease keep-alive (both in-memory on the
//!   server side: no fsync per renewal);
//! - acquires: witness `Acquire` of a fresh lease (durable: fsync before the
//!   reply) vs an etcd txn compare-and-swap creating a fresh key (raft commit,
//!   fsync);
//! - the witness's resident memory with 10,000 live leases.
//!
//! Figures only, never pass/fail. `--json` prints one object.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use continuum_shared::lease::{Acquire, Epoch, HolderId, LeaseName, Request, Response};
use continuum_shared::transport::https::TlsMaterial;
use continuum_shared::transport::{witness_transport, LeaseTransport, WitnessProtocol};
use etcd_client::{
    Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
use serde_json::json;
use tokio::time::Instant;

use crate::etcd_proc::EtcdProc;
use crate::pki::Pki;
use crate::witness_proc::{WitnessOpts, WitnessProc};

/// Concurrent workers, the same for the witness and etcd.
const WORKERS: usize = 32;
/// Clients the workers share: HTTPS clients (each a keep-alive HTTP/1.1
/// pool, so up to WORKERS connections in all) / etcd gRPC channels (HTTP/2,
/// multiplexed).
const CONNECTIONS: usize = 4;
/// Length of each measured phase.
const PHASE: Duration = Duration::from_secs(5);
/// Live leases for the memory figure.
const RSS_LEASES: usize = 10_000;

/// Throughput and latency of one phase.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// CPU time the server process spent per operation (user + system).
    pub server_cpu_us_per_op: f64,
    /// CPU time this benchmark client spent per operation.
    pub client_cpu_us_per_op: f64,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One benchmark worker: a prepared connection and the operation it repeats.
/// (Few and long-lived: variant sizes do not matter.)
#[allow(clippy::large_enum_variant)]
enum Worker {
    WitnessRenew {
        t: Arc<dyn LeaseTransport>,
        req: Request,
    },
    WitnessAcquire {
        t: Arc<dyn LeaseTransport>,
        prefix: String,
        holder: HolderId,
        ttl_ms: u64,
        i: u64,
    },
    EtcdRenew {
        keeper: LeaseKeeper,
        stream: LeaseKeepAliveStream,
    },
    EtcdAcquire {
        client: Client,
        prefix: String,
        lease: i64,
        i: u64,
    },
}

impl Worker {
    async fn once(&mut self) -> anyhow::Result<()> {
        match self {
            Worker::WitnessRenew { t, req } => match t.call(req).await? {
                Response::Granted { .. } => Ok(()),
                other => anyhow::bail!("renew refused: {other:?}"),
            },
            Worker::WitnessAcquire {
                t,
                prefix,
                holder,
                ttl_ms,
                i,
            } => {
                *i += 1;
                let req = Request::Acquire(Acquire {
                    name: LeaseName::new(format!("{prefix}/{i}"))?,
                    holder: holder.clone(),
                    epoch: Epoch(1),
                    ttl_ms: *ttl_ms,
                });
                match t.call(&req).await? {
                    Response::Granted { .. } => Ok(()),
                    other => anyhow::bail!("acquire refused: {other:?}"),
                }
            }
            Worker::EtcdRenew { keeper, stream } => {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => Ok(()),
                    other => anyhow::bail!("keep-alive failed: {other:?}"),
                }
            }
            Worker::EtcdAcquire {
                client,
                prefix,
                lease,
                i,
            } => {
                *i += 1;
                let key = format!("{prefix}/{i}");
                let txn = Txn::new()
                    .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then(vec![TxnOp::put(
                        key,
                        "holder",
                        Some(PutOptions::new().with_lease(*lease)),
                    )]);
                let r = client.txn(txn).await?;
                anyhow::ensure!(r.succeeded(), "compare-and-swap lost");
                Ok(())
            }
        }
    }
}

/// utime + stime of `pid` in seconds (from /proc/<pid>/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields in `rest` start at field 3 (state); utime = 14 -> index 11.
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs every worker in a loop for `PHASE`, all starting together;
/// `server` is the pid whose CPU time is charged to the operations.
async fn phase(workers: Vec<Worker>, server: u32) -> anyhow::Result<Figures> {
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + PHASE;
    let mut tasks = Vec::new();
    for mut w in workers {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(16 * 1024);
            let mut errors = 0u64;
            tokio::time::sleep_until(start).await;
            while Instant::now() < end {
                let t0 = Instant::now();
                match w.once().await {
                    Ok(()) => lat.push(t0.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep_until(start).await;
    let (s0, c0) = (cpu_seconds(server), cpu_seconds(std::process::id()));
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        all.extend(lat);
        errors += e;
    }
    let (s1, c1) = (cpu_seconds(server), cpu_seconds(std::process::id()));
    all.sort_unstable();
    let per_op = |d: f64| d * 1e6 / (all.len().max(1) as f64);
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i].as_secs_f64() * 1000.0
    };
    Ok(Figures {
        server_cpu_us_per_op: per_op(s1 - s0),
        client_cpu_us_per_op: per_op(c1 - c0),
        ops: all.len() as u64,
        errors,
        ops_per_s: all.len() as f64 / PHASE.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

fn tls(pki: &Pki) -> TlsMaterial {
    TlsMaterial {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        cert_pem: pki.client.cert_pem.clone().into_bytes(),
        key_pem: pki.client.key_pem.clone().into_bytes(),
    }
}

/// `CONNECTIONS` clients of the witness: lease stream clients (one
/// pipelined connection each, like etcd's channels) or HTTPS clients (a
/// keep-alive HTTP/1.1 pool each).
fn transports(
    w: &WitnessProc,
    protocol: WitnessProtocol,
) -> anyhow::Result<Vec<Arc<dyn LeaseTransport>>> {
    (0..CONNECTIONS)
        .map(|_| {
            Ok(witness_transport(
                protocol,
                &w.api_url(),
                &tls(w.pki()),
                Duration::from_secs(5),
            )?)
        })
        .collect()
}

/// The witness binary, built on demand under `cargo run` (see [`crate::bins`]).
fn ensure_release_witness() -> anyhow::Result<()> {
    crate::witness_proc::witness_bin().map(|_| ())
}

/// The pid of the witness serving `api_url`, found by its command line.
fn witness_pid(port: u16) -> anyhow::Result<u32> {
    let needle = format!("--api-listen=127.0.0.1:{port}");
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("continuum-witness") && cmdline.split('\0').any(|a| a == needle) {
            return Ok(pid);
        }
    }
    anyhow::bail!("no witness process listening on port {port}")
}

/// The pid of the etcd serving `etcd.endpoint()`.
fn etcd_pid(etcd: &EtcdProc) -> anyhow::Result<u32> {
    let needle = format!("--listen-client-urls={}", etcd.endpoint());
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == needle)
        {
            return Ok(pid);
        }
    }
    anyhow::bail!("no etcd process for {}", etcd.endpoint())
}

/// VmRSS of `pid` in MiB.
fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status")))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn holder(w: usize) -> anyhow::Result<HolderId> {
    Ok(HolderId::new(format!("bench-{w}"))?)
}

async fn witness_renew(w: &WitnessProc, protocol: WitnessProtocol) -> anyhow::Result<Figures> {
    let ts = transports(w, protocol)?;
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let t = Arc::clone(&ts[i % CONNECTIONS]);
        let a = Acquire {
            name: LeaseName::new(format!("bench/renew-{protocol}/{i}"))?,
            holder: holder(i)?,
            epoch: Epoch(1),
            ttl_ms: 30_000,
        };
        match t.call(&Request::Acquire(a.clone())).await? {
            Response::Granted { .. } => {}
            other => anyhow::bail!("setup acquire refused: {other:?}"),
        }
        workers.push(Worker::WitnessRenew {
            t,
            req: Request::Renew(a),
        });
    }
    phase(workers, witness_pid(w.api_addr().port())?).await
}

async fn witness_acquire(
    w: &WitnessProc,
    protocol: WitnessProtocol,
    tag: &str,
    ttl_ms: u64,
) -> anyhow::Result<Figures> {
    let ts = transports(w, protocol)?;
    let workers = (0..WORKERS)
        .map(|i| {
            Ok(Worker::WitnessAcquire {
                t: Arc::clone(&ts[i % CONNECTIONS]),
                prefix: format!("bench/{tag}/{i}"),
                holder: holder(i)?,
                ttl_ms,
                i: 0,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    phase(workers, witness_pid(w.api_addr().port())?).await
}

async fn etcd_clients(etcd: &EtcdProc) -> anyhow::Result<Vec<Client>> {
    let mut cs = Vec::new();
    for _ in 0..CONNECTIONS {
        cs.push(Client::connect([etcd.endpoint()], None).await?);
    }
    Ok(cs)
}

async fn etcd_renew(etcd: &EtcdProc) -> anyhow::Result<Figures> {
    let cs = etcd_clients(etcd).await?;
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let mut c = cs[i % CONNECTIONS].clone();
        let lease = c.lease_grant(30, None).await?.id();
        let (keeper, stream) = c.lease_keep_alive(lease).await?;
        workers.push(Worker::EtcdRenew { keeper, stream });
    }
    phase(workers, etcd_pid(etcd)?).await
}

async fn etcd_acquire(etcd: &EtcdProc) -> anyhow::Result<Figures> {
    let cs = etcd_clients(etcd).await?;
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let mut c = cs[i % CONNECTIONS].clone();
        let lease = c.lease_grant(60, None).await?.id();
        workers.push(Worker::EtcdAcquire {
            client: c,
            prefix: format!("/bench/acquire/{i}"),
            lease,
            i: 0,
        });
    }
    phase(workers, etcd_pid(etcd)?).await
}

/// Diagnostics: the five mappings with the most resident memory.
fn print_largest_mappings(pid: u32) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut current = String::new();
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Rss:") {
            let kb = kb
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            maps.push((kb, current.clone()));
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            current = line.to_string();
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    for (kb, m) in maps.iter().take(5) {
        eprintln!("rss {kb:>8} kB  {m}");
    }
}

/// Acquires `RSS_LEASES` long-lived leases on a fresh witness and reads its
/// resident memory before and after.
async fn witness_rss() -> anyhow::Result<(f64, f64)> {
    let w = tokio::task::spawn_blocking(|| WitnessProc::start(WitnessOpts::default())).await??;
    let pid = witness_pid(w.api_addr().port())?;
    let ts = transports(&w, WitnessProtocol::Stream)?;
    // One request first so the idle figure includes a TLS session.
    let probe = Request::Read(continuum_shared::lease::Read {
        name: LeaseName::new("bench/probe")?,
    });
    ts[0].call(&probe).await?;
    let idle = rss_mb(pid)?;
    let per = RSS_LEASES / WORKERS;
    let mut tasks = Vec::new();
    for i in 0..WORKERS {
        let t = Arc::clone(&ts[i % CONNECTIONS]);
        let n = if i == WORKERS - 1 {
            RSS_LEASES - per * (WORKERS - 1)
        } else {
            per
        };
        let holder = holder(i)?;
        tasks.push(tokio::spawn(async move {
            for j in 0..n {
                let req = Request::Acquire(Acquire {
                    name: LeaseName::new(format!("bench/rss/{i}/{j}"))?,
                    holder: holder.clone(),
                    epoch: Epoch(1),
                    ttl_ms: 600_000,
                });
                match t.call(&req).await? {
                    Response::Granted { .. } => {}
                    other => anyhow::bail!("acquire refused: {other:?}"),
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let loaded = rss_mb(pid)?;
    if std::env::var_os("CONTINUUM_BENCH_SMAPS").is_some() {
        print_largest_mappings(pid);
    }
    drop(w);
    Ok((idle, loaded))
}

pub async fn run(json_out: bool) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(ensure_release_witness).await??;
    let (pki, etcd) = tokio::task::spawn_blocking(|| -> anyhow::Result<_> {
        Ok((Arc::new(Pki::generate()?), EtcdProc::start()?))
    })
    .await??;
    let w = {
        let pki = Arc::clone(&pki);
        tokio::task::spawn_blocking(move || {
            WitnessProc::start(WitnessOpts::default().with_pki(pki))
        })
        .await??
    };

    let w_renew = witness_renew(&w, WitnessProtocol::Stream).await?;
    let w_acq = witness_acquire(&w, WitnessProtocol::Stream, "acquire", 30_000).await?;
    let h_renew = witness_renew(&w, WitnessProtocol::Https).await?;
    let h_acq = witness_acquire(&w, WitnessProtocol::Https, "acquire-https", 30_000).await?;
    let e_renew = etcd_renew(&etcd).await?;
    let e_acq = etcd_acquire(&etcd).await?;
    drop(w);
    let (rss_idle, rss_10k) = witness_rss().await?;

    let renew_ratio = w_renew.ops_per_s / e_renew.ops_per_s;
    let https_ratio = h_renew.ops_per_s / e_renew.ops_per_s;
    let figures = |f: &Figures, a: &Figures| {
        json!({
            "renew_ops_per_s": round(f.ops_per_s),
            "renew_p50_ms": round(f.p50_ms),
            "renew_p99_ms": round(f.p99_ms),
            "renew_errors": f.errors,
            "renew_server_cpu_us_per_op": round(f.server_cpu_us_per_op),
            "renew_client_cpu_us_per_op": round(f.client_cpu_us_per_op),
            "acquire_ops_per_s": round(a.ops_per_s),
            "acquire_p50_ms": round(a.p50_ms),
            "acquire_p99_ms": round(a.p99_ms),
            "acquire_errors": a.errors,
            "acquire_server_cpu_us_per_op": round(a.server_cpu_us_per_op),
        })
    };
    if json_out {
        let mut witness = figures(&w_renew, &w_acq);
        witness["protocol"] = json!("stream");
        witness["rss_mb_idle"] = json!(round(rss_idle));
        witness["rss_mb_10k_leases"] = json!(round(rss_10k));
        let mut witness_https = figures(&h_renew, &h_acq);
        witness_https["protocol"] = json!("https");
        let obj = json!({
            "workers": WORKERS,
            "connections": CONNECTIONS,
            "phase_s": PHASE.as_secs_f64(),
            "witness": witness,
            "witness_https": witness_https,
            "etcd": figures(&e_renew, &e_acq),
            "renew_ratio_witness_over_etcd": round(renew_ratio),
            "renew_ratio_witness_https_over_etcd": round(https_ratio),
        });
        println!("{obj}");
    } else {
        println!(
            "witness benchmark: {WORKERS} concurrent workers sharing {CONNECTIONS} clients, {}s per phase",
            PHASE.as_secs()
        );
        println!(
            "{:<28} {:>14} {:>14} {:>14}",
            "", "witness stream", "witness https", "etcd"
        );
        let row = |what: &str, f: &dyn Fn(&Figures) -> f64, a: [&Figures; 3]| {
            println!(
                "{what:<28} {:>14.1} {:>14.1} {:>14.1}",
                f(a[0]),
                f(a[1]),
                f(a[2])
            )
        };
        let row3 = |what: &str, f: &dyn Fn(&Figures) -> f64, a: [&Figures; 3]| {
            println!(
                "{what:<28} {:>14.3} {:>14.3} {:>14.3}",
                f(a[0]),
                f(a[1]),
                f(a[2])
            )
        };
        let renew = [&w_renew, &h_renew, &e_renew];
        let acq = [&w_acq, &h_acq, &e_acq];
        row("renewals/s", &|f| f.ops_per_s, renew);
        row3("renew p50 ms", &|f| f.p50_ms, renew);
        row3("renew p99 ms", &|f| f.p99_ms, renew);
        row("renew server CPU us/op", &|f| f.server_cpu_us_per_op, renew);
        row("renew client CPU us/op", &|f| f.client_cpu_us_per_op, renew);
        row("acquires/s", &|f| f.ops_per_s, acq);
        row3("acquire p50 ms", &|f| f.p50_ms, acq);
        row3("acquire p99 ms", &|f| f.p99_ms, acq);
        row("acquire server CPU us/op", &|f| f.server_cpu_us_per_op, acq);
        println!(
            "{:<28} {:>14} {:>14} {:>14}",
            "errors (renew/acquire)",
            format!("{}/{}", w_renew.errors, w_acq.errors),
            format!("{}/{}", h_renew.errors, h_acq.errors),
            format!("{}/{}", e_renew.errors, e_acq.errors)
        );
        println!(
            "renewals/s ratio witness/etcd: stream {renew_ratio:.2}, https {https_ratio:.2} (target >= 3, with p99 <= etcd's)"
        );
        println!(
            "witness RSS: {rss_idle:.1} MiB idle, {rss_10k:.1} MiB with {RSS_LEASES} live leases (target <= 30)"
        );
    }
    Ok(())
}
