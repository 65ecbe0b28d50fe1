//! A real etcd (`/usr/bin/etcd`) on free loopback ports with a temporary
//! data directory. `kill9()` and `restart()` keep the data directory and
//! ports; dropping the value kills the process.
//!
//! ```no_run
//! let etcd = continuum_tests::etcd_proc::EtcdProc::start()?;
//! let endpoint = etcd.endpoint(); // "http://127.0.0.1:<port>"
//! # anyhow::Ok(())
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::witness_proc::{free_port, http_get};

/// Path of the etcd binary (override with `CONTINUUM_ETCD_BIN`).
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("CONTINUUM_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

pub struct EtcdProc {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl EtcdProc {
    /// Starts etcd and waits until `/health` answers healthy (up to 30 s).
    pub fn start() -> anyhow::Result<EtcdProc> {
        let dir = tempfile::Builder::new()
            .prefix("continuum-etcd-")
            .tempdir()
            .context("temp dir for etcd")?;
        let mut p = EtcdProc {
            child: None,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))?;
        let child = Command::new(etcd_bin())
            .arg("--name=n1")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=n1={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (apt-get install etcd-server)",
                    etcd_bin().display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) = http_get(([127, 0, 0, 1], self.client_port).into(), "/health")
            {
                if body.contains("true") {
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    anyhow::bail!("etcd exited with {status}: {}", self.log_tail());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd not healthy after 30 s: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:23791`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same ports and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Last lines of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        crate::witness_proc::tail(&self.dir.path().join("etcd.log"), 20)
    }
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        self.kill9();
    }
}
