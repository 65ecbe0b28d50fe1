//! `/metrics`, `/healthz`, `/readyz` on a plain HTTP port.
//!
//! `/readyz` is 503 while the recovery guardrail is tripped and not acknowledged,
//! so the alert is visible to whatever watches readiness.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::hr_recovery::guardrail::Guardrail;

#[derive(Clone)]
pub struct HealthState {
    pub registry: Registry,
    /// The HR recovery guardrail; `/readyz` is 503 while it is tripped.
    /// Components without one pass `None` and are ready while they serve.
    pub guard: Option<Arc<Mutex<Guardrail>>>,
}

impl HealthState {
    /// Health for a component with no guardrail.
    pub fn without_guardrail(registry: Registry) -> Self {
        HealthState {
            registry,
            guard: None,
        }
    }
}

/// Renders the region-health `/status` JSON document (served when given).
pub type StatusProvider = Arc<dyn Fn() -> String + Send + Sync>;

fn respond(
    state: &HealthState,
    status: Option<&StatusProvider>,
    path: &str,
) -> (StatusCode, String) {
    match path {
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/status" if status.is_some() => (StatusCode::OK, status.map(|f| f()).unwrap_or_default()),
        "/readyz" => {
            let tripped = state
                .guard
                .as_ref()
                .and_then(|g| g.lock().unwrap_or_else(|e| e.into_inner()).tripped_at());
            match tripped {
                Some(t) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "hr-recovery guardrail tripped at {t}; acknowledge with annotation {}\n",
                        crate::hr_recovery::ANNOTATION_GUARDRAIL_ACK
                    ),
                ),
                None => (StatusCode::OK, "ok\n".into()),
            }
        }
        "/metrics" => {
            let mut buf = Vec::new();
            let _ = TextEncoder::new().encode(&state.registry.gather(), &mut buf);
            (StatusCode::OK, String::from_utf8_lossy(&buf).into_owned())
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Serve until the task is dropped. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    state: HealthState,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with_status(addr, state, None).await
}

/// [`serve`] plus `/status` (region health JSON) when `status` is given.
pub async fn serve_with_status(
    addr: SocketAddr,
    state: HealthState,
    status: Option<StatusProvider>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            let status = status.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (code, body) = respond(&state, status.as_ref(), req.uri().path());
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(code)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((bound, task))
}
