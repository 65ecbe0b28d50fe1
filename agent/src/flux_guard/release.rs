//! What Helm actually installed: the CRDs in the `manifest` of a HelmRelease's
//! deployed Helm release (storage Secret `sh.helm.release.v1.<name>.v<N>`,
//! type `helm.sh/release.v1`, `data.release` = base64(base64(gzip(JSON))) with
//! the Secret's own base64 layer). Helm deletes every templated object of the
//! current release that the next one no longer renders, so a CRD in this
//! manifest and absent from the new chart's templates would be deleted, its
//! objects with it. The annotation the guard writes after a check covers only
//! revisions it saw; this covers what was installed before the guard ran.
//!
//! Parsed defensively: the Secret's payload and the decompressed JSON are
//! bounded, every failure is an error with a metric label, never a panic.

use std::collections::BTreeSet;
use std::io::Read;

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::crd;

/// Largest `data.release` read (a Secret holds at most 1 MiB, base64 grows it by 4/3).
pub const MAX_SECRET_DATA: usize = 2 * 1024 * 1024;
/// Largest decompressed release JSON (Helm's own storage stays under 1 MiB compressed).
pub const MAX_RELEASE_JSON: u64 = 32 * 1024 * 1024;
/// Helm's resource policy annotation: `keep` objects are never deleted by Helm.
const RESOURCE_POLICY: &str = "helm.sh/resource-policy";

/// Why a release Secret could not be read; `label()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("the Helm release Secret has no data.release")]
    NoReleaseKey,
    #[error("the Helm release Secret's data.release is over {MAX_SECRET_DATA} bytes")]
    TooLarge,
    #[error("the Helm release payload is not valid base64")]
    Base64,
    #[error(
        "the Helm release payload is not valid gzip or is over {MAX_RELEASE_JSON} bytes unpacked"
    )]
    Gzip,
    #[error("the Helm release payload is not valid JSON: {0}")]
    Json(String),
    #[error("the Helm release has no manifest")]
    NoManifest,
}

impl ReleaseError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoReleaseKey => "release_no_data",
            Self::TooLarge => "release_too_large",
            Self::Base64 => "release_bad_base64",
            Self::Gzip => "release_bad_gzip",
            Self::Json(_) => "release_bad_json",
            Self::NoManifest => "release_no_manifest",
        }
    }
}

/// Helm's storage Secret name of one release version.
pub fn secret_name(release: &str, version: u64) -> String {
    format!("sh.helm.release.v1.{release}.v{version}")
}

/// Decode a storage Secret (raw JSON as the API returns it) to its release's
/// templated CRD names that Helm would delete when a later revision drops them.
pub fn deletable_crds(secret: &Value) -> Result<BTreeSet<String>, ReleaseError> {
    let data = secret
        .pointer("/data/release")
        .and_then(Value::as_str)
        .ok_or(ReleaseError::NoReleaseKey)?;
    if data.len() > MAX_SECRET_DATA {
        return Err(ReleaseError::TooLarge);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let helm_text = b64.decode(data.trim()).map_err(|_| ReleaseError::Base64)?;
    let inner = b64
        .decode(helm_text.trim_ascii())
        .map_err(|_| ReleaseError::Base64)?;
    let json = if inner.starts_with(&[0x1f, 0x8b, 0x08]) {
        let mut out = Vec::new();
        let mut gz = flate2::read::GzDecoder::new(&inner[..]).take(MAX_RELEASE_JSON + 1);
        gz.read_to_end(&mut out).map_err(|_| ReleaseError::Gzip)?;
        if out.len() as u64 > MAX_RELEASE_JSON {
            return Err(ReleaseError::Gzip);
        }
        out
    } else {
        inner
    };
    let v: Value = serde_json::from_slice(&json).map_err(|e| ReleaseError::Json(e.to_string()))?;
    let manifest = v
        .get("manifest")
        .and_then(Value::as_str)
        .ok_or(ReleaseError::NoManifest)?;
    Ok(manifest_crds(manifest))
}

/// CRD names in a rendered Helm manifest (`---` separated), leaving out those
/// Helm keeps (`helm.sh/resource-policy: keep`). Documents that do not parse are
/// skipped: Helm rendered and applied them, so they parsed for Helm.
pub fn manifest_crds(manifest: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for doc in manifest.split("\n---") {
        if !doc.contains("CustomResourceDefinition") {
            continue;
        }
        let Ok(v) = Value::deserialize(serde_yaml::Deserializer::from_str(doc)) else {
            continue;
        };
        if !crd::is_crd(&v) {
            continue;
        }
        let keep = v
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(RESOURCE_POLICY))
            .and_then(Value::as_str)
            .is_some_and(|p| p.trim() == "keep");
        if let Some(name) = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            if !keep {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// A storage Secret as Helm writes it (tests, fuzz seeds).
pub fn encode_secret(name: &str, namespace: &str, release: &Value) -> Value {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = gz.write_all(release.to_string().as_bytes());
    let b64 = base64::engine::general_purpose::STANDARD;
    let helm = b64.encode(gz.finish().unwrap_or_default());
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "helm.sh/release.v1",
        "metadata": {"name": name, "namespace": namespace, "labels": {"owner": "helm", "status": "deployed"}},
        "data": {"release": b64.encode(helm)},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MANIFEST: &str = "---\n# Source: c/templates/crds.yaml\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: kustomizations.kustomize.toolkit.fluxcd.io\nspec:\n  group: kustomize.toolkit.fluxcd.io\n---\n# Source: c/templates/kept.yaml\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: kept.x\n  annotations:\n    helm.sh/resource-policy: keep\n---\n# Source: c/templates/cm.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: CustomResourceDefinition\n";

    #[test]
    fn reads_templated_crds_of_the_release() {
        let s = encode_secret(
            "sh.helm.release.v1.c.v3",
            "apps",
            &json!({"name": "c", "version": 3, "manifest": MANIFEST}),
        );
        assert_eq!(
            deletable_crds(&s).unwrap(),
            ["kustomizations.kustomize.toolkit.fluxcd.io".to_string()].into()
        );
        assert_eq!(secret_name("c", 3), "sh.helm.release.v1.c.v3");
    }

    #[test]
    fn malformed_secrets_are_errors() {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let wrap = |helm: String| json!({"data": {"release": b64(helm.as_bytes())}});
        let cases = [
            (json!({}), "release_no_data"),
            (
                json!({"data": {"release": "x".repeat(MAX_SECRET_DATA + 1)}}),
                "release_too_large",
            ),
            (json!({"data": {"release": "%%"}}), "release_bad_base64"),
            (wrap("!!".into()), "release_bad_base64"),
            (wrap(b64(&[0x1f, 0x8b, 0x08, 0, 1])), "release_bad_gzip"),
            (wrap(b64(b"{nope")), "release_bad_json"),
            (wrap(b64(b"{\"name\": \"c\"}")), "release_no_manifest"),
        ];
        for (s, want) in cases {
            assert_eq!(deletable_crds(&s).unwrap_err().label(), want, "{s}");
        }
        // A gzip bomb over the bound is refused, not inflated.
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..(MAX_RELEASE_JSON >> 20) + 1 {
            gz.write_all(&zeros).unwrap();
        }
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < MAX_SECRET_DATA / 2);
        assert_eq!(
            deletable_crds(&wrap(b64(&bomb))).unwrap_err().label(),
            "release_bad_gzip"
        );
    }
}
