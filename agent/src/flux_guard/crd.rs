//! CustomResourceDefinitions as the guard compares them: the chart's (what Helm
//! would send) and the live ones (what the API server stores), parsed from raw
//! JSON so a malformed document is reported, never a panic.

use serde_json::Value;

/// One entry of `spec.versions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdVersion {
    pub name: String,
    pub served: bool,
    pub storage: bool,
}

/// The parts of a CRD the guard reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdView {
    /// `<plural>.<group>`.
    pub name: String,
    pub group: String,
    pub plural: String,
    pub versions: Vec<CrdVersion>,
    /// `status.storedVersions` (empty for a chart's CRD).
    pub stored_versions: Vec<String>,
}

impl CrdView {
    /// Names of `spec.versions`, in order.
    pub fn version_names(&self) -> Vec<String> {
        self.versions.iter().map(|v| v.name.clone()).collect()
    }

    /// The storage version, when there is exactly one.
    pub fn storage_version(&self) -> Option<&str> {
        let mut s = self.versions.iter().filter(|v| v.storage);
        match (s.next(), s.next()) {
            (Some(v), None) => Some(v.name.as_str()),
            _ => None,
        }
    }
}

/// Why a document is not a usable CRD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CrdError {
    #[error("not a CustomResourceDefinition")]
    NotACrd,
    #[error("CRD without metadata.name")]
    NoName,
    #[error("CRD without spec.group or spec.names.plural")]
    NoGroup,
    #[error("CRD with malformed spec.versions")]
    BadVersions,
}

impl CrdError {
    pub fn label(self) -> &'static str {
        match self {
            Self::NotACrd => "not_a_crd",
            Self::NoName => "crd_no_name",
            Self::NoGroup => "crd_no_group",
            Self::BadVersions => "crd_bad_versions",
        }
    }
}

/// Whether a raw object is a CRD (any apiextensions version).
pub fn is_crd(v: &Value) -> bool {
    v.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition")
        && v.get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with("apiextensions.k8s.io/"))
}

/// Parse a CRD (`apiextensions.k8s.io/v1`, or v1beta1 with the single `spec.version`).
pub fn parse(v: &Value) -> Result<CrdView, CrdError> {
    if !is_crd(v) {
        return Err(CrdError::NotACrd);
    }
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or(CrdError::NoName)?
        .to_string();
    let group = v
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .ok_or(CrdError::NoGroup)?
        .to_string();
    let plural = v
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .ok_or(CrdError::NoGroup)?
        .to_string();
    let versions = match v.pointer("/spec/versions") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                Ok(CrdVersion {
                    name: e
                        .get("name")
                        .and_then(Value::as_str)
                        .filter(|n| !n.is_empty())
                        .ok_or(CrdError::BadVersions)?
                        .to_string(),
                    served: e.get("served").and_then(Value::as_bool).unwrap_or(false),
                    storage: e.get("storage").and_then(Value::as_bool).unwrap_or(false),
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None | Some(Value::Null) => match v.pointer("/spec/version").and_then(Value::as_str) {
            // apiextensions v1beta1: one version, served and stored.
            Some(n) => vec![CrdVersion {
                name: n.to_string(),
                served: true,
                storage: true,
            }],
            None => return Err(CrdError::BadVersions),
        },
        Some(_) => return Err(CrdError::BadVersions),
    };
    let stored_versions = match v.pointer("/status/storedVersions") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or(CrdError::BadVersions))
            .collect::<Result<Vec<_>, _>>()?,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(CrdError::BadVersions),
    };
    Ok(CrdView {
        name,
        group,
        plural,
        versions,
        stored_versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_v1_and_v1beta1() {
        let v = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "helmreleases.helm.toolkit.fluxcd.io"},
            "spec": {"group": "helm.toolkit.fluxcd.io", "names": {"plural": "helmreleases"},
                "versions": [{"name": "v2", "served": true, "storage": true}, {"name": "v2beta1", "served": false, "storage": false}]},
            "status": {"storedVersions": ["v2"]}});
        let c = parse(&v).unwrap();
        assert_eq!(c.version_names(), ["v2", "v2beta1"]);
        assert_eq!(c.storage_version(), Some("v2"));
        assert_eq!(c.stored_versions, ["v2"]);
        let old = json!({"apiVersion": "apiextensions.k8s.io/v1beta1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "a.b"}, "spec": {"group": "b", "names": {"plural": "a"}, "version": "v1"}});
        assert_eq!(parse(&old).unwrap().storage_version(), Some("v1"));
    }

    #[test]
    fn malformed_documents_are_errors() {
        let base = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "a.b"}, "spec": {"group": "b", "names": {"plural": "a"}, "versions": []}});
        let cases: Vec<(Value, CrdError)> = vec![
            (json!({"kind": "ConfigMap"}), CrdError::NotACrd),
            (
                {
                    let mut v = base.clone();
                    v["metadata"] = json!({});
                    v
                },
                CrdError::NoName,
            ),
            (
                {
                    let mut v = base.clone();
                    v["spec"]["group"] = Value::Null;
                    v
                },
                CrdError::NoGroup,
            ),
            (
                {
                    let mut v = base.clone();
                    v["spec"]["versions"] = json!("v1");
                    v
                },
                CrdError::BadVersions,
            ),
            (
                {
                    let mut v = base.clone();
                    v["spec"]["versions"] = json!([{"served": true}]);
                    v
                },
                CrdError::BadVersions,
            ),
            (
                {
                    let mut v = base.clone();
                    v["status"] = json!({"storedVersions": [1]});
                    v
                },
                CrdError::BadVersions,
            ),
        ];
        for (v, want) in cases {
            assert_eq!(parse(&v), Err(want), "{v}");
        }
    }
}
