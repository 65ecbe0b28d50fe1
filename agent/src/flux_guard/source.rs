//! Where a HelmRelease's chart comes from, as helm-controller resolves it, and
//! the source's artifact (`status.artifact.url`, `revision`, `digest`).
//!
//! The HelmRelease is decoded slim ([`GuardedHr`]): only what the guard reads,
//! so the controller's cache of every HelmRelease stays small.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, GroupVersionKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `helm.toolkit.fluxcd.io/v2` HelmRelease, slim.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GuardedHr {
    #[serde(default, deserialize_with = "de_meta")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "de_spec")]
    pub spec: Value,
    #[serde(
        default,
        deserialize_with = "de_status",
        skip_serializing_if = "Option::is_none"
    )]
    pub status: Option<Value>,
}

fn de_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let mut m = ObjectMeta::deserialize(d)?;
    m.managed_fields = None;
    m.labels = None;
    m.owner_references = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| k.starts_with("dr.openova.io/flux-guard"));
    }
    Ok(m)
}

fn de_spec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    let mut v = Value::deserialize(d)?;
    if let Value::Object(m) = &mut v {
        m.retain(|k, _| {
            matches!(
                k.as_str(),
                "chart" | "chartRef" | "suspend" | "install" | "upgrade" | "storageNamespace"
            )
        });
        for k in ["install", "upgrade"] {
            if let Some(Value::Object(a)) = m.get_mut(k) {
                a.retain(|k, _| k == "crds");
            }
        }
    }
    Ok(v)
}

fn de_status<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    let mut v = Option::<Value>::deserialize(d)?;
    if let Some(Value::Object(m)) = &mut v {
        m.retain(|k, _| k == "helmChart" || k == "history" || k == "storageNamespace");
        // Whether a release exists (install vs upgrade CRD policy) and which Helm
        // release is current (its storage Secret): name, version, status only.
        if let Some(Value::Array(h)) = m.get_mut("history") {
            h.truncate(MAX_HISTORY);
            for e in h.iter_mut() {
                if let Value::Object(e) = e {
                    e.retain(|k, _| matches!(k.as_str(), "name" | "version" | "status"));
                } else {
                    *e = Value::Object(Default::default());
                }
            }
        }
    }
    Ok(v)
}

/// History entries kept (helm-controller keeps up to the previous deployed one, else 5).
const MAX_HISTORY: usize = 10;

crate::hr_recovery::model::helmrelease_resource!(GuardedHr);

impl GuardedHr {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
    pub fn suspended(&self) -> bool {
        self.spec.get("suspend").and_then(Value::as_bool) == Some(true)
    }

    /// Whether Helm released it before (the next action is an upgrade).
    pub fn installed(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.get("history"))
            .and_then(Value::as_array)
            .is_some_and(|h| !h.is_empty())
    }

    /// The storage Secret (namespace, name) of the Helm release an upgrade starts
    /// from, as helm-controller's `status.history` names it: the newest
    /// `deployed` entry, else the newest (Helm upgrades from the last release
    /// when none is deployed). Storage namespace: `status.storageNamespace`,
    /// else `spec.storageNamespace`, else the HelmRelease's.
    pub fn current_release(&self) -> Option<(String, String)> {
        let status = self.status.as_ref()?;
        let h = status.get("history").and_then(Value::as_array)?;
        let entry = h
            .iter()
            .find(|e| e.get("status").and_then(Value::as_str) == Some("deployed"))
            .or_else(|| h.first())?;
        let name = entry
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())?;
        let version = entry.get("version").and_then(Value::as_u64)?;
        let ns = status
            .get("storageNamespace")
            .and_then(Value::as_str)
            .or_else(|| self.spec.get("storageNamespace").and_then(Value::as_str))
            .filter(|n| !n.is_empty())
            .unwrap_or(self.namespace());
        Some((ns.to_string(), super::release::secret_name(name, version)))
    }

    /// What helm-controller will do with the chart's `crds/` directory next:
    /// `spec.upgrade.crds` (default Skip) once installed, else `spec.install.crds`
    /// (default Create). CRDs in `templates/` are always applied.
    pub fn crd_policy(&self) -> CrdPolicy {
        let (field, default) = if self.installed() {
            ("/upgrade/crds", CrdPolicy::Skip)
        } else {
            ("/install/crds", CrdPolicy::Create)
        };
        match self.spec.pointer(field).and_then(Value::as_str) {
            Some("Skip") => CrdPolicy::Skip,
            Some("Create") => CrdPolicy::Create,
            Some("CreateReplace") => CrdPolicy::CreateReplace,
            _ => default,
        }
    }
}

/// helm-controller's CRD policy for the chart's `crds/` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrdPolicy {
    /// `crds/` is not applied.
    Skip,
    /// Missing CRDs are created, existing ones left alone.
    Create,
    /// CRDs are created or replaced (the seed's refusal can happen).
    CreateReplace,
}

