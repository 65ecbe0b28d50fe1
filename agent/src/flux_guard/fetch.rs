//! Chart artifact download, as helm-controller does it: plain HTTP GET of the
//! source artifact URL (source-controller serves artifacts in-cluster over HTTP),
//! bounded in size and time, verified against the artifact digest when present.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why an artifact could not be fetched; `label()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("artifact URL {0:?} is not a valid http:// URL")]
    BadUrl(String),
    #[error("artifact fetch failed: {0}")]
    Http(String),
    #[error("artifact server answered HTTP {0}")]
    Status(u16),
    #[error("artifact larger than {0} bytes")]
    TooLarge(u64),
    #[error("artifact fetch timed out after {0:?}")]
    Timeout(Duration),
    #[error("artifact digest {0:?} uses an unsupported algorithm")]
    DigestAlgorithm(String),
    #[error("artifact digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
}

impl FetchError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadUrl(_) => "fetch_bad_url",
            Self::Http(_) => "fetch_http",
            Self::Status(_) => "fetch_status",
            Self::TooLarge(_) => "fetch_too_large",
            Self::Timeout(_) => "fetch_timeout",
            Self::DigestAlgorithm(_) => "digest_algorithm",
            Self::DigestMismatch { .. } => "digest_mismatch",
        }
    }
}

/// Check `data` against a Flux artifact digest (`sha256:<hex>`, also sha384/sha512).
pub fn verify_digest(data: &[u8], digest: &str) -> Result<(), FetchError> {
    let (algo, want) = digest
        .split_once(':')
        .ok_or_else(|| FetchError::DigestAlgorithm(digest.into()))?;
    let alg = match algo {
        "sha256" => &ring::digest::SHA256,
        "sha384" => &ring::digest::SHA384,
        "sha512" => &ring::digest::SHA512,
        _ => return Err(FetchError::DigestAlgorithm(digest.into())),
    };
    let got: String = ring::digest::digest(alg, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if !got.eq_ignore_ascii_case(want) {
        return Err(FetchError::DigestMismatch {
            expected: digest.into(),
            actual: format!("{algo}:{got}"),
        });
    }
    Ok(())
}

/// A reusable artifact downloader.
#[derive(Clone)]
pub struct Fetcher {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    max_bytes: u64,
    timeout: Duration,
}

impl Fetcher {
    pub fn new(max_bytes: u64, timeout: Duration) -> Self {
        let mut conn = hyper_util::client::legacy::connect::HttpConnector::new();
        conn.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new()).build(conn),
            max_bytes,
            timeout,
        }
    }

    /// GET `url`, at most `max_bytes`, within the timeout; verify `digest` when given.
    pub async fn fetch(&self, url: &str, digest: Option<&str>) -> Result<Bytes, FetchError> {
        let uri: http::Uri = url.parse().map_err(|_| FetchError::BadUrl(url.into()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(FetchError::BadUrl(url.into()));
        }
        let fut = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| FetchError::Http(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            if let Some(len) = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                if len > self.max_bytes {
                    return Err(FetchError::TooLarge(self.max_bytes));
                }
            }
            let limit = usize::try_from(self.max_bytes).unwrap_or(usize::MAX);
            Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge(self.max_bytes)
                    } else {
                        FetchError::Http(e.to_string())
                    }
                })
        };
        let body = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))??;
        if let Some(d) = digest.filter(|d| !d.is_empty()) {
            verify_digest(&body, d)?;
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let d = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert!(verify_digest(b"hello", d).is_ok());
        assert_eq!(
            verify_digest(b"hellO", d).unwrap_err().label(),
            "digest_mismatch"
        );
        assert_eq!(
            verify_digest(b"x", "md5:00").unwrap_err().label(),
            "digest_algorithm"
        );
        assert_eq!(
            verify_digest(b"x", "nocolon").unwrap_err().label(),
            "digest_algorithm"
        );
    }
}
