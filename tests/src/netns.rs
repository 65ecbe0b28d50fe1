//! Network namespaces for partition tests (root only): create namespaces
//! with unique names, wire them with veth pairs, run processes inside them,
//! and cut or heal links with nftables rules that silently drop what arrives
//! (a real partition: the sender sees no error, its packets just vanish).
//!
//! Every namespace is a Drop guard: it kills every process still inside it
//! and deletes itself, so a failing test leaves nothing behind.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// Why partition tests cannot run here, if they cannot (not root, no `ip`
/// or `nft`, namespaces not permitted).
pub fn unavailable_reason() -> Option<String> {
    let euid = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    if euid.ok() != Some(0) {
        return Some("not running as root (network namespaces need root)".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    let probe = match NetNs::new("probe") {
        Ok(ns) => ns,
        Err(e) => return Some(format!("cannot create a network namespace: {e:#}")),
    };
    if let Err(e) = probe.nft("add table inet continuum_probe") {
        return Some(format!("nftables unusable in a namespace: {e:#}"));
    }
    None
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace this process created (deleted on drop).
pub struct NetNs {
    name: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl NetNs {
    /// A fresh namespace named `ct-<pid>-<n>-<role>` (unique per process and
    /// call), loopback up.
    pub fn new(role: &str) -> Result<NetNs> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("ct{}-{n}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// One nft command (`nft <line>`) inside the namespace.
    pub fn nft(&self, line: &str) -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(line.split_whitespace()))
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Pids of every process inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        run(Command::new("ip").args(["netns", "pids", &self.name]))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILL every process inside the namespace (the whole region dies).
    pub fn kill_all(&self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            let _ = Command::new("/bin/sh")
                .args(["-c", "kill -s KILL \"$@\" 2>/dev/null; true", "kill"])
                .args(pids.iter().map(u32::to_string))
                .status();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A veth pair from this namespace (`here`, address `here_addr` with
    /// prefix) to `peer` (`there`, `there_addr`), both ends up.
    pub fn link(
        &self,
        here: &str,
        here_addr: &str,
        peer: &NetNs,
        there: &str,
        there_addr: &str,
    ) -> Result<()> {
        run(Command::new("ip").args([
            "link", "add", here, "netns", &self.name, "type", "veth", "peer", "name", there,
            "netns", &peer.name,
        ]))?;
        self.ip(&["addr", "add", here_addr, "dev", here])?;
        peer.ip(&["addr", "add", there_addr, "dev", there])?;
        self.ip(&["link", "set", here, "up"])?;
        peer.ip(&["link", "set", there, "up"])?;
        Ok(())
    }

    /// Drops everything that arrives on `iface` (table `cut_<iface>`);
    /// idempotent.
    pub fn drop_input_from(&self, iface: &str) -> Result<()> {
        let t = table_name(iface);
        self.nft(&format!("add table inet {t}"))?;
        self.nft(&format!(
            "add chain inet {t} input {{ type filter hook input priority -200 ; policy accept ; }}"
        ))?;
        self.nft(&format!("flush chain inet {t} input"))?;
        self.nft(&format!("add rule inet {t} input iifname {iface} drop"))?;
        Ok(())
    }

    /// Drops TCP segments arriving for local port `port` (table
    /// `cut_port_<port>`); idempotent.
    pub fn drop_tcp_port(&self, port: u16) -> Result<()> {
        let t = format!("cut_port_{port}");
        self.nft(&format!("add table inet {t}"))?;
        self.nft(&format!(
            "add chain inet {t} input {{ type filter hook input priority -200 ; policy accept ; }}"
        ))?;
        self.nft(&format!("flush chain inet {t} input"))?;
        self.nft(&format!("add rule inet {t} input tcp dport {port} drop"))?;
        Ok(())
    }

    /// Removes a cut made by [`NetNs::drop_input_from`]; idempotent.
    pub fn heal_input_from(&self, iface: &str) -> Result<()> {
        let t = table_name(iface);
        self.nft(&format!("add table inet {t}"))?;
        self.nft(&format!("delete table inet {t}"))?;
        Ok(())
    }
}

fn table_name(iface: &str) -> String {
    format!("cut_{}", iface.replace('-', "_"))
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.kill_all();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A bidirectional silent cut of the veth link between two namespaces
/// (`a_if` in `a`, `b_if` in `b`).
pub fn cut(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.drop_input_from(a_if)?;
    b.drop_input_from(b_if)
}

/// Undoes [`cut`].
pub fn heal(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.heal_input_from(a_if)?;
    b.heal_input_from(b_if)
}
