//! WireGuard peers for control-link tests: a raw boringtun peer driven by
//! hand on a UDP socket (to send exactly the packets a test wants: replays,
//! garbage, ICMP), and Debian's wireguard-go in a network namespace made by
//! the test (root only), cleaned up by Drop guards.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use boringtun::noise::{Tunn, TunnResult};
use continuum_shared::link::{PrivateKey, PublicKey};
use tokio::net::UdpSocket;

/// A boringtun peer with no endpoint logic: every packet is explicit.
pub struct RawPeer {
    pub socket: UdpSocket,
    pub tunn: Tunn,
    pub key: PrivateKey,
    /// The Continuum endpoint it talks to.
    pub remote: SocketAddr,
    pub virtual_ip: Ipv4Addr,
    buf: Vec<u8>,
}

/// What one received datagram turned into.
#[derive(Debug)]
pub enum RawEvent {
    /// A decrypted inner IPv4 packet.
    Inner(Vec<u8>),
    /// Handshake/keepalive traffic handled (answers already sent).
    Control,
}

impl RawPeer {
    pub async fn new(
        key: PrivateKey,
        remote_key: PublicKey,
        remote: SocketAddr,
        virtual_ip: Ipv4Addr,
    ) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let secret = key.to_x25519();
        let tunn = Tunn::new(
            secret,
            remote_key.to_x25519(),
            None,
            None,
            rand::random::<u32>() >> 8,
            None,
        );
        Ok(RawPeer {
            socket,
            tunn,
            key,
            remote,
            virtual_ip,
            buf: vec![0u8; 65_600],
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Formats a handshake initiation (not sent).
    pub fn handshake_init(&mut self) -> Option<Vec<u8>> {
        match self.tunn.format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
            _ => None,
        }
    }

    /// Encrypts an inner packet (not sent); `None` without a session.
    pub fn encrypt(&mut self, inner: &[u8]) -> Option<Vec<u8>> {
        match self.tunn.encapsulate(inner, &mut self.buf) {
            TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
            _ => None,
        }
    }

    pub async fn send_raw(&self, datagram: &[u8]) -> anyhow::Result<()> {
        self.socket.send_to(datagram, self.remote).await?;
        Ok(())
    }

    /// Waits up to `wait` for one datagram and processes it.
    pub async fn recv(&mut self, wait: Duration) -> anyhow::Result<Option<RawEvent>> {
        let mut rx = vec![0u8; 65_600];
        let (n, from) = match tokio::time::timeout(wait, self.socket.recv_from(&mut rx)).await {
            Err(_) => return Ok(None),
            Ok(r) => r?,
        };
        let mut out = Vec::new();
        let event = match self
            .tunn
            .decapsulate(Some(from.ip()), &rx[..n], &mut self.buf)
        {
            TunnResult::WriteToNetwork(b) => {
                out.push(b.to_vec());
                while let TunnResult::WriteToNetwork(b) =
                    self.tunn.decapsulate(None, &[], &mut self.buf)
                {
                    out.push(b.to_vec());
                }
                RawEvent::Control
            }
            TunnResult::WriteToTunnelV4(b, _) => RawEvent::Inner(b.to_vec()),
            TunnResult::Done => RawEvent::Control,
            other => bail!("raw peer could not process a datagram: {other:?}"),
        };
        for d in out {
            self.socket.send_to(&d, from).await?;
        }
        Ok(Some(event))
    }

    /// Completes a handshake with the endpoint.
    pub async fn handshake(&mut self) -> anyhow::Result<()> {
        let init = self.handshake_init().context("format init")?;
        self.send_raw(&init).await?;
        for _ in 0..20 {
            if self.tunn.time_since_last_handshake().is_some() {
                return Ok(());
            }
            self.recv(Duration::from_millis(250)).await?;
        }
        if self.tunn.time_since_last_handshake().is_some() {
            Ok(())
        } else {
            bail!("no handshake response from {}", self.remote)
        }
    }

    /// Waits for the next inner packet, answering control traffic meanwhile.
    pub async fn recv_inner(&mut self, wait: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(left).await? {
                None => return Ok(None),
                Some(RawEvent::Inner(p)) => return Ok(Some(p)),
                Some(RawEvent::Control) => {}
            }
        }
    }
}

