//! A `continuum-witness serve` process for tests and benchmarks.
//!
//! The binary is looked up next to the test executable
//! (`target/<profile>/continuum-witness`; override with
//! `CONTINUUM_WITNESS_BIN`). Build it first: `cargo build -p continuum-witness`
//! (add `--release` for the benchmark).
//!
//! Each witness gets free loopback ports and a temporary data directory that
//! survive [`WitnessProc::kill9`] and [`WitnessProc::restart`]. `start` and
//! `restart` return once `/readyz` answers 200. Dropping the value kills the
//! process.
//!
//! ```no_run
//! use continuum_tests::witness_proc::{WitnessOpts, WitnessProc};
//! let mut w = WitnessProc::start(WitnessOpts::default())?;
//! let url = w.api_url();          // https://127.0.0.1:<port>
//! let pki = w.pki().clone();      // CA + client certificate accepted by `w`
//! w.kill9();
//! w.restart()?;                   // same ports, same data
//! # anyhow::Ok(())
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use continuum_shared::lease::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::pki::{Identity, Pki};

/// Which store the witness uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOpt {
    /// The embedded redb file in the witness's temporary data directory.
    Embedded,
    /// etcd at `endpoints` under `prefix`.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

/// How to start a witness.
#[derive(Clone)]
pub struct WitnessOpts {
    pub store: StoreOpt,
    /// Certificates to use; several witnesses sharing one [`Pki`] accept the
    /// same client certificates. Generated when `None`.
    pub pki: Option<Arc<Pki>>,
    /// Extra environment variables for the process.
    pub env: Vec<(String, String)>,
    /// Extra `serve` arguments.
    pub extra_args: Vec<String>,
}

impl Default for WitnessOpts {
    fn default() -> Self {
        WitnessOpts {
            store: StoreOpt::Embedded,
            pki: None,
            env: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

impl WitnessOpts {
    /// A witness on the etcd store.
    pub fn etcd(endpoint: impl Into<String>, prefix: impl Into<String>) -> WitnessOpts {
        WitnessOpts {
            store: StoreOpt::Etcd {
                endpoints: vec![endpoint.into()],
                prefix: prefix.into(),
            },
            ..WitnessOpts::default()
        }
    }

    pub fn with_pki(mut self, pki: Arc<Pki>) -> WitnessOpts {
        self.pki = Some(pki);
        self
    }

    /// Test-only: disable the restart rule (debug builds of the witness
    /// only), to prove a checker catches its absence.
    pub fn unsafe_skip_restart_rule(mut self) -> WitnessOpts {
        self.env
            .push(("CONTINUUM_TEST_UNSAFE_SKIP_RESTART_RULE".into(), "1".into()));
        self
    }
}

/// Path of the witness binary (see [`crate::bins`]).
pub fn witness_bin() -> anyhow::Result<PathBuf> {
    crate::bins::workspace_bin("continuum-witness")
}

/// A free loopback TCP port (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Minimal blocking HTTP/1.0 GET: `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

/// Last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub struct WitnessProc {
    child: Option<Child>,
    opts: WitnessOpts,
    pki: Arc<Pki>,
    dir: tempfile::TempDir,
    api_port: u16,
    health_port: u16,
}

impl WitnessProc {
    /// Starts a witness and waits until it is ready (up to 30 s).
    pub fn start(opts: WitnessOpts) -> anyhow::Result<WitnessProc> {
        let pki = match &opts.pki {
            Some(p) => p.clone(),
            None => Arc::new(Pki::generate()?),
        };
        let dir = tempfile::Builder::new()
            .prefix("continuum-witness-")
            .tempdir()
            .context("temp dir for witness")?;
        let mut w = WitnessProc {
            child: None,
            opts,
            pki,
            dir,
            api_port: free_port()?,
            health_port: free_port()?,
        };
        w.spawn()?;
        Ok(w)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(witness_bin()?);
        cmd.arg("serve")
            .arg(format!("--api-listen=127.0.0.1:{}", self.api_port))
            .arg(format!("--health-listen=127.0.0.1:{}", self.health_port))
            .arg("--tls-cert")
            .arg(&self.pki.server.cert)
            .arg("--tls-key")
            .arg(&self.pki.server.key)
            .arg("--client-ca")
            .arg(&self.pki.ca_cert)
            .arg("--data-dir")
            .arg(self.data_dir());
        match &self.opts.store {
            StoreOpt::Embedded => {
                cmd.arg("--store=embedded");
            }
            StoreOpt::Etcd { endpoints, prefix } => {
                cmd.arg("--store=etcd")
                    .arg(format!("--etcd-endpoints={}", endpoints.join(",")))
                    .arg(format!("--etcd-prefix={prefix}"));
            }
        }
        cmd.args(&self.opts.extra_args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .env_remove("CONTINUUM_WITNESS_STORE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("cannot start continuum-witness")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(self.health_addr(), "/readyz") {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    anyhow::bail!("witness exited with {status}:\n{}", self.log_tail());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("witness not ready after 30 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn api_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.api_port).into()
    }

    pub fn health_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.health_port).into()
    }

    /// `https://127.0.0.1:<port>` (the lease API is `POST /v1/lease`).
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The certificates this witness trusts and serves.
    pub fn pki(&self) -> &Arc<Pki> {
        &self.pki
    }

    /// The embedded store's directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("witness.log")
    }

    /// Last lines of the witness's log (all runs).
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 30)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again (killing first if still running) with the same ports,
    /// data directory and options; returns once ready.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = http_get(self.health_addr(), "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// A test HTTPS client presenting the PKI's client certificate.
    pub fn client(&self) -> anyhow::Result<TestClient> {
        TestClient::new(self.api_addr(), &self.pki.ca_pem, Some(&self.pki.client))
    }
}

impl Drop for WitnessProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A simple HTTPS client for tests: one TLS connection per request, so that
/// every request exercises the handshake (client certificate checks).
#[derive(Clone)]
pub struct TestClient {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

impl TestClient {
    /// `identity = None` connects without a client certificate.
    pub fn new(
        addr: SocketAddr,
        ca_pem: &str,
        identity: Option<&Identity>,
    ) -> anyhow::Result<TestClient> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match identity {
            Some(id) => {
                let certs = rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()?;
                let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())?
                    .context("no key in identity")?;
                builder.with_client_auth_cert(certs, key)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(TestClient {
            addr,
            config: Arc::new(config),
        })
    }

    /// Sends one HTTP request; `(status, body)`. Fails if the TLS handshake
    /// or the exchange fails.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector
            .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
            .await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "127.0.0.1");
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok((status, body))
    }

    /// Opens a raw lease-stream connection (ALPN `continuum-lease/1`), for
    /// tests that write arbitrary frames.
    pub async fn raw_stream(
        &self,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let mut config = (*self.config).clone();
        config.alpn_protocols =
            vec![continuum_shared::transport::frame::LEASE_STREAM_ALPN.to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
            .await?;
        Ok(tls)
    }

    /// POSTs raw bytes to `/v1/lease` as JSON.
    pub async fn post(&self, body: impl Into<Vec<u8>>) -> anyhow::Result<(u16, Response)> {
        let (status, body) = self
            .raw("POST", "/v1/lease", Some("application/json"), body.into())
            .await?;
        let resp = Response::decode(&body).with_context(|| {
            format!("status {status}, body {:?}", String::from_utf8_lossy(&body))
        })?;
        Ok((status, resp))
    }

    /// Sends a lease request; `(status, response)`.
    pub async fn send(&self, req: &Request) -> anyhow::Result<(u16, Response)> {
        self.post(req.encode()).await
    }
}
