//! Debian's Prometheus (`/usr/bin/prometheus`) as a process for tests, and
//! the inventory of metric names the binaries export, which alert rules and
//! the Grafana dashboard are checked against.
//!
//! ```no_run
//! use continuum_tests::prometheus_proc::{PrometheusProc, ScrapeJob};
//! let p = PrometheusProc::start(&[ScrapeJob::new("witness", "127.0.0.1:7080")])?;
//! let v = p.query("up{job=\"witness\"}")?;   // the `data.result` array
//! # anyhow::Ok(())
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::witness_proc::{free_port, http_get, tail};

/// Repository root (the workspace).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Every metric name the binaries register: the `"continuum_..."` string
/// literals in agent/, witness/ and shared/ sources (each metric is created
/// from one such literal).
pub fn code_metric_names() -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for dir in ["agent/src", "witness/src", "shared/src"] {
        collect_literals(&repo_root().join(dir), &mut names)?;
    }
    Ok(names)
}

fn collect_literals(dir: &Path, names: &mut BTreeSet<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_literals(&path, names)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)?;
            for (i, _) in text.match_indices("\"continuum_") {
                let rest = &text[i + 1..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                if rest[end..].starts_with('"') {
                    names.insert(rest[..end].to_string());
                }
            }
        }
    }
    Ok(())
}

/// Metric names (`continuum_...`) a PromQL expression reads, with the
/// histogram series suffixes mapped back to the metric.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("continuum_") {
        let start = i + off;
        let preceded_by_ident = start > 0
            && (bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b'"'
                || bytes[start - 1] == b'-');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if !preceded_by_ident {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Whether `series` (as written in PromQL) is one of `metrics`, counting a
/// histogram's `_bucket`, `_sum` and `_count` series as the histogram.
pub fn is_known(series: &str, metrics: &BTreeSet<String>) -> bool {
    metrics.contains(series)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            series
                .strip_suffix(s)
                .is_some_and(|base| metrics.contains(base))
        })
}

/// One static scrape job.
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    pub name: String,
    pub target: String,
}

impl ScrapeJob {
    pub fn new(name: impl Into<String>, target: impl Into<String>) -> Self {
        ScrapeJob {
            name: name.into(),
            target: target.into(),
        }
    }
}

/// A Prometheus server on a free loopback port with temporary storage,
/// scraping the given jobs every second. Killed on drop.
pub struct PrometheusProc {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrometheusProc {
    pub fn binary() -> PathBuf {
        std::env::var_os("CONTINUUM_PROMETHEUS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"))
    }

    /// Starts Prometheus and waits (up to 30 s) until it is ready.
    pub fn start(jobs: &[ScrapeJob]) -> anyhow::Result<PrometheusProc> {
        let dir = tempfile::Builder::new()
            .prefix("continuum-prometheus-")
            .tempdir()?;
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for j in jobs {
            config.push_str(&format!(
                "  - job_name: {:?}\n    static_configs:\n      - targets: [{:?}]\n",
                j.name, j.target
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(Self::binary())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", Self::binary().display()))?;
        let mut p = PrometheusProc {
            child: Some(child),
            dir,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(p.addr(), "/-/ready") {
                return Ok(p);
            }
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                p.child = None;
                bail!("prometheus exited with {status}:\n{}", p.log_tail());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s:\n{}", p.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("prometheus.log"), 30)
    }

    /// Instant query through the HTTP API: the `data.result` array.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = http_get(self.addr(), &path)?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: HTTP {status}: {body}"))?;
        if v["status"] != "success" {
            bail!("query {promql:?} failed: {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for PrometheusProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_names_skip_label_values_and_keep_series() {
        let e = r#"sum by (job) (increase(continuum_a_total{job="continuum_b"}[5m])) > 0
            or histogram_quantile(0.99, rate(continuum_c_seconds_bucket[1m]))"#;
        let names: Vec<String> = promql_metric_names(e).into_iter().collect();
        assert_eq!(names, ["continuum_a_total", "continuum_c_seconds_bucket"]);
        let known: BTreeSet<String> = ["continuum_c_seconds".to_string()].into();
        assert!(is_known("continuum_c_seconds_bucket", &known));
        assert!(!is_known("continuum_c_secondsx", &known));
    }

    #[test]
    fn code_inventory_has_metrics_of_every_binary() {
        let names = code_metric_names().expect("scan sources");
        for m in [
            "continuum_agent_leader",
            "continuum_witness_grants_total",
            "continuum_peer_state",
        ] {
            assert!(names.contains(m), "{m} missing from {names:?}");
        }
    }
}
