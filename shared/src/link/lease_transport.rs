//! The lease protocol over the link, client side: a [`LeaseTransport`] that
//! sends each request as one UDP message to a witness's [`LEASE_PORT`] inside
//! the tunnel and waits for the answer on a port of its own. The quorum
//! client can mix it with HTTPS transports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Inbound, LinkEndpoint, PublicKey, LEASE_PORT};
use crate::lease::{Request, Response};
use crate::transport::{BoxFuture, LeaseTransport, TransportError};

/// Local in-tunnel ports used for requests (one per request in flight).
const FIRST_PORT: u16 = 40_000;
const PORTS: u16 = 20_000;

type Pending = Arc<Mutex<HashMap<(PublicKey, u16), oneshot::Sender<Vec<u8>>>>>;

/// Owns the link's inbound messages: lease answers go to the waiting
/// request, everything else to `others` (if given).
pub struct LinkLeaseClient {
    link: Arc<LinkEndpoint>,
    pending: Pending,
    next: Arc<Mutex<u16>>,
    task: JoinHandle<()>,
}

impl LinkLeaseClient {
    pub fn new(
        link: Arc<LinkEndpoint>,
        mut inbound: mpsc::Receiver<Inbound>,
        others: Option<mpsc::Sender<Inbound>>,
    ) -> Self {
        let pending: Pending = Arc::default();
        let table = pending.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = inbound.recv().await {
                if msg.src_port == LEASE_PORT {
                    let waiter = table
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&(msg.peer, msg.dst_port));
                    if let Some(tx) = waiter {
                        let _ = tx.send(msg.payload);
                        continue;
                    }
                }
                if let Some(o) = &others {
                    let _ = o.try_send(msg);
                }
            }
        });
        LinkLeaseClient {
            link,
            pending,
            next: Arc::new(Mutex::new(0)),
            task,
        }
    }

    /// A transport to one witness (by its public key).
    pub fn transport(&self, witness: PublicKey, timeout: Duration) -> LinkLeaseTransport {
        LinkLeaseTransport {
            link: self.link.clone(),
            pending: self.pending.clone(),
            next: self.next.clone(),
            witness,
            timeout,
        }
    }
}

impl Drop for LinkLeaseClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// [`LeaseTransport`] over the control link to one witness.
pub struct LinkLeaseTransport {
    link: Arc<LinkEndpoint>,
    pending: Pending,
    next: Arc<Mutex<u16>>,
    witness: PublicKey,
    timeout: Duration,
}

impl LinkLeaseTransport {
    /// Reserves a free local port for one request.
    fn reserve(&self) -> Result<(u16, oneshot::Receiver<Vec<u8>>), TransportError> {
        let mut table = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..PORTS {
            let port = FIRST_PORT + *next;
            *next = (*next + 1) % PORTS;
            if let std::collections::hash_map::Entry::Vacant(v) = table.entry((self.witness, port))
            {
                let (tx, rx) = oneshot::channel();
                v.insert(tx);
                return Ok((port, rx));
            }
        }
        Err(TransportError::Config(
            "too many lease requests in flight".into(),
        ))
    }

    fn release(&self, port: u16) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.witness, port));
    }
}

impl LeaseTransport for LinkLeaseTransport {
    fn call<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Result<Response, TransportError>> {
        Box::pin(async move {
            let (port, rx) = self.reserve()?;
            let result = async {
                self.link
                    .send_udp(&self.witness, port, LEASE_PORT, &req.encode())
                    .await
                    .map_err(|e| TransportError::Connect(e.to_string()))?;
                let body = tokio::time::timeout(self.timeout, rx)
                    .await
                    .map_err(|_| TransportError::Timeout(self.timeout))?
                    .map_err(|_| TransportError::Connect("link client stopped".into()))?;
                Response::decode(&body).map_err(|e| TransportError::BadResponse {
                    status: 0,
                    message: e.to_string(),
                })
            }
            .await;
            self.release(port);
            result
        })
    }

    fn endpoint(&self) -> String {
        format!("wg://{}:{LEASE_PORT}", self.witness)
    }
}
