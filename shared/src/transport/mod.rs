//! Lease transports: how one lease [`Request`] reaches one witness and its
//! [`Response`] comes back. The quorum client only sees [`LeaseTransport`], so
//! HTTPS today and the WireGuard link later are interchangeable.

use std::future::Future;
use std::pin::Pin;

use crate::lease::{Request, Response};

pub mod frame;
pub mod https;
pub mod stream;

/// Which protocol a quorum client speaks to its witnesses (both on the
/// witness's API port, chosen by ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WitnessProtocol {
    /// One pipelined connection per witness ([`stream::StreamTransport`]).
    #[default]
    Stream,
    /// One HTTP/1.1 request per call ([`https::HttpsTransport`]): `curl`-able.
    Https,
}

impl std::str::FromStr for WitnessProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stream" => Ok(WitnessProtocol::Stream),
            "https" => Ok(WitnessProtocol::Https),
            other => Err(format!(
                "unknown witness protocol {other:?}; use `stream` or `https`"
            )),
        }
    }
}

impl std::fmt::Display for WitnessProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WitnessProtocol::Stream => "stream",
            WitnessProtocol::Https => "https",
        })
    }
}

/// A transport to the witness at `url` (`https://host:port`) speaking `protocol`.
pub fn witness_transport(
    protocol: WitnessProtocol,
    url: &str,
    tls: &https::TlsMaterial,
    timeout: std::time::Duration,
) -> Result<std::sync::Arc<dyn LeaseTransport>, TransportError> {
    Ok(match protocol {
        WitnessProtocol::Stream => {
            std::sync::Arc::new(stream::StreamTransport::new(url, tls, timeout)?)
        }
        WitnessProtocol::Https => {
            std::sync::Arc::new(https::HttpsTransport::new(url, tls, timeout)?)
        }
    })
}

/// A boxed, sendable future: keeps [`LeaseTransport`] object-safe without
/// pulling in `async-trait`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends one request to one witness and returns its answer.
///
/// A transport error means "no answer": the request may or may not have been
/// applied by the witness (a reply lost after the witness granted is the case
/// the quorum client must survive).
pub trait LeaseTransport: Send + Sync {
    fn call<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Result<Response, TransportError>>;

    /// Where requests go, for logs (e.g. `https://10.0.0.1:7443`).
    fn endpoint(&self) -> String;
}

impl<T: LeaseTransport + ?Sized> LeaseTransport for std::sync::Arc<T> {
    fn call<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Result<Response, TransportError>> {
        (**self).call(req)
    }
    fn endpoint(&self) -> String {
        (**self).endpoint()
    }
}

/// Why a witness gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("cannot reach the witness: {0}")]
    Connect(String),
    #[error("the witness answered HTTP {status} with an undecodable body: {message}")]
    BadResponse { status: u16, message: String },
    #[error("transport configuration: {0}")]
    Config(String),
    /// Injected by the test fault harness.
    #[error("dropped by fault injection")]
    Dropped,
}

impl TransportError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "timeout",
            TransportError::Connect(_) => "connect",
            TransportError::BadResponse { .. } => "bad_response",
            TransportError::Config(_) => "config",
            TransportError::Dropped => "dropped",
        }
    }
}
