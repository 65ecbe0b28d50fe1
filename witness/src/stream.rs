//! The lease stream API (ALPN `continuum-lease/1` on the HTTPS port; framing
//! in [`continuum_shared::transport::frame`]): the same requests, validation
//! and answers as `POST /v1/lease`, pipelined.
//!
//! Every frame that one read brings is decoded and started at once; answers
//! are written in request order, all that are ready in one write. A durable
//! grant (fsync) therefore does not hold back renewals queued behind it on
//! the same connection from being applied, only from being answered.
//!
//! Bad input: an undecodable or invalid request gets a `Response::Error`
//! frame with the same code as the HTTP API and the connection goes on; a
//! bad length prefix ends the connection after an error frame (the next
//! frame boundary is unknown). No client certificate: one `unauthenticated`
//! error frame, then close. Nothing changes in any of these cases.

use std::sync::Arc;

use bytes::BytesMut;
use continuum_shared::lease::{Request, Response, MAX_REQUEST_BYTES};
use continuum_shared::transport::frame::{next_frame, put_frame, FrameError};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::service::Witness;

/// Requests started but not yet answered on one connection; past this the
/// witness stops reading until answers drain (backpressure, bounded memory).
const MAX_IN_FLIGHT: usize = 256;

/// What one frame turns into before the store is involved.
#[derive(Debug)]
pub enum Decoded {
    Request(Request),
    /// Answer at once with this error; the connection goes on.
    Refused(Response),
}

/// Decodes one frame body into a request, or the error answer to send
/// (the fuzz target drives this with arbitrary bytes).
pub fn decode_frame(body: &[u8]) -> Decoded {
    match Request::decode(body) {
        Ok(r) => Decoded::Request(r),
        Err(e) => Decoded::Refused(Response::Error {
            code: e.label().to_string(),
            message: e.to_string(),
        }),
    }
}

fn frame_error(e: &FrameError) -> Response {
    Response::Error {
        code: e.label().to_string(),
        message: format!("{e}; closing the connection, nothing was changed"),
    }
}

/// Serves one TLS connection that negotiated the lease stream protocol.
pub async fn serve_connection<S>(mut io: S, witness: Arc<Witness>, authenticated: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(8 * 1024);
    if !authenticated {
        refused(&witness, "unauthenticated");
        tracing::info!("lease stream without client certificate refused");
        let r = Response::Error {
            code: "unauthenticated".into(),
            message: "a client certificate signed by the witness's client CA is required; nothing was changed".into(),
        };
        put_frame(&mut out, &r.encode());
        let _ = io.write_all(&out).await;
        let _ = io.shutdown().await;
        return;
    }
    let mut inbuf = BytesMut::with_capacity(8 * 1024);
    let mut in_flight = FuturesOrdered::new();
    let mut closing = false;
    loop {
        // Everything already answered goes out in one write.
        while let Some(Some(r)) = in_flight.next().now_or_never() {
            put(&mut out, &r);
        }
        if !out.is_empty() {
            if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
                return;
            }
            out.clear();
        }
        if closing && in_flight.is_empty() {
            let _ = io.shutdown().await;
            return;
        }
        tokio::select! {
            Some(r) = in_flight.next(), if !in_flight.is_empty() => put(&mut out, &r),
            read = io.read_buf(&mut inbuf), if !closing && in_flight.len() < MAX_IN_FLIGHT => {
                match read {
                    Ok(0) | Err(_) => closing = true,
                    Ok(_) => {}
                }
                loop {
                    match next_frame(&mut inbuf, MAX_REQUEST_BYTES) {
                        Ok(Some(body)) => {
                            let w = witness.clone();
                            match decode_frame(&body) {
                                Decoded::Request(req) => {
                                    in_flight.push_back(async move { w.handle(req).await }.boxed())
                                }
                                Decoded::Refused(r) => {
                                    if let Response::Error { code, .. } = &r {
                                        refused(&witness, code);
                                    }
                                    in_flight.push_back(futures::future::ready(r).boxed())
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            refused(&witness, e.label());
                            tracing::info!(error = %e, "lease stream: bad frame; closing after pending answers");
                            let r = frame_error(&e);
                            in_flight.push_back(futures::future::ready(r).boxed());
                            closing = true;
                            break;
                        }
                    }
                }
            }
            // Unreachable (the checks above return first); never panic.
            else => return,
        }
    }
}

fn put(out: &mut BytesMut, r: &Response) {
    put_frame(out, &r.encode());
}

fn refused(witness: &Witness, outcome: &str) {
    witness
        .metrics()
        .requests
        .with_label_values(&["none", outcome])
        .inc();
}