/// Source kinds that carry a Helm chart artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    HelmChart,
    OciRepository,
}

impl SourceKind {
    /// API versions to try, newest first (HelmChart v1 since Flux 2.3,
    /// OCIRepository v1 since Flux 2.6).
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Self::HelmChart => &["v1", "v1beta2"],
            Self::OciRepository => &["v1", "v1beta2"],
        }
    }

    /// The kind's API at `version`.
    pub fn api_resource_at(self, version: &str) -> ApiResource {
        let (kind, plural) = match self {
            Self::HelmChart => ("HelmChart", "helmcharts"),
            Self::OciRepository => ("OCIRepository", "ocirepositories"),
        };
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("source.toolkit.fluxcd.io", version, kind),
            plural,
        )
    }

    /// The newest API of the kind (before the served one is discovered).
    pub fn api_resource(self) -> ApiResource {
        self.api_resource_at(self.versions()[0])
    }
}

/// The source object holding a HelmRelease's chart artifact.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRef {
    pub kind: SourceKind,
    pub namespace: String,
    pub name: String,
}

/// Why a HelmRelease's source cannot be named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceSkip {
    NoChart,
    UnsupportedChartRef,
}

impl SourceSkip {
    pub fn label(self) -> &'static str {
        match self {
            Self::NoChart => "no_chart",
            Self::UnsupportedChartRef => "unsupported_chart_ref",
        }
    }
}

/// helm-controller's resolution: `spec.chartRef` (HelmChart or OCIRepository), else
/// the HelmChart it manages for `spec.chart` (`status.helmChart`, else
/// `<sourceNamespace>/<namespace>-<name>`).
pub fn source_of(hr: &GuardedHr) -> Result<SourceRef, SourceSkip> {
    let ns = hr.namespace().to_string();
    if let Some(r) = hr.spec.get("chartRef") {
        let kind = match r.get("kind").and_then(Value::as_str) {
            Some("OCIRepository") => SourceKind::OciRepository,
            Some("HelmChart") => SourceKind::HelmChart,
            _ => return Err(SourceSkip::UnsupportedChartRef),
        };
        let name = r
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or(SourceSkip::UnsupportedChartRef)?;
        let namespace = r
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or(&ns);
        return Ok(SourceRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        });
    }
    if hr.spec.pointer("/chart/spec").is_none() {
        return Err(SourceSkip::NoChart);
    }
    if let Some((n, name)) = hr
        .status
        .as_ref()
        .and_then(|s| s.get("helmChart"))
        .and_then(Value::as_str)
        .and_then(|s| s.split_once('/'))
        .filter(|(n, m)| !n.is_empty() && !m.is_empty())
    {
        return Ok(SourceRef {
            kind: SourceKind::HelmChart,
            namespace: n.into(),
            name: name.into(),
        });
    }
    let source_ns = hr
        .spec
        .pointer("/chart/spec/sourceRef/namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or(&ns);
    Ok(SourceRef {
        kind: SourceKind::HelmChart,
        namespace: source_ns.into(),
        name: format!("{ns}-{}", hr.name()),
    })
}

/// A source's current artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub url: String,
    pub revision: String,
    pub digest: Option<String>,
}

impl Artifact {
    /// What the guard records as checked: `revision@digest` (a re-published
    /// chart under the same version is checked again).
    pub fn key(&self) -> String {
        match &self.digest {
            Some(d) => format!("{}@{d}", self.revision),
            None => self.revision.clone(),
        }
    }
}

