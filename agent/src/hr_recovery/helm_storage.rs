//! Helm v3 storage Secrets (`sh.helm.release.v1.<name>.v<N>`): the `release` key
//! holds base64(gzip(JSON release)) on top of the Secret's own base64 encoding.

use std::io::Read;

use base64::Engine;
use jiff::Timestamp;
use serde_json::Value;

/// Why a storage Secret could not be read (each is a metric label).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    #[error("secret has no data.release")]
    NoReleaseKey,
    #[error("secret data is not valid base64")]
    SecretBase64,
    #[error("release payload is not valid base64")]
    ReleaseBase64,
    #[error("release payload is not valid gzip")]
    Gzip,
    #[error("release payload is not valid JSON: {0}")]
    Json(String),
    #[error("release JSON has no info.status")]
    NoStatus,
}

impl StorageError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoReleaseKey => "secret_no_release_key",
            Self::SecretBase64 => "secret_bad_base64",
            Self::ReleaseBase64 => "release_bad_base64",
            Self::Gzip => "release_bad_gzip",
            Self::Json(_) => "release_bad_json",
            Self::NoStatus => "release_no_status",
        }
    }
}

/// The parts of a Helm release record the recovery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRecord {
    /// `<name>.v<version>`, the idempotency key of an unlock.
    pub key: String,
    pub status: String,
    /// When the release entered its current state (`info.last_deployed`, else `first_deployed`).
    pub since: Option<Timestamp>,
}

impl ReleaseRecord {
    pub fn is_pending(&self) -> bool {
        matches!(
            self.status.as_str(),
            "pending-install" | "pending-upgrade" | "pending-rollback"
        )
    }
}

const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];

/// Decode a storage Secret given as raw JSON (`data.release` still base64 for the Secret layer).
pub fn decode_secret(secret: &Value) -> Result<ReleaseRecord, StorageError> {
    let data = secret
        .pointer("/data/release")
        .and_then(Value::as_str)
        .ok_or(StorageError::NoReleaseKey)?;
    let outer = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|_| StorageError::SecretBase64)?;
    decode_release(&outer)
}

/// Decode Helm's payload (base64 text of gzip or plain JSON), as Helm's `decodeRelease` does.
pub fn decode_release(payload: &[u8]) -> Result<ReleaseRecord, StorageError> {
    let inner = base64::engine::general_purpose::STANDARD
        .decode(payload.trim_ascii())
        .map_err(|_| StorageError::ReleaseBase64)?;
    let json_bytes = if inner.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        // Bound the decompressed size: a release record is never near 64 MiB.
        flate2::read::GzDecoder::new(&inner[..])
            .take(64 << 20)
            .read_to_end(&mut out)
            .map_err(|_| StorageError::Gzip)?;
        out
    } else {
        inner
    };
    let v: Value =
        serde_json::from_slice(&json_bytes).map_err(|e| StorageError::Json(e.to_string()))?;
    let status = v
        .pointer("/info/status")
        .and_then(Value::as_str)
        .ok_or(StorageError::NoStatus)?
        .to_string();
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    let version = v.get("version").and_then(Value::as_i64).unwrap_or(0);
    let ts = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .and_then(super::model::parse_time)
    };
    Ok(ReleaseRecord {
        key: format!("{name}.v{version}"),
        status,
        since: ts("/info/last_deployed").or_else(|| ts("/info/first_deployed")),
    })
}

/// Encode a release record as Helm stores it (tests, benchmark).
pub fn encode_release(record: &Value) -> String {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = gz.write_all(record.to_string().as_bytes());
    let bytes = gz.finish().unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The version a storage Secret holds (`version` label, else the `.v<N>` name suffix).
pub fn secret_version(secret: &Value) -> Option<u64> {
    secret
        .pointer("/metadata/labels/version")
        .and_then(Value::as_str)
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            secret
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .and_then(|n| n.rsplit_once(".v"))
                .and_then(|(_, v)| v.parse().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(release_b64_of_helm: &str) -> Value {
        let outer = base64::engine::general_purpose::STANDARD.encode(release_b64_of_helm);
        json!({"data": {"release": outer}})
    }

    #[test]
    fn decode_table() {
        let good = encode_release(
            &json!({"name": "a", "version": 3, "info": {"status": "pending-upgrade", "last_deployed": "2026-01-01T00:00:00Z"}}),
        );
        let r = decode_secret(&secret(&good)).unwrap();
        assert_eq!(
            (r.key.as_str(), r.status.as_str(), r.is_pending()),
            ("a.v3", "pending-upgrade", true)
        );
        assert!(r.since.is_some());
        let plain = base64::engine::general_purpose::STANDARD
            .encode(r#"{"name":"a","version":1,"info":{"status":"deployed"}}"#);
        assert!(!decode_secret(&secret(&plain)).unwrap().is_pending());

        let bad_gzip =
            base64::engine::general_purpose::STANDARD.encode([0x1f, 0x8b, 0x08, 0, 1, 2, 3]);
        let no_status = encode_release(&json!({"name": "a"}));
        let cases = [
            (json!({}), StorageError::NoReleaseKey),
            (
                json!({"data": {"release": "%%%"}}),
                StorageError::SecretBase64,
            ),
            (secret("not base64 !!"), StorageError::ReleaseBase64),
            (secret(&bad_gzip), StorageError::Gzip),
            (
                secret(&base64::engine::general_purpose::STANDARD.encode("{nope")),
                StorageError::Json(String::new()),
            ),
            (secret(&no_status), StorageError::NoStatus),
        ];
        for (s, want) in cases {
            let got = decode_secret(&s).unwrap_err();
            assert_eq!(got.label(), want.label(), "{s}");
        }
    }

    #[test]
    fn versions() {
        assert_eq!(
            secret_version(&json!({"metadata": {"labels": {"version": "7"}}})),
            Some(7)
        );
        assert_eq!(
            secret_version(&json!({"metadata": {"name": "sh.helm.release.v1.a.v12"}})),
            Some(12)
        );
        assert_eq!(secret_version(&json!({"metadata": {"name": "x"}})), None);
    }
}
