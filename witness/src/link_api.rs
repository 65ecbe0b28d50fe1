//! The lease API over the WireGuard control link: one JSON request per UDP
//! message to [`LEASE_PORT`] inside the tunnel, one JSON response back to the
//! sender's port. Same [`Request::decode`] and [`Witness::handle`] as HTTPS;
//! only authenticated peers on the allow-list can reach it.

use std::sync::Arc;

use continuum_shared::lease::{Request, Response};
use continuum_shared::link::packet::MAX_UDP_PAYLOAD;
use continuum_shared::link::{Inbound, LinkEndpoint, LEASE_PORT};
use tokio::sync::mpsc::Receiver;

use crate::Witness;

/// Answers one message; `None` when it is not for the lease port.
pub async fn answer(witness: &Witness, msg: &Inbound) -> Option<Vec<u8>> {
    if msg.dst_port != LEASE_PORT {
        return None;
    }
    let response = match Request::decode(&msg.payload) {
        Ok(req) => {
            let op = req.op();
            let resp = witness.handle(req).await;
            tracing::info!(peer = %msg.peer_name, op, refusal = resp.is_refusal(),
                "witness: lease request over the link");
            resp
        }
        Err(e) => {
            tracing::info!(peer = %msg.peer_name, reason = e.label(), error = %e,
                "witness: refused lease request over the link");
            Response::Error {
                code: e.label().to_owned(),
                message: e.to_string(),
            }
        }
    };
    let mut body = response.encode();
    if body.len() > MAX_UDP_PAYLOAD {
        body = Response::Error {
            code: "too_large".into(),
            message: format!("response of {} bytes does not fit one message", body.len()),
        }
        .encode();
    }
    Some(body)
}

/// Serves lease requests arriving on `inbound` until the channel closes.
/// Messages to other ports are ignored (logged at debug).
pub async fn serve(witness: Arc<Witness>, link: Arc<LinkEndpoint>, mut inbound: Receiver<Inbound>) {
    while let Some(msg) = inbound.recv().await {
        let Some(body) = answer(&witness, &msg).await else {
            tracing::debug!(peer = %msg.peer_name, port = msg.dst_port, "witness: link message to an unserved port");
            continue;
        };
        if let Err(e) = link
            .send_udp(&msg.peer, LEASE_PORT, msg.src_port, &body)
            .await
        {
            tracing::warn!(peer = %msg.peer_name, reason = e.label(), error = %e,
                "witness: could not answer over the link");
        }
    }
}
