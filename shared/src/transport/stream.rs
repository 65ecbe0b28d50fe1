//! Lease stream transport: one mutually authenticated TLS connection per
//! witness (ALPN [`LEASE_STREAM_ALPN`], see [`super::frame`]) that every
//! caller shares. Requests are pipelined: a driver task writes whatever
//! callers queued with one write and hands each answer, in order, to the
//! caller waiting for it.
//!
//! Failure handling mirrors the HTTPS pool's: a broken connection fails
//! every call waiting on it and the next call reconnects; a call that times
//! out also drops the connection, so a black-holed TCP connection (a
//! partition) is never reused.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_rustls::TlsConnector;

use super::frame::{next_frame, put_frame, LEASE_STREAM_ALPN, MAX_RESPONSE_BYTES};
use super::https::TlsMaterial;
use super::{BoxFuture, LeaseTransport, TransportError};
use crate::lease::{Request, Response};

/// Calls queued on one connection before callers wait for room. Bounds what
/// a stalled connection can hold.
const QUEUE: usize = 1024;

type Reply = oneshot::Sender<Result<Response, TransportError>>;

/// One witness reached over the lease stream.
pub struct StreamTransport {
    base: String,
    /// `host:port` to connect to.
    authority: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
}

#[derive(Clone)]
struct Conn {
    /// Distinguishes connections, so a timed-out call drops only the one it
    /// used.
    id: u64,
    jobs: mpsc::Sender<(Vec<u8>, Reply)>,
}

impl std::fmt::Debug for StreamTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTransport")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl StreamTransport {
    /// `base` is the witness's API URL (`https://host:port`, the same port
    /// as the HTTPS API); the server certificate must name `host`. `timeout`
    /// bounds each call, connecting included.
    pub fn new(base: &str, tls: &TlsMaterial, timeout: Duration) -> Result<Self, TransportError> {
        let base = base.trim_end_matches('/').to_string();
        let bad = |why: &str| TransportError::Config(format!("witness URL {base:?}: {why}"));
        let uri: http::Uri = base.parse().map_err(|e| bad(&format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must start with https://"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().unwrap_or(443);
        // IPv6 literals keep their brackets in the URI's host.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare.to_string())
            .map_err(|e| bad(&format!("host is not a valid server name: {e}")))?;
        let mut config = tls.client_config()?;
        config.alpn_protocols = vec![LEASE_STREAM_ALPN.to_vec()];
        Ok(Self {
            authority: format!("{host}:{port}"),
            base,
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            timeout,
            conn: Mutex::new(None),
        })
    }

    /// The live connection, or a new one.
    async fn conn(&self) -> Result<Conn, TransportError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.jobs.is_closed()) {
            return Ok(c.clone());
        }
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| TransportError::Connect(format!("{}: {e}", self.authority)))?;
        // Small frames: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                if matches!(
                    &e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
                    Some(rustls::Error::AlertReceived(
                        rustls::AlertDescription::NoApplicationProtocol
                    ))
                ) {
                    self.no_stream_protocol()
                } else {
                    TransportError::Connect(format!("TLS with {}: {e}", self.base))
                }
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(LEASE_STREAM_ALPN) {
            return Err(self.no_stream_protocol());
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = slot.as_ref().map_or(0, |c| c.id + 1);
        tokio::spawn(drive(tls, rx, self.base.clone()));
        let c = Conn { id, jobs: tx };
        *slot = Some(c.clone());
        Ok(c)
    }

    fn no_stream_protocol(&self) -> TransportError {
        TransportError::Config(format!(
            "{} does not offer the lease stream protocol ({}); upgrade the witness or use the HTTPS protocol",
            self.base,
            String::from_utf8_lossy(LEASE_STREAM_ALPN)
        ))
    }

    /// Drops connection `id` if it is still the current one.
    async fn discard(&self, id: u64) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.id == id) {
            *slot = None;
        }
    }

    async fn send(
        &self,
        req: &Request,
        used: &mut Option<u64>,
    ) -> Result<Response, TransportError> {
        let c = self.conn().await?;
        *used = Some(c.id);
        let (tx, rx) = oneshot::channel();
        c.jobs
            .send((req.encode(), tx))
            .await
            .map_err(|_| TransportError::Connect(format!("connection to {} closed", self.base)))?;
        rx.await
            .map_err(|_| TransportError::Connect(format!("connection to {} closed", self.base)))?
    }
}