/// `status.artifact` of a source object, when it has one.
pub fn artifact_of(source: &Value) -> Option<Artifact> {
    let a = source.pointer("/status/artifact")?;
    let s = |k: &str| {
        a.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    Some(Artifact {
        url: s("url")?,
        revision: s("revision")?,
        digest: s("digest"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hr(spec: Value, status: Value) -> GuardedHr {
        serde_json::from_value(
            json!({"metadata": {"name": "bp-flux", "namespace": "flux-system",
            "annotations": {"other": "x", "dr.openova.io/flux-guard-checked": "1"}},
            "spec": spec, "status": status}),
        )
        .unwrap()
    }

    #[test]
    fn resolves_like_helm_controller() {
        type Want = Result<(SourceKind, &'static str, &'static str), SourceSkip>;
        let cases: Vec<(GuardedHr, Want)> = vec![
            (
                hr(
                    json!({"chart": {"spec": {"chart": "x", "sourceRef": {"kind": "HelmRepository", "name": "r"}}}}),
                    json!({}),
                ),
                Ok((SourceKind::HelmChart, "flux-system", "flux-system-bp-flux")),
            ),
            (
                hr(
                    json!({"chart": {"spec": {"sourceRef": {"name": "r", "namespace": "src"}}}}),
                    json!({}),
                ),
                Ok((SourceKind::HelmChart, "src", "flux-system-bp-flux")),
            ),
            (
                hr(json!({"chart": {"spec": {}}}), json!({"helmChart": "a/b"})),
                Ok((SourceKind::HelmChart, "a", "b")),
            ),
            (
                hr(
                    json!({"chartRef": {"kind": "OCIRepository", "name": "o"}}),
                    json!({}),
                ),
                Ok((SourceKind::OciRepository, "flux-system", "o")),
            ),
            (
                hr(
                    json!({"chartRef": {"kind": "HelmChart", "name": "c", "namespace": "n"}}),
                    json!({}),
                ),
                Ok((SourceKind::HelmChart, "n", "c")),
            ),
            (
                hr(
                    json!({"chartRef": {"kind": "GitRepository", "name": "g"}}),
                    json!({}),
                ),
                Err(SourceSkip::UnsupportedChartRef),
            ),
            (hr(json!({}), json!({})), Err(SourceSkip::NoChart)),
        ];
        for (h, want) in cases {
            let got = source_of(&h);
            let got = got
                .as_ref()
                .map(|s| (s.kind, s.namespace.as_str(), s.name.as_str()))
                .map_err(|e| *e);
            assert_eq!(got, want, "{:?}", h.spec);
        }
        let h = hr(
            json!({"values": {"big": 1}, "suspend": true}),
            json!({"history": []}),
        );
        assert_eq!(h.spec, json!({"suspend": true}));
        assert!(h.suspended());
        assert_eq!(h.annotation("other"), None);
        assert_eq!(h.annotation("dr.openova.io/flux-guard-checked"), Some("1"));
    }

    #[test]
    fn crd_policy_like_helm_controller() {
        let cases = [
            (json!({}), json!({}), CrdPolicy::Create),
            (
                json!({}),
                json!({"history": [{"status": "deployed"}]}),
                CrdPolicy::Skip,
            ),
            (
                json!({"install": {"crds": "CreateReplace", "remediation": {}}}),
                json!({}),
                CrdPolicy::CreateReplace,
            ),
            (
                json!({"install": {"crds": "CreateReplace"}}),
                json!({"history": [{}]}),
                CrdPolicy::Skip,
            ),
            (
                json!({"upgrade": {"crds": "CreateReplace"}}),
                json!({"history": [{"a": 1}, {}]}),
                CrdPolicy::CreateReplace,
            ),
            (
                json!({"upgrade": {"crds": "Create"}}),
                json!({"history": [{}]}),
                CrdPolicy::Create,
            ),
            (
                json!({"install": {"crds": "Skip"}}),
                json!({"history": []}),
                CrdPolicy::Skip,
            ),
        ];
        for (spec, status, want) in cases {
            let h = hr(spec.clone(), status.clone());
            assert_eq!(h.crd_policy(), want, "{spec} {status}");
        }
        let h = hr(
            json!({"install": {"crds": "Skip", "remediation": {"retries": 3}}}),
            json!({"history": [{"big": "x"}, {}]}),
        );
        assert_eq!(h.spec, json!({"install": {"crds": "Skip"}}));
        assert_eq!(h.status, Some(json!({"history": [{}, {}]})));
        assert_eq!(h.current_release(), None);
    }

    #[test]
    fn current_release_from_history() {
        let cases = [
            (json!({}), json!({}), None),
            (
                json!({}),
                json!({"history": [{"name": "flux", "version": 4, "status": "failed", "chartName": "x"}, {"name": "flux", "version": 3, "status": "deployed"}]}),
                Some(("flux-system", "sh.helm.release.v1.flux.v3")),
            ),
            (
                json!({"storageNamespace": "s"}),
                json!({"history": [{"name": "flux", "version": 2, "status": "failed"}]}),
                Some(("s", "sh.helm.release.v1.flux.v2")),
            ),
            (
                json!({"storageNamespace": "s"}),
                json!({"storageNamespace": "t", "history": [{"name": "r", "version": 1, "status": "deployed"}]}),
                Some(("t", "sh.helm.release.v1.r.v1")),
            ),
            (
                json!({}),
                json!({"history": [{"name": "r", "status": "deployed"}]}),
                None,
            ),
            (json!({}), json!({"history": ["junk"]}), None),
        ];
        for (spec, status, want) in cases {
            let h = hr(spec.clone(), status.clone());
            let got = h.current_release();
            assert_eq!(
                got.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
                want,
                "{spec} {status}"
            );
        }
    }

    #[test]
    fn artifacts() {
        let a = artifact_of(&json!({"status": {"artifact": {"url": "http://x/c.tgz", "revision": "1.1.2", "digest": "sha256:ab"}}})).unwrap();
        assert_eq!(a.key(), "1.1.2@sha256:ab");
        assert!(
            artifact_of(&json!({"status": {"artifact": {"url": "", "revision": "1"}}})).is_none()
        );
        assert!(artifact_of(&json!({"status": {}})).is_none());
        let a = artifact_of(&json!({"status": {"artifact": {"url": "http://x", "revision": "1"}}}))
            .unwrap();
        assert_eq!(a.key(), "1");
    }
}