/// Internet checksum for hand-built test packets.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let word = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request from `src` to `dst`.
pub fn icmp_echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8u8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(data);
    let sum = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

// ---------------------------------------------------------------------------
// wireguard-go in a network namespace (root only).

/// True when the test may create namespaces (root).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns exec <ns> <args...>`
pub fn ns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// A network namespace created by the test; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(prefix: &str) -> anyhow::Result<Netns> {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        run(&mut ns_cmd(&ns.name, &["ip", "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&mut ns_cmd(&self.name, args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends and wg devices in it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects two namespaces with a veth pair and addresses `a_ip`/`b_ip` (/24).
pub fn veth_between(a: &Netns, a_ip: Ipv4Addr, b: &Netns, b_ip: Ipv4Addr) -> anyhow::Result<()> {
    let tag = rand::random::<u32>() & 0xff_ffff;
    let (va, vb) = (format!("cva{tag:06x}"), format!("cvb{tag:06x}"));
    run(Command::new("ip").args([
        "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]))?;
    a.exec(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &va])?;
    a.exec(&["ip", "link", "set", &va, "up"])?;
    b.exec(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &vb])?;
    b.exec(&["ip", "link", "set", &vb, "up"])?;
    Ok(())
}

/// Makes sure /dev/net/tun exists (containers often lack it).
pub fn ensure_tun_device() -> anyhow::Result<()> {
    if std::path::Path::new("/dev/net/tun").exists() {
        return Ok(());
    }
    std::fs::create_dir_all("/dev/net")?;
    run(Command::new("mknod").args(["/dev/net/tun", "c", "10", "200"]))?;
    Ok(())
}

/// A wireguard-go interface in a namespace; the process is killed on drop.
pub struct WireguardGo {
    pub ns: String,
    pub iface: String,
    child: Child,
}

impl WireguardGo {
    /// Starts `wireguard-go -f <iface>` inside `ns` and waits for the device.
    /// A loaded machine can take seconds; a process that exits before the
    /// device appears is started once more, and its exit status reported.
    pub fn start(ns: &Netns, iface: &str) -> anyhow::Result<WireguardGo> {
        ensure_tun_device()?;
        let spawn = || {
            ns_cmd(&ns.name, &["wireguard-go", "-f", iface])
                .env("WG_PROCESS_FOREGROUND", "1")
                .env("LOG_LEVEL", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("spawn wireguard-go")
        };
        let mut wg = WireguardGo {
            ns: ns.name.clone(),
            iface: iface.to_owned(),
            child: spawn()?,
        };
        let mut exits = Vec::new();
        for _ in 0..150 {
            if run(&mut ns_cmd(&wg.ns, &["wg", "show", iface])).is_ok() {
                return Ok(wg);
            }
            if let Ok(Some(status)) = wg.child.try_wait() {
                exits.push(status);
                if exits.len() > 1 {
                    break;
                }
                wg.child = spawn()?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "wireguard-go did not create {iface} in {} (exits: {exits:?})",
            wg.ns
        )
    }

    /// `wg show <iface> latest-handshakes` for one peer: seconds since epoch, 0 = never.
    pub fn latest_handshake(&self, peer: &PublicKey) -> anyhow::Result<u64> {
        let out = run(&mut ns_cmd(
            &self.ns,
            &["wg", "show", &self.iface, "latest-handshakes"],
        ))?;
        let key = peer.to_base64();
        for line in out.lines() {
            let mut parts = line.split_whitespace();
            if parts.next() == Some(key.as_str()) {
                return Ok(parts.next().and_then(|t| t.parse().ok()).unwrap_or(0));
            }
        }
        Ok(0)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