/// Owns one TLS connection: writes queued requests (all that are waiting,
/// in one write) and answers callers in order as frames come back. Ends
/// when the connection breaks or every sender is gone; dropping the pending
/// replies then tells their callers.
async fn drive<S>(mut io: S, mut jobs: mpsc::Receiver<(Vec<u8>, Reply)>, base: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut pending: VecDeque<Reply> = VecDeque::new();
    let mut inbuf = BytesMut::with_capacity(8 * 1024);
    let mut out = BytesMut::with_capacity(8 * 1024);
    loop {
        tokio::select! {
            job = jobs.recv() => {
                let Some((body, reply)) = job else { return };
                put_frame(&mut out, &body);
                pending.push_back(reply);
                while let Ok((body, reply)) = jobs.try_recv() {
                    put_frame(&mut out, &body);
                    pending.push_back(reply);
                }
                if let Err(e) = async { io.write_all(&out).await?; io.flush().await }.await {
                    tracing::debug!(witness = %base, error = %e, "lease stream write failed");
                    return;
                }
                out.clear();
            }
            read = io.read_buf(&mut inbuf) => {
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                loop {
                    match next_frame(&mut inbuf, MAX_RESPONSE_BYTES) {
                        Ok(Some(body)) => {
                            let Some(reply) = pending.pop_front() else {
                                tracing::warn!(witness = %base, "lease stream: answer without a request; closing");
                                return;
                            };
                            let r = Response::decode(&body).map_err(|e| TransportError::BadResponse {
                                status: 0,
                                message: e.to_string(),
                            });
                            // The caller may have timed out and gone: fine.
                            let _ = reply.send(r);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(witness = %base, error = %e, "lease stream: bad frame; closing");
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl LeaseTransport for StreamTransport {
    fn call<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Result<Response, TransportError>> {
        Box::pin(async move {
            let mut used = None;
            match tokio::time::timeout(self.timeout, self.send(req, &mut used)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => {
                    if let Some(id) = used {
                        self.discard(id).await;
                    }
                    Err(e)
                }
                Err(_) => {
                    // A silent connection may be black-holed: never reuse it.
                    if let Some(id) = used {
                        self.discard(id).await;
                    }
                    Err(TransportError::Timeout(self.timeout))
                }
            }
        })
    }

    fn endpoint(&self) -> String {
        format!("{} (lease stream)", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material() -> TlsMaterial {
        TlsMaterial {
            ca_pem: vec![],
            cert_pem: vec![],
            key_pem: vec![],
        }
    }

    #[test]
    fn urls_are_checked_before_any_connection() {
        for (url, want) in [
            ("http://127.0.0.1:1", "https://"),
            ("https://", "witness URL"),
        ] {
            let err = StreamTransport::new(url, &material(), Duration::from_secs(1))
                .expect_err(url)
                .to_string();
            assert!(err.contains(want), "{url}: {err} should mention {want}");
        }
    }

    /// Answers come back to the callers that asked, in order, across
    /// pipelined requests; a peer that closes fails the waiting call.
    #[tokio::test]
    async fn driver_matches_answers_to_callers_in_order() {
        use crate::lease::{LeaseName, Read};
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drive(client, rx, "test".into()));
        let mut waits = Vec::new();
        for i in 0..5 {
            let req = Request::Read(Read {
                name: LeaseName::new(format!("l{i}")).unwrap(),
            });
            let (rtx, rrx) = oneshot::channel();
            tx.send((req.encode(), rtx)).await.unwrap();
            waits.push(rrx);
        }
        // The fake witness answers each request with an error naming it.
        let mut buf = BytesMut::new();
        let mut seen = 0;
        let mut out = BytesMut::new();
        while seen < 5 {
            server.read_buf(&mut buf).await.unwrap();
            while let Some(body) = next_frame(&mut buf, 8192).unwrap() {
                let req = Request::decode(&body).unwrap();
                let r = Response::Error {
                    code: "echo".into(),
                    message: req.name().to_string(),
                };
                put_frame(&mut out, &r.encode());
                seen += 1;
            }
        }
        server.write_all(&out).await.unwrap();
        for (i, w) in waits.into_iter().enumerate() {
            match w.await.unwrap().unwrap() {
                Response::Error { message, .. } => assert_eq!(message, format!("l{i}")),
                other => panic!("unexpected {other:?}"),
            }
        }
        let (rtx, rrx) = oneshot::channel();
        tx.send((b"{}".to_vec(), rtx)).await.unwrap();
        drop(server);
        assert!(
            rrx.await.is_err(),
            "a closed connection must fail the waiting call"
        );
    }
}
