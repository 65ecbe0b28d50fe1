//! A real PowerDNS authoritative server (Debian's `pdns-server` with the
//! sqlite3 back-end) as a child process, without root or system files: its
//! own config dir, sqlite database, DNS port and API port on 127.0.0.1.
//!
//! The zone is created with `pdnsutil` against the same config dir before the
//! server starts; the server is ready once its API reports the zone. Drop
//! kills it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const PDNS_SERVER: &str = "/usr/sbin/pdns_server";
const PDNSUTIL: &str = "/usr/bin/pdnsutil";
const SCHEMA: &str = "/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql";
/// API key of every test server.
pub const API_KEY: &str = "continuum-test-pdns-key";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One running (or stopped) PowerDNS server.
pub struct PdnsProc {
    dir: tempfile::TempDir,
    child: Option<Child>,
    dns_port: u16,
    api_port: u16,
    api_key: String,
    zone: String,
}

impl PdnsProc {
    /// Starts a server authoritative for `zone` (e.g. `lease.test`).
    pub fn start(zone: &str) -> anyhow::Result<PdnsProc> {
        let mut last = None;
        // Free ports are picked by binding and releasing them; another test
        // can take one in between, so try a few times.
        for _ in 0..3 {
            match Self::try_start(zone) {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PowerDNS did not start")))
    }

    fn try_start(zone: &str) -> anyhow::Result<PdnsProc> {
        let dir = tempfile::Builder::new()
            .prefix("continuum-pdns-")
            .tempdir()
            .context("temp dir")?;
        let dns_port = free_udp_tcp_port()?;
        let api_port = free_tcp_port()?;
        // One key for every test server, so that one publisher reaches all
        // (the API listens on loopback only).
        let api_key = API_KEY.to_string();
        let zone = zone.trim_end_matches('.').to_string();
        let db = dir.path().join("pdns.sqlite3");
        let schema = std::fs::File::open(SCHEMA).with_context(|| format!("open {SCHEMA}"))?;
        let status = Command::new("sqlite3")
            .arg(&db)
            .stdin(schema)
            .status()
            .context("run sqlite3 (Debian package sqlite3)")?;
        if !status.success() {
            bail!("sqlite3 could not load the PowerDNS schema: {status}");
        }
        write_config(dir.path(), &db, dns_port, api_port, &api_key)?;
        let out = Command::new(PDNSUTIL)
            .arg(format!("--config-dir={}", dir.path().display()))
            .args(["create-zone", &zone])
            .output()
            .context("run pdnsutil")?;
        if !out.status.success() {
            bail!(
                "pdnsutil create-zone {zone}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut p = PdnsProc {
            dir,
            child: None,
            dns_port,
            api_port,
            api_key,
            zone,
        };
        p.restart()?;
        Ok(p)
    }

    /// (Re)starts the server on the same ports and database.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let log = std::fs::File::create(self.log_path()).context("create log")?;
        let child = Command::new(PDNS_SERVER)
            .arg(format!("--config-dir={}", self.dir.path().display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {PDNS_SERVER}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    bail!("pdns_server exited with {status}: {}", self.log_tail());
                }
            }
            if self.zone_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                bail!(
                    "pdns_server not ready in {READY_TIMEOUT:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL) and waits for it; the database stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Where the server answers DNS (UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.dns_port))
    }

    /// Base URL of the HTTP API (`http://127.0.0.1:<port>`).
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Replaces the TXT rrset at `record` (absolute, with the final dot)
    /// with one record of raw `content` (PowerDNS zone-file syntax, quotes
    /// included), through the API: how tests plant stale or malformed
    /// answers behind the publisher's back.
    pub fn set_txt(&self, record: &str, content: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({"rrsets": [{
            "name": record, "type": "TXT", "ttl": 5, "changetype": "REPLACE",
            "records": [{"content": content, "disabled": false}],
        }]})
        .to_string();
        let req = format!(
            "PATCH /api/v1/servers/localhost/zones/{}. HTTP/1.0\r\nHost: 127.0.0.1\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.zone,
            self.api_key,
            body.len()
        );
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], self.api_port)))
            .context("connect to the PowerDNS API")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(req.as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        if !resp.starts_with("HTTP/1.1 204") && !resp.starts_with("HTTP/1.0 204") {
            bail!("PowerDNS refused the TXT change: {resp}");
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pdns.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        log.get(start..).unwrap_or_default().to_string()
    }

    /// Whether the API answers 200 for the zone (the DNS listener is up by
    /// then: PowerDNS opens it before the web server).
    fn zone_ready(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.api_port)),
            Duration::from_millis(200),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = format!(
            "GET /api/v1/servers/localhost/zones/{}. HTTP/1.0\r\nHost: 127.0.0.1\r\nX-API-Key: {}\r\n\r\n",
            self.zone, self.api_key
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        if s.read_exact(&mut head).is_err() {
            return false;
        }
        head.starts_with(b"HTTP/1.")
            && &head[9..12] == b"200"
            && TcpStream::connect_timeout(&self.dns_addr(), Duration::from_millis(200)).is_ok()
    }
}

impl Drop for PdnsProc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_config(
    dir: &Path,
    db: &Path,
    dns_port: u16,
    api_port: u16,
    api_key: &str,
) -> anyhow::Result<()> {
    let conf = format!(
        "launch=gsqlite3
gsqlite3-database={db}
local-address=127.0.0.1
local-port={dns_port}
webserver=yes
webserver-address=127.0.0.1
webserver-port={api_port}
webserver-allow-from=127.0.0.0/8
webserver-loglevel=none
api=yes
api-key={api_key}
daemon=no
guardian=no
socket-dir={sock}
disable-syslog=yes
security-poll-suffix=
receiver-threads=1
distributor-threads=1
loglevel=4
",
        db = db.display(),
        sock = dir.display(),
    );
    std::fs::write(dir.join("pdns.conf"), conf).context("write pdns.conf")
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A port free for both UDP and TCP (DNS listens on both).
fn free_udp_tcp_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP on 127.0.0.1")
}
