//! What a benchmarked process costs, read from /proc: CPU seconds (utime +
//! stime from /proc/<pid>/stat, in USER_HZ ticks: 10 ms on Linux), resident
//! memory (VmRSS, peak VmHWM from /proc/<pid>/status), and CPU per second over
//! an idle window. Also [`AgentProc`]: one `continuum-agent` mode as its own
//! process, output in a log file, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A `kB` field of /proc/<pid>/status (`VmRSS:`, `VmHWM:`).
pub fn rss_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds (user + system) the process has used, from /proc/<pid>/stat.
pub fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

/// USER_HZ (`getconf CLK_TCK`; 100 on every Linux this runs on).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Idle window in seconds: `CONTINUUM_BENCH_IDLE_S`, else `default`. /proc
/// counts CPU in 10 ms ticks, so 60 s resolve 0.17 millicores, 30 s 0.33.
pub fn idle_s(default: u64) -> u64 {
    std::env::var("CONTINUUM_BENCH_IDLE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory now and at its peak, MiB.
#[derive(Debug, Clone, Copy)]
pub struct Mem {
    pub rss_mib: f64,
    pub peak_mib: f64,
}

pub fn mem(pid: u32) -> Mem {
    let mib = |field| rss_kb(pid, field).map_or(f64::NAN, |kb| kb as f64 / 1024.0);
    Mem {
        rss_mib: mib("VmRSS:"),
        peak_mib: mib("VmHWM:"),
    }
}

/// CPU spent over a stretch of wall time: a sample at the start, one at the end.
#[derive(Debug, Clone, Copy)]
pub struct CpuSpan {
    pub cpu_s: f64,
    pub wall_s: f64,
}

impl CpuSpan {
    /// Average over the span, millicores (1000 = one core busy).
    pub fn mcores(&self) -> f64 {
        self.cpu_s / self.wall_s * 1000.0
    }
}

/// A CPU sample of several processes at once, closed with [`CpuMark::span`].
pub struct CpuMark {
    at: Instant,
    cpu: Vec<Option<f64>>,
    pids: Vec<u32>,
}

impl CpuMark {
    pub fn new(pids: &[u32]) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            cpu: pids.iter().map(|p| cpu_s(*p)).collect(),
            pids: pids.to_vec(),
        }
    }

    /// What each process (in the order given to [`CpuMark::new`]) spent since the mark.
    pub fn span(&self) -> Vec<CpuSpan> {
        let wall_s = self.at.elapsed().as_secs_f64();
        self.pids
            .iter()
            .zip(&self.cpu)
            .map(|(p, c0)| CpuSpan {
                cpu_s: c0.zip(cpu_s(*p)).map_or(f64::NAN, |(a, b)| b - a),
                wall_s,
            })
            .collect()
    }
}

/// Each process's CPU over `secs` seconds of doing nothing new.
pub async fn idle(pids: &[u32], secs: u64) -> Vec<CpuSpan> {
    let mark = CpuMark::new(pids);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    mark.span()
}

/// One `continuum-agent` mode as its own process (the binary of this
/// executable's profile, see [`crate::bins`]), stdout and stderr in a log
/// file; SIGKILLed on drop.
pub struct AgentProc {
    child: Child,
    log: PathBuf,
    pid: u32,
    peak: Peak,
}

/// The highest CPU rate seen over windows of at least [`PEAK_WINDOW`] while
/// [`AgentProc::wait_for`] polls (CFS throttles per 100 ms period, so a limit
/// below this peak would stretch the burst).
#[derive(Default)]
struct Peak {
    last: Option<(Instant, f64)>,
    max_mcores: f64,
    windows: usize,
}

/// Window of the peak CPU rate: 100 ms, ten /proc ticks (one tick = 100 m).
pub const PEAK_WINDOW: Duration = Duration::from_millis(100);

impl AgentProc {
    pub fn spawn(
        dir: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<AgentProc> {
        let bin = crate::bins::workspace_bin("continuum-agent")?;
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let child = Command::new(&bin)
            .args(args)
            .env("CONTINUUM_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child.id();
        Ok(AgentProc {
            child,
            log,
            pid,
            peak: Peak::default(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails with the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "agent exited with {status}:\n{}",
                crate::witness_proc::tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Waits (up to `limit`) until `cond` holds, failing early if the process exits.
    pub async fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while !cond() {
            self.ensure_running()?;
            self.sample_peak();
            anyhow::ensure!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; agent log:\n{}",
                crate::witness_proc::tail(&self.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.sample_peak();
        Ok(start.elapsed())
    }

    fn sample_peak(&mut self) {
        let (now, Some(cpu)) = (Instant::now(), cpu_s(self.pid)) else {
            return;
        };
        match self.peak.last {
            Some((t, c)) if now - t >= PEAK_WINDOW => {
                let rate = (cpu - c) / (now - t).as_secs_f64() * 1000.0;
                self.peak.max_mcores = self.peak.max_mcores.max(rate);
                self.peak.windows += 1;
                self.peak.last = Some((now, cpu));
            }
            Some(_) => {}
            None => self.peak.last = Some((now, cpu)),
        }
    }

    /// Starts a new peak measurement (the next [`AgentProc::wait_for`] calls feed it).
    pub fn reset_peak(&mut self) {
        self.peak = Peak::default();
        self.sample_peak();
    }

    /// Highest CPU rate over a 100 ms window since [`AgentProc::reset_peak`],
    /// millicores; NaN when the burst was over before one window (a 0 there
    /// would read as "no CPU").
    pub fn peak_mcores(&self) -> f64 {
        if self.peak.windows == 0 {
            return f64::NAN;
        }
        self.peak.max_mcores
    }

    /// Waits until `/metrics` on `health` answers 200.
    pub async fn wait_metrics(&mut self, health: SocketAddr) -> anyhow::Result<()> {
        self.wait_for("/metrics", Duration::from_secs(30), || {
            matches!(
                crate::witness_proc::http_get(health, "/metrics"),
                Ok((200, _))
            )
        })
        .await
        .map(drop)
    }

    /// Region death: SIGKILL, no clean-up of any kind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback address with a free port, for an agent's health listener.
pub fn loopback_addr() -> anyhow::Result<SocketAddr> {
    Ok(([127, 0, 0, 1], crate::witness_proc::free_port()?).into())
}
