//! The failover runner's admin endpoint (`--admin-listen`): what the
//! `continuum-agent switchover` command talks to.
//!
//! * `GET /failover/status`: this region's role, lease, epoch and handover
//!   progress as JSON (refreshed every tick by the runner).
//! * `POST /failover/handover?to=<region>`: ask this region, if it is the
//!   primary holding the lease, to hand the lease over to `to` (the peer).
//!   The request only *asks*: the decision (`failover::decide`) records the
//!   intent at the witnesses once the peer is an attached synchronous
//!   standby, and everything after that is driven by the witnesses' record,
//!   so a lost request (agent restart) is simply asked again.
//!
//! Bind it to loopback or a network only operators reach: it has no
//! authentication of its own, and a handover, while safe, is a planned
//! outage of a few hundred milliseconds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use continuum_shared::lease::HolderId;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// What the runner shares with the admin endpoint.
#[derive(Debug)]
pub struct AdminShared {
    pub region: HolderId,
    pub peer: HolderId,
    /// A pending handover request (successor, when asked).
    pub request: Option<(HolderId, Instant)>,
    /// The status document of the last tick.
    pub status: serde_json::Value,
}

pub type Admin = Arc<Mutex<AdminShared>>;

fn lock(admin: &Admin) -> std::sync::MutexGuard<'_, AdminShared> {
    admin.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pure: the answer to one admin request (method, path, query).
pub fn respond(admin: &Admin, method: &Method, path: &str, query: &str) -> (StatusCode, String) {
    let json = |code, v: serde_json::Value| (code, format!("{v}\n"));
    match (method, path) {
        (&Method::GET, "/failover/status") => (StatusCode::OK, format!("{}\n", lock(admin).status)),
        (&Method::POST, "/failover/handover") => {
            let to = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("to="))
                .unwrap_or("");
            let Ok(to) = HolderId::new(to) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "query parameter `to` must name a region"}),
                );
            };
            let mut a = lock(admin);
            if to != a.peer {
                let msg = format!(
                    "this region ({}) can only hand over to its peer {}",
                    a.region, a.peer
                );
                return json(StatusCode::BAD_REQUEST, serde_json::json!({"error": msg}));
            }
            let role = a.status["role"].as_str().unwrap_or("unknown").to_string();
            let handing_over = a.status["handover"]["to"].as_str() == Some(to.as_str());
            if role != "primary" && !handing_over {
                let msg = format!("this region is not the primary holding the lease (role {role})");
                return json(
                    StatusCode::CONFLICT,
                    serde_json::json!({"error": msg, "role": role}),
                );
            }
            tracing::info!(action = "handover_request", to = %to, reason = "operator asked for a planned switchover", "handover requested");
            a.request = Some((to.clone(), Instant::now()));
            json(
                StatusCode::ACCEPTED,
                serde_json::json!({"accepted": true, "from": a.region.as_str(), "to": to.as_str()}),
            )
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    }
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    admin: Admin,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (code, body) = respond(
                        &admin,
                        req.method(),
                        req.uri().path(),
                        req.uri().query().unwrap_or(""),
                    );
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(code)
                                .header("content-type", "application/json")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(role: &str) -> Admin {
        Arc::new(Mutex::new(AdminShared {
            region: HolderId::new("a").unwrap(),
            peer: HolderId::new("b").unwrap(),
            request: None,
            status: serde_json::json!({"role": role}),
        }))
    }

    #[test]
    fn handover_requests_are_validated() {
        let cases = [
            ("primary", "to=b", StatusCode::ACCEPTED, true),
            ("primary", "to=a", StatusCode::BAD_REQUEST, false),
            ("primary", "to=c", StatusCode::BAD_REQUEST, false),
            ("primary", "", StatusCode::BAD_REQUEST, false),
            ("primary", "to=B_1", StatusCode::BAD_REQUEST, false),
            ("standby", "to=b", StatusCode::CONFLICT, false),
            ("fenced", "to=b", StatusCode::CONFLICT, false),
        ];
        for (role, q, code, stored) in cases {
            let a = admin(role);
            let (got, body) = respond(&a, &Method::POST, "/failover/handover", q);
            assert_eq!(got, code, "{role} {q}: {body}");
            assert_eq!(lock(&a).request.is_some(), stored, "{role} {q}");
        }
        let a = admin("primary");
        assert_eq!(
            respond(&a, &Method::GET, "/failover/status", "").0,
            StatusCode::OK
        );
        assert_eq!(
            respond(&a, &Method::GET, "/failover/handover", "to=b").0,
            StatusCode::NOT_FOUND
        );
    }
}
