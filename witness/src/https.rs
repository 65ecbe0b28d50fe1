//! The HTTPS lease API: `POST /v1/lease` with a JSON [`Request`], answered
//! with a JSON [`Response`]. Client certificates authenticate callers.
//!
//! Status codes: 200 for `Granted`/`Released`/`State`/`MetaStored`, 409 for
//! refusals, 400 malformed, 413 too large, 415 wrong content type, 422 invalid
//! field, 401 without a client certificate, 503 when the store failed, 404/405
//! for other paths and methods. Connections that negotiate ALPN
//! `continuum-lease/1` speak the pipelined lease stream instead
//! ([`crate::stream`]). Every error body is `Response::Error` naming
//! the problem, and nothing changes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use continuum_shared::lease::{DecodeError, Request, Response, MAX_REQUEST_BYTES};
use continuum_shared::transport::frame::LEASE_STREAM_ALPN;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::service::Witness;

/// The only API path.
pub const LEASE_PATH: &str = "/v1/lease";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP status for a lease response.
pub fn status_of(r: &Response) -> StatusCode {
    match r {
        Response::Granted { .. }
        | Response::Released
        | Response::State(_)
        | Response::MetaStored => StatusCode::OK,
        Response::Held { .. } | Response::EpochTooLow { .. } | Response::NotHolder { .. } => {
            StatusCode::CONFLICT
        }
        Response::Error { .. } => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json(status: StatusCode, r: &Response) -> http::Response<Full<Bytes>> {
    let mut resp = http::Response::new(Full::new(Bytes::from(r.encode())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
) -> http::Response<Full<Bytes>> {
    json(
        status,
        &Response::Error {
            code: code.to_string(),
            message: message.into(),
        },
    )
}

/// Accepts TLS connections forever, one task per connection.
pub async fn serve_api(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    witness: Arc<Witness>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let witness = witness.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let authenticated = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            if tls.get_ref().1.alpn_protocol() == Some(LEASE_STREAM_ALPN) {
                crate::stream::serve_connection(tls, witness, authenticated).await;
                return;
            }
            let svc = service_fn(move |req| {
                let witness = witness.clone();
                // Boxed: the request future is large (it embeds the store's
                // futures); unboxed, hyper moves it into every per-request
                // task, which showed up as the top memmove in a profile.
                Box::pin(
                    async move { Ok::<_, Infallible>(handle(&witness, authenticated, req).await) },
                )
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

fn refused(witness: &Witness, outcome: &str) {
    witness
        .metrics()
        .requests
        .with_label_values(&["none", outcome])
        .inc();
}

/// Handles one HTTP request on an API connection.
pub async fn handle(
    witness: &Witness,
    authenticated: bool,
    req: http::Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    if req.uri().path() != LEASE_PATH {
        refused(witness, "not_found");
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no such path {}; the lease API is POST {LEASE_PATH}",
                req.uri().path()
            ),
        );
    }
    if req.method() != Method::POST {
        refused(witness, "method_not_allowed");
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed on {LEASE_PATH}; use POST", req.method()),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    if !authenticated {
        refused(witness, "unauthenticated");
        tracing::info!("request without client certificate refused");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a client certificate signed by the witness's client CA is required; nothing was changed",
        );
    }
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ok = ct
            .to_str()
            .map(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            })
            .unwrap_or(false);
        if !ok {
            refused(witness, "unsupported_media_type");
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("content type {ct:?} is not supported; send application/json"),
            );
        }
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|l| *l > MAX_REQUEST_BYTES as u64) {
        refused(witness, "too_large");
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is {len} bytes; the limit is {MAX_REQUEST_BYTES}"),
        );
    }
    // Limited stops reading past the limit: a body is never buffered unbounded.
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                refused(witness, "too_large");
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request body exceeds the limit of {MAX_REQUEST_BYTES} bytes"),
                );
            }
            refused(witness, "body_error");
            return error(
                StatusCode::BAD_REQUEST,
                "body_error",
                format!("cannot read request body: {e}"),
            );
        }
    };
    let request = match Request::decode(&body) {
        Ok(r) => r,
        Err(e) => {
            refused(witness, e.label());
            let status = match e {
                DecodeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                DecodeError::Malformed(_) => StatusCode::BAD_REQUEST,
                DecodeError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            };
            return error(status, e.label(), e.to_string());
        }
    };
    let response = witness.handle(request).await;
    json(status_of(&response), &response)
}
