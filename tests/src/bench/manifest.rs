//! The reference a controller bench compares with: the shipped manifest's
//! container (its args, run as the bench's agent, and its resource requests
//! and limits, printed next to what was measured), read from the YAML in the
//! same run, so a drift between manifest and measurement shows.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};

/// A workload's container as the manifest declares it.
#[derive(Debug, Clone)]
pub struct Container {
    /// `manifests/...`, relative to the repository root.
    pub manifest: String,
    pub args: Vec<String>,
    pub resources: Resources,
}

/// Requests and limits in millicores and MiB.
#[derive(Debug, Clone, Copy)]
pub struct Resources {
    pub cpu_request_m: f64,
    pub cpu_limit_m: f64,
    pub mem_request_mib: f64,
    pub mem_limit_mib: f64,
}

/// The container `container` of the workload `kind`/`name` in `manifest`
/// (a path below the repository root, multi-document YAML).
pub fn container(
    manifest: &str,
    kind: &str,
    name: &str,
    container: &str,
) -> anyhow::Result<Container> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(manifest);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value =
            serde::Deserialize::deserialize(doc).with_context(|| manifest.to_string())?;
        if v["kind"] != kind || v["metadata"]["name"] != name {
            continue;
        }
        let c = v["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == container)
            .with_context(|| format!("{manifest}: {kind}/{name} has no container {container}"))?;
        let args = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().map(String::from).context("non-string arg"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let r = &c["resources"];
        let q = |kind: &str, res: &str| -> anyhow::Result<f64> {
            let raw = &r[kind][res];
            let s = raw
                .as_str()
                .map(String::from)
                .or_else(|| raw.as_f64().map(|n| n.to_string()))
                .with_context(|| format!("{manifest}: no resources.{kind}.{res}"))?;
            if res == "cpu" {
                millicores(&s)
            } else {
                mebibytes(&s)
            }
            .with_context(|| format!("{manifest}: resources.{kind}.{res} {s:?}"))
        };
        return Ok(Container {
            manifest: manifest.to_string(),
            args,
            resources: Resources {
                cpu_request_m: q("requests", "cpu")?,
                cpu_limit_m: q("limits", "cpu")?,
                mem_request_mib: q("requests", "memory")?,
                mem_limit_mib: q("limits", "memory")?,
            },
        });
    }
    anyhow::bail!("{manifest}: no {kind}/{name}")
}

/// A Kubernetes CPU quantity (`20m`, `0.5`, `2`) in millicores.
pub fn millicores(q: &str) -> Option<f64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| c * 1000.0),
    }
}

/// A Kubernetes memory quantity (`64Mi`, `1Gi`, `128M`, bytes) in MiB.
pub fn mebibytes(q: &str) -> Option<f64> {
    const MIB: f64 = 1024.0 * 1024.0;
    let units: [(&str, f64); 6] = [
        ("Ki", 1024.0),
        ("Mi", MIB),
        ("Gi", 1024.0 * MIB),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| n * factor / MIB);
        }
    }
    q.parse::<f64>().ok().map(|b| b / MIB)
}

impl Container {
    /// The manifest's args without the flags the bench sets itself (`--flag=value`
    /// or `--flag value`), so the agent runs exactly what is shipped otherwise.
    pub fn args_without(&self, flags: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let mut skip_value = false;
        for a in &self.args {
            if std::mem::take(&mut skip_value) {
                continue;
            }
            let flag = a.split_once('=').map_or(a.as_str(), |(f, _)| f);
            if flags.contains(&flag) {
                skip_value = !a.contains('=');
                continue;
            }
            out.push(a.clone());
        }
        out
    }

    /// Measured figures against this container's requests and limits: one
    /// line for CPU, one for memory.
    pub fn compare(
        &self,
        idle_mcores: f64,
        burst_mcores: f64,
        mem: crate::bench::procstat::Mem,
    ) -> [String; 2] {
        let r = &self.resources;
        let pct = |x: f64, of: f64| x / of * 100.0;
        [
            format!(
                "CPU: idle {idle_mcores:.2} m = {:.1}% of the {:.0}m request; burst {burst_mcores:.0} m = {:.0}% of the request, {:.0}% of the {:.0}m limit",
                pct(idle_mcores, r.cpu_request_m),
                r.cpu_request_m,
                pct(burst_mcores, r.cpu_request_m),
                pct(burst_mcores, r.cpu_limit_m),
                r.cpu_limit_m
            ),
            format!(
                "memory: RSS {:.1} MiB, peak {:.1} MiB = {:.0}% of the {:.0}Mi request, {:.0}% of the {:.0}Mi limit",
                mem.rss_mib,
                mem.peak_mib,
                pct(mem.peak_mib, r.mem_request_mib),
                r.mem_request_mib,
                pct(mem.peak_mib, r.mem_limit_mib),
                r.mem_limit_mib
            ),
        ]
    }

    /// The reference in `--json` output.
    pub fn json(&self) -> Value {
        let r = &self.resources;
        json!({
            "manifest": self.manifest,
            "cpu_request_mcores": r.cpu_request_m, "cpu_limit_mcores": r.cpu_limit_m,
            "memory_request_mib": r.mem_request_mib, "memory_limit_mib": r.mem_limit_mib,
        })
    }

    /// `manifests/x.yaml: requests cpu 20m memory 64Mi, limits cpu 500m memory 128Mi`.
    pub fn line(&self) -> String {
        let r = &self.resources;
        format!(
            "{}: requests cpu {:.0}m memory {:.0}Mi, limits cpu {:.0}m memory {:.0}Mi",
            self.manifest, r.cpu_request_m, r.mem_request_mib, r.cpu_limit_m, r.mem_limit_mib
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(millicores("20m"), Some(20.0));
        assert_eq!(millicores("0.5"), Some(500.0));
        assert_eq!(millicores("2"), Some(2000.0));
        assert_eq!(mebibytes("64Mi"), Some(64.0));
        assert_eq!(mebibytes("1Gi"), Some(1024.0));
        assert_eq!(mebibytes("1048576"), Some(1.0));
        assert_eq!(millicores("x"), None);
    }

    #[test]
    fn shipped_manifests_parse_and_args_drop_overridden_flags() {
        let c = container(
            "manifests/base/failover.yaml",
            "Deployment",
            "continuum-failover",
            "failover",
        )
        .unwrap();
        assert_eq!(c.args.first().map(String::as_str), Some("continuum"));
        let a = c.args_without(&["--health-listen"]);
        assert!(a.iter().all(|a| !a.starts_with("--health-listen")), "{a:?}");
        assert_eq!(a.len() + 1, c.args.len());
        assert!(c.resources.cpu_limit_m > c.resources.cpu_request_m);
    }
}
