//! Version skew between the running Flux and the Flux the Flux HelmRelease would
//! install (seed 000's version-pin invariant, checked in the live cluster): the
//! `app.kubernetes.io/version` label of the controller Deployments against the
//! `flux2` (sub)chart's appVersion, and each controller's image tag against the
//! chart's `values.yaml` tag.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::Value;

use super::metrics::Metrics;

/// One side of the comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FluxVersion {
    /// Flux distribution version, without a leading `v`.
    pub version: Option<String>,
    /// Controller (Deployment name) -> image tag, without a leading `v`.
    pub tags: BTreeMap<String, String>,
}

/// The comparison's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skew {
    pub running: String,
    pub desired: String,
    /// Human-readable differences; empty when aligned.
    pub differences: Vec<String>,
}

pub fn normalize(v: &str) -> String {
    v.trim().trim_start_matches('v').to_string()
}

/// The running Flux from its controller Deployments.
pub fn running_from(deployments: &[Value]) -> FluxVersion {
    let mut out = FluxVersion::default();
    let mut versions: Vec<String> = Vec::new();
    for d in deployments {
        let name = d
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Some(v) = d
            .pointer("/metadata/labels/app.kubernetes.io~1version")
            .and_then(Value::as_str)
        {
            versions.push(normalize(v));
        }
        let containers = d
            .pointer("/spec/template/spec/containers")
            .and_then(Value::as_array);
        let image = containers.and_then(|c| {
            c.iter()
                .find(|c| c.get("name").and_then(Value::as_str) == Some("manager"))
                .or_else(|| c.first())
                .and_then(|c| c.get("image"))
                .and_then(Value::as_str)
        });
        if let Some(tag) = image.and_then(image_tag) {
            out.tags.insert(name.to_string(), normalize(&tag));
        }
    }
    versions.sort();
    versions.dedup();
    out.version = match versions.len() {
        0 => None,
        1 => versions.pop(),
        _ => Some(versions.join("+")),
    };
    out
}

/// Tag of an image reference (`repo:tag`, `repo:tag@sha256:..`), none for digest-only.
pub fn image_tag(image: &str) -> Option<String> {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split_once(':').map(|(_, t)| t.to_string())
}

/// Controller Deployment name of a flux2 chart values key (`helmController`).
fn controller_of(key: &str) -> Option<String> {
    let base = key.strip_suffix("Controller")?;
    if base == "imageReflection" {
        return Some("image-reflector-controller".into());
    }
    let mut out = String::new();
    for c in base.chars() {
        if c.is_ascii_uppercase() {
            out.push('-');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    Some(format!("{out}-controller"))
}

/// Image tags of a flux2 chart's `values.yaml` (`helmController.tag: v1.1.0`).
pub fn tags_from_values(values: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Value::Object(m) = values {
        for (k, v) in m {
            if let (Some(ctl), Some(tag)) = (controller_of(k), v.get("tag").and_then(Value::as_str))
            {
                out.insert(ctl, normalize(tag));
            }
        }
    }
    out
}

/// Compare; `None` when there is nothing comparable yet.
pub fn compare(running: &FluxVersion, desired: &FluxVersion) -> Option<Skew> {
    let mut differences = Vec::new();
    let mut comparable = false;
    if let (Some(r), Some(d)) = (&running.version, &desired.version) {
        comparable = true;
        if r != d {
            differences.push(format!("Flux {r} running, {d} would be installed"));
        }
    }
    for (ctl, d) in &desired.tags {
        if let Some(r) = running.tags.get(ctl) {
            comparable = true;
            if r != d {
                differences.push(format!("{ctl} {r} running, {d} would be installed"));
            }
        }
    }
    comparable.then(|| Skew {
        running: running.version.clone().unwrap_or_else(|| "unknown".into()),
        desired: desired.version.clone().unwrap_or_else(|| "unknown".into()),
        differences,
    })
}

#[derive(Default)]
struct Inner {
    running: Option<FluxVersion>,
    desired: Option<FluxVersion>,
    warned: Option<Skew>,
}

/// Shared between the pre-flight guard (desired) and the snapshot keeper (running).
pub struct SkewState {
    release: String,
    metrics: Metrics,
    inner: Mutex<Inner>,
}

impl SkewState {
    /// `release` is the Flux HelmRelease as `namespace/name`.
    pub fn new(release: String, metrics: Metrics) -> Self {
        Self {
            release,
            metrics,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn release(&self) -> &str {
        &self.release
    }

    pub fn set_running(&self, v: FluxVersion) -> Option<Skew> {
        let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        i.running = Some(v);
        self.update(&mut i)
    }

    pub fn set_desired(&self, v: FluxVersion) -> Option<Skew> {
        let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        i.desired = Some(v);
        self.update(&mut i)
    }

    /// Sets the metric; returns the skew when it is new (to warn once per change).
    fn update(&self, i: &mut Inner) -> Option<Skew> {
        let (Some(r), Some(d)) = (&i.running, &i.desired) else {
            return None;
        };
        let skew = compare(r, d)?;
        self.metrics.version_skew.reset();
        self.metrics
            .version_skew
            .with_label_values(&[&self.release, &skew.running, &skew.desired])
            .set(i64::from(!skew.differences.is_empty()));
        if skew.differences.is_empty() {
            i.warned = None;
            return None;
        }
        if i.warned.as_ref() == Some(&skew) {
            return None;
        }
        i.warned = Some(skew.clone());
        Some(skew)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dep(name: &str, version: Option<&str>, image: &str) -> Value {
        let mut d = json!({"metadata": {"name": name, "labels": {}}, "spec": {"template": {"spec": {"containers": [{"name": "manager", "image": image}]}}}});
        if let Some(v) = version {
            d["metadata"]["labels"]["app.kubernetes.io/version"] = json!(v);
        }
        d
    }

    #[test]
    fn running_and_desired() {
        let r = running_from(&[
            dep(
                "helm-controller",
                Some("v2.4.0"),
                "ghcr.io/fluxcd/helm-controller:v1.1.0",
            ),
            dep(
                "source-controller",
                Some("v2.4.0"),
                "reg:5000/fluxcd/source-controller:v1.4.1@sha256:ab",
            ),
        ]);
        assert_eq!(r.version.as_deref(), Some("2.4.0"));
        assert_eq!(r.tags["helm-controller"], "1.1.0");
        assert_eq!(r.tags["source-controller"], "1.4.1");
        let values = json!({"helmController": {"tag": "v1.0.1"}, "imageReflectionController": {"tag": "v0.33.0"}, "cli": {"tag": "x"}});
        let tags = tags_from_values(&values);
        assert_eq!(tags["helm-controller"], "1.0.1");
        assert_eq!(tags["image-reflector-controller"], "0.33.0");
        assert_eq!(tags.len(), 2);
        let d = FluxVersion {
            version: Some("2.3.0".into()),
            tags,
        };
        let s = compare(&r, &d).unwrap();
        assert_eq!((s.running.as_str(), s.desired.as_str()), ("2.4.0", "2.3.0"));
        assert_eq!(s.differences.len(), 2, "{:?}", s.differences);
        let same = FluxVersion {
            version: Some("2.4.0".into()),
            tags: [("helm-controller".to_string(), "1.1.0".to_string())].into(),
        };
        assert!(compare(&r, &same).unwrap().differences.is_empty());
        assert!(compare(&FluxVersion::default(), &same).is_none());
        assert_eq!(image_tag("localhost:5000/x"), None);
    }
}
