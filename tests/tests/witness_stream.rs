//! The lease stream protocol (ALPN `continuum-lease/1` on the witness's API
//! port): same leases as the HTTPS API, pipelined answers matched to their
//! callers, bad frames and missing client certificates change nothing, and
//! the client recovers from a killed witness and from a black-holed
//! connection.
//!
//! Needs the binary: `cargo build -p continuum-witness`.

mod witness_cases;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use continuum_shared::lease::{Epoch, Response};
use continuum_shared::transport::frame::{next_frame, put_frame, MAX_RESPONSE_BYTES};
use continuum_shared::transport::https::TlsMaterial;
use continuum_shared::transport::stream::StreamTransport;
use continuum_shared::transport::{LeaseTransport, TransportError};
use continuum_tests::pki::Pki;
use continuum_tests::witness_proc::{TestClient, WitnessOpts, WitnessProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use witness_cases::*;

fn witness() -> WitnessProc {
    WitnessProc::start(WitnessOpts::default()).unwrap()
}

fn tls(pki: &Pki) -> TlsMaterial {
    TlsMaterial {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        cert_pem: pki.client.cert_pem.clone().into_bytes(),
        key_pem: pki.client.key_pem.clone().into_bytes(),
    }
}

fn stream(w: &WitnessProc, timeout: Duration) -> StreamTransport {
    StreamTransport::new(&w.api_url(), &tls(w.pki()), timeout).unwrap()
}

/// Reads frames until `n` arrived or the connection ended.
async fn read_frames<S: tokio::io::AsyncRead + Unpin>(io: &mut S, n: usize) -> Vec<Response> {
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("no frame within 5 s ({} of {n})", got.len()),
        }
        while let Some(f) = next_frame(&mut buf, MAX_RESPONSE_BYTES).unwrap() {
            got.push(Response::decode(&f).unwrap());
        }
    }
    got
}

/// True once the peer has closed (EOF or reset) within 5 s.
async fn closed<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), io.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn free_lease(c: &TestClient, lease: &str) {
    let v = view(c, lease).await;
    assert!(
        v.holder.is_none() && v.max_epoch == Epoch(0) && v.meta.is_none(),
        "{lease} must be untouched: {v:?}"
    );
}

#[tokio::test]
async fn stream_and_https_arbitrate_the_same_leases() {
    let w = witness();
    let s = stream(&w, Duration::from_secs(2));
    let https = w.client().unwrap();
    let lease = "stream/shared";
    assert_eq!(
        s.call(&acquire(lease, "eu-1", 1, 10_000)).await.unwrap(),
        Response::Granted {
            epoch: Epoch(1),
            ttl_ms: 10_000
        }
    );
    let (status, r) = https
        .send(&acquire(lease, "us-1", 2, 10_000))
        .await
        .unwrap();
    assert_eq!(status, 409, "{r:?}");
    assert!(
        matches!(
            r,
            Response::Held {
                epoch: Epoch(1),
                ..
            }
        ),
        "{r:?}"
    );
    let v = view(&https, lease).await;
    assert_eq!(v.holder.as_ref().map(|h| h.as_str()), Some("eu-1"));
    assert_eq!(v.epoch, Epoch(1));
    assert!(
        matches!(
            s.call(&renew(lease, "us-1", 2, 10_000)).await.unwrap(),
            Response::NotHolder { .. }
        ),
        "a non-holder's renewal is refused on the stream too"
    );
    assert_eq!(
        s.call(&release(lease, "eu-1", 1)).await.unwrap(),
        Response::Released
    );
    let (status, r) = https
        .send(&acquire(lease, "us-1", 2, 10_000))
        .await
        .unwrap();
    assert_eq!((status, r.is_refusal()), (200, false), "{r:?}");
}

/// Many callers share one connection; each gets the answer to its own
/// request (epochs and holders differ per caller, so a mix-up shows).
#[tokio::test]
async fn pipelined_callers_get_their_own_answers() {
    let w = witness();
    let s = Arc::new(stream(&w, Duration::from_secs(5)));
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let lease = format!("stream/pipe/{i}");
            let holder = format!("h{i}");
            for round in 0..20u64 {
                let want_epoch = Epoch(i + 1);
                let req = if round == 0 {
                    acquire(&lease, &holder, i + 1, 30_000)
                } else {
                    renew(&lease, &holder, i + 1, 30_000)
                };
                let r = s.call(&req).await.unwrap();
                assert_eq!(
                    r,
                    Response::Granted {
                        epoch: want_epoch,
                        ttl_ms: 30_000
                    },
                    "caller {i} round {round}"
                );
                match s.call(&read(&lease)).await.unwrap() {
                    Response::State(v) => {
                        assert_eq!(v.name.as_str(), lease);
                        assert_eq!(
                            v.holder.map(|h| h.as_str().to_string()),
                            Some(holder.clone())
                        );
                    }
                    other => panic!("caller {i}: read answered {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = w.metrics().unwrap();
    assert!(
        m.contains(r#"continuum_witness_requests_total{op="renew",outcome="granted"} 1216"#),
        "64 callers x 19 renewals expected in /metrics:\n{m}"
    );
}

/// Undecodable and invalid requests get an error frame naming the problem
/// and the connection goes on; a bad length prefix ends it. Nothing changes.
#[tokio::test]
async fn bad_frames_get_errors_and_change_nothing() {
    let w = witness();
    let c = w.client().unwrap();
    let mut io = c.raw_stream().await.unwrap();
    let ok = acquire("stream/bad/ok", "eu-1", 1, 5_000).encode();
    let mut out = BytesMut::new();
    for body in [
        b"not json".to_vec(),
        br#"{"acquire":{"name":"stream/bad/x","holder":"eu-1","epoch":1,"ttl_ms":5000,"extra":1}}"#
            .to_vec(),
        br#"{"acquire":{"name":"stream/bad/x","holder":"eu-1","epoch":1,"ttl_ms":0}}"#.to_vec(),
        br#"{"acquire":{"name":"","holder":"eu-1","epoch":1,"ttl_ms":5000}}"#.to_vec(),
        ok,
    ] {
        put_frame(&mut out, &body);
    }
    io.write_all(&out).await.unwrap();
    let answers = read_frames(&mut io, 5).await;
    let codes: Vec<String> = answers
        .iter()
        .map(|r| match r {
            Response::Error { code, message } => {
                assert!(!message.is_empty());
                code.clone()
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        codes[..4],
        ["malformed", "malformed", "invalid", "malformed"],
        "{answers:?}"
    );
    assert_eq!(
        answers[4],
        Response::Granted {
            epoch: Epoch(1),
            ttl_ms: 5_000
        },
        "the connection goes on after bad requests"
    );
    // A length prefix over the limit: an error frame, then the witness
    // closes (the next frame boundary is unknown).
    io.write_all(&[0, 1, 0, 0, b'{']).await.unwrap();
    let r = read_frames(&mut io, 1).await;
    assert!(
        matches!(&r[..], [Response::Error { code, .. }] if code == "too_large"),
        "{r:?}"
    );
    assert!(
        closed(&mut io).await,
        "witness must close after a bad length"
    );
    free_lease(&c, "stream/bad/x").await;
}

#[tokio::test]
async fn no_client_certificate_is_refused_and_changes_nothing() {
    let w = witness();
    let anon = TestClient::new(w.api_addr(), &w.pki().ca_pem, None).unwrap();
    let mut io = anon.raw_stream().await.unwrap();
    let mut out = BytesMut::new();
    put_frame(&mut out, &acquire("stream/anon", "eu-1", 1, 5_000).encode());
    // The witness may already have closed; the answer is what counts.
    let _ = io.write_all(&out).await;
    let r = read_frames(&mut io, 1).await;
    assert!(
        matches!(&r[..], [Response::Error { code, .. }] if code == "unauthenticated"),
        "{r:?}"
    );
    assert!(closed(&mut io).await);
    free_lease(&w.client().unwrap(), "stream/anon").await;
}

/// kill -9 fails the calls of the dead connection; after the restart the
/// next call connects again, and the restart rule still holds (the grant
/// made before the crash counts as live).
#[tokio::test]
async fn killed_witness_fails_calls_and_the_client_reconnects() {
    let mut w = witness();
    let s = stream(&w, Duration::from_millis(800));
    let lease = "stream/crash";
    assert!(matches!(
        s.call(&acquire(lease, "eu-1", 1, 3_000)).await.unwrap(),
        Response::Granted { .. }
    ));
    w.kill9();
    let err = s.call(&read(lease)).await.expect_err("witness is dead");
    assert!(
        matches!(err, TransportError::Connect(_) | TransportError::Timeout(_)),
        "{err}"
    );
    let w = tokio::task::spawn_blocking(move || {
        w.restart().unwrap();
        w
    })
    .await
    .unwrap();
    match s.call(&acquire(lease, "us-1", 2, 3_000)).await.unwrap() {
        Response::Held { holder, epoch, .. } => {
            assert_eq!((holder.as_str(), epoch), ("eu-1", Epoch(1)))
        }
        other => panic!("restart rule: the pre-crash grant must still hold, got {other:?}"),
    }
    drop(w);
}

/// A TCP relay that can silently stop forwarding on the connections it
/// already has (a black hole, as a partition looks to TCP) while new
/// connections still go through.
struct Relay {
    addr: std::net::SocketAddr,
    cut_before: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cut_before = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (cut, acc) = (Arc::clone(&cut_before), Arc::clone(&accepted));
        tokio::spawn(async move {
            loop {
                let Ok((a, _)) = l.accept().await else { return };
                let generation = acc.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(b) = TcpStream::connect(to).await else {
                    return;
                };
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                for (mut r, mut wr) in [(ar, bw), (br, aw)] {
                    let cut = Arc::clone(&cut);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if generation <= cut.load(Ordering::SeqCst) {
                                continue; // black hole: swallow
                            }
                            if wr.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Relay {
            addr,
            cut_before,
            accepted,
        }
    }

    /// Black-holes every connection accepted so far.
    fn cut_existing(&self) {
        self.cut_before
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_black_holed_connection_is_dropped_after_a_timeout() {
    let w = witness();
    let relay = Relay::start(w.api_addr()).await;
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let s = StreamTransport::new(&url, &tls(w.pki()), Duration::from_millis(500)).unwrap();
    let lease = "stream/blackhole";
    assert!(matches!(
        s.call(&acquire(lease, "eu-1", 1, 30_000)).await.unwrap(),
        Response::Granted { .. }
    ));
    relay.cut_existing();
    let err = s
        .call(&renew(lease, "eu-1", 1, 30_000))
        .await
        .expect_err("black hole");
    assert!(matches!(err, TransportError::Timeout(_)), "{err}");
    // The timed-out connection is not reused: this call opens a new one.
    assert_eq!(
        s.call(&renew(lease, "eu-1", 1, 30_000)).await.unwrap(),
        Response::Granted {
            epoch: Epoch(1),
            ttl_ms: 30_000
        }
    );
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 2, "one reconnect");
}

/// An HTTPS-only peer (no lease stream ALPN) gets a configuration error
/// that says what to do, not a protocol mix-up.
#[tokio::test]
async fn a_witness_without_the_stream_protocol_is_named() {
    // A TLS server offering only http/1.1, with the witness PKI's server cert.
    let pki = Pki::generate().unwrap();
    let certs = rustls_pemfile::certs(&mut pki.server.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut pki.server.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let s = StreamTransport::new(
        &format!("https://127.0.0.1:{port}"),
        &tls(&pki),
        Duration::from_secs(2),
    )
    .unwrap();
    let err = s.call(&read("x")).await.expect_err("no stream protocol");
    assert_eq!(err.label(), "config", "{err}");
    assert!(err.to_string().contains("lease stream"), "{err}");
}
