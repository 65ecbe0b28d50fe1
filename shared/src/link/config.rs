//! The link config file (YAML) that the binaries' `--link-config` /
//! `--witness-link-config` flags name:
//!
//! ```yaml
//! private_key_file: private.key     # relative paths: next to this file
//! listen: 0.0.0.0:51820             # UDP address peers list for us
//! virtual_ip: 10.214.0.1            # our address inside the tunnel
//! heartbeat_interval_ms: 200        # optional (default 200)
//! peers:
//!   - name: witness-a               # used by --witness-link-peer and /status
//!     public_key: HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=
//!     endpoint: 192.0.2.10:51820    # optional: learnt from its packets otherwise
//!     virtual_ip: 10.214.0.2
//! ```
//!
//! Loading checks everything an endpoint would trip over later (key file,
//! duplicate peers, addresses that cannot work) so a bad file fails at start
//! with a message that names the file and the field.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::keys::{KeyError, PrivateKey};
use super::{LinkConfig, PeerConfig, DEFAULT_HEARTBEAT_INTERVAL};

/// Why a link config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LinkConfigError {
    #[error("link config {path}: cannot read: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("link config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("link config {path}: private_key_file: {error}")]
    Key { path: PathBuf, error: KeyError },
    #[error("link config {path}: duplicate peer: {what}")]
    DuplicatePeer { path: PathBuf, what: String },
    #[error("link config {path}: bad address: {what}")]
    BadAddress { path: PathBuf, what: String },
    #[error("link config {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

impl LinkConfigError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LinkConfigError::Read { .. } => "read",
            LinkConfigError::Parse { .. } => "parse",
            LinkConfigError::Key { .. } => "key",
            LinkConfigError::DuplicatePeer { .. } => "duplicate_peer",
            LinkConfigError::BadAddress { .. } => "bad_address",
            LinkConfigError::Invalid { .. } => "invalid",
        }
    }
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    private_key_file: PathBuf,
    listen: SocketAddr,
    virtual_ip: Ipv4Addr,
    #[serde(default)]
    heartbeat_interval_ms: Option<u64>,
    #[serde(default)]
    peers: Vec<PeerConfig>,
}

/// A loaded link config file: the endpoint's config, ready for
/// [`LinkEndpoint::bind`](super::LinkEndpoint::bind).
#[derive(Debug, Clone)]
pub struct LinkConfigFile {
    pub path: PathBuf,
    pub link: LinkConfig,
}

impl LinkConfigFile {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<LinkConfigFile, LinkConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| LinkConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let link = parse(&text, base, &|p| PrivateKey::from_file(p)).map_err(|e| e.at(path))?;
        Ok(LinkConfigFile {
            path: path.to_owned(),
            link,
        })
    }

    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.link.peers.iter().find(|p| p.name == name)
    }

    /// The peers called `names`, in that order; an unknown name is an error
    /// that lists the known ones.
    pub fn peers_named(&self, names: &[String]) -> Result<Vec<PeerConfig>, LinkConfigError> {
        names
            .iter()
            .map(|n| {
                self.peer(n)
                    .cloned()
                    .ok_or_else(|| LinkConfigError::Invalid {
                        path: self.path.clone(),
                        what: format!(
                            "no peer named {n:?} (peers: {})",
                            self.link
                                .peers
                                .iter()
                                .map(|p| p.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })
            })
            .collect()
    }
}

/// A validation error before the file's path is known.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    Parse(String),
    Key(String),
    Duplicate(String),
    Address(String),
    Invalid(String),
}

impl Problem {
    fn at(self, path: &Path) -> LinkConfigError {
        let path = path.to_owned();
        match self {
            Problem::Parse(message) => LinkConfigError::Parse { path, message },
            Problem::Key(what) => LinkConfigError::Key {
                path,
                error: KeyError::Format(what),
            },
            Problem::Duplicate(what) => LinkConfigError::DuplicatePeer { path, what },
            Problem::Address(what) => LinkConfigError::BadAddress { path, what },
            Problem::Invalid(what) => LinkConfigError::Invalid { path, what },
        }
    }
}

/// A virtual IP a peer can actually use inside the tunnel.
fn usable_virtual_ip(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

/// Pure parse + validation; `read_key` reads the private key file (resolved
/// against `base`).
fn parse(
    text: &str,
    base: &Path,
    read_key: &dyn Fn(&Path) -> Result<PrivateKey, KeyError>,
) -> Result<LinkConfig, Problem> {
    let file: FileConfig = serde_yaml::from_str(text).map_err(|e| Problem::Parse(e.to_string()))?;
    let key_path = base.join(&file.private_key_file);
    let private_key = read_key(&key_path).map_err(|e| match e {
        KeyError::Format(m) => Problem::Key(format!("{}: {m}", key_path.display())),
        io @ KeyError::Io { .. } => Problem::Key(io.to_string()),
    })?;
    if file.listen.port() == 0 {
        return Err(Problem::Address(format!(
            "listen {} needs a fixed port (peers dial it)",
            file.listen
        )));
    }
    if !usable_virtual_ip(file.virtual_ip) {
        return Err(Problem::Address(format!(
            "virtual_ip {} cannot be used inside the tunnel",
            file.virtual_ip
        )));
    }
    let own = private_key.public_key();
    let (mut names, mut keys, mut ips) = (HashSet::new(), HashSet::new(), HashSet::new());
    ips.insert(file.virtual_ip);
    for (i, p) in file.peers.iter().enumerate() {
        if p.name.is_empty() {
            return Err(Problem::Invalid(format!("peers[{i}] has no name")));
        }
        if p.public_key == own {
            return Err(Problem::Duplicate(format!(
                "peer {} has our own public key",
                p.name
            )));
        }
        if !names.insert(p.name.clone()) {
            return Err(Problem::Duplicate(format!("name {} appears twice", p.name)));
        }
        if !keys.insert(p.public_key) {
            return Err(Problem::Duplicate(format!(
                "peer {}: public key {} appears twice",
                p.name, p.public_key
            )));
        }
        if !usable_virtual_ip(p.virtual_ip) {
            return Err(Problem::Address(format!(
                "peer {}: virtual_ip {} cannot be used inside the tunnel",
                p.name, p.virtual_ip
            )));
        }
        if !ips.insert(p.virtual_ip) {
            return Err(Problem::Duplicate(format!(
                "peer {}: virtual_ip {} is already taken (by us or another peer)",
                p.name, p.virtual_ip
            )));
        }
        if let Some(e) = p.endpoint {
            if e.port() == 0 || e.ip().is_unspecified() {
                return Err(Problem::Address(format!(
                    "peer {}: endpoint {e} cannot be dialled",
                    p.name
                )));
            }
        }
    }
    let heartbeat_interval = match file.heartbeat_interval_ms {
        None => DEFAULT_HEARTBEAT_INTERVAL,
        Some(0) => {
            return Err(Problem::Invalid(
                "heartbeat_interval_ms must be positive".into(),
            ))
        }
        Some(ms) => Duration::from_millis(ms),
    };
    Ok(LinkConfig {
        private_key,
        listen: file.listen,
        virtual_ip: file.virtual_ip,
        peers: file.peers,
        heartbeat_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SK: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const OWN_PK: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn pk(n: u8) -> String {
        use base64::Engine;
        let sk: PrivateKey = base64::engine::general_purpose::STANDARD
            .encode([n; 32])
            .parse()
            .expect("32 bytes");
        sk.public_key().to_base64()
    }

    fn read_key(p: &Path) -> Result<PrivateKey, KeyError> {
        match p.file_name().and_then(|f| f.to_str()) {
            Some("private.key") => SK.parse(),
            Some("garbage.key") => "not a key".parse(),
            _ => Err(KeyError::Io {
                path: p.to_owned(),
                error: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
    }

    fn doc(head: &str, peers: &str) -> String {
        format!("{head}\npeers:\n{peers}")
    }

    const HEAD: &str =
        "private_key_file: private.key\nlisten: 127.0.0.1:51820\nvirtual_ip: 10.214.0.1";

    fn peer(name: &str, key: &str, vip: &str, endpoint: Option<&str>) -> String {
        let mut s = format!("  - name: {name}\n    public_key: \"{key}\"\n    virtual_ip: {vip}\n");
        if let Some(e) = endpoint {
            s.push_str(&format!("    endpoint: \"{e}\"\n"));
        }
        s
    }

    #[test]
    fn valid_file_loads_with_defaults() {
        let text = doc(
            HEAD,
            &(peer("witness-a", &pk(1), "10.214.0.2", Some("127.0.0.1:51821"))
                + &peer("eu-2", &pk(2), "10.214.0.3", None)),
        );
        let c = parse(&text, Path::new("/etc/continuum"), &read_key).expect("valid");
        assert_eq!(c.private_key.public_key().to_base64(), OWN_PK);
        assert_eq!(c.listen, "127.0.0.1:51820".parse().expect("addr"));
        assert_eq!(c.virtual_ip, Ipv4Addr::new(10, 214, 0, 1));
        assert_eq!(c.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].name, "witness-a");
        assert_eq!(
            c.peers[0].endpoint,
            Some("127.0.0.1:51821".parse().expect("addr"))
        );
        assert!(c.peers[0].heartbeat, "heartbeats on by default");
        assert_eq!(c.peers[1].endpoint, None);
    }

    /// (what, file text, expected kind, text the message must contain)
    type Case = (&'static str, String, fn(&Problem) -> bool, &'static str);

    #[test]
    fn refuses_bad_files_with_the_reason() {
        let p1 = peer("w", &pk(1), "10.214.0.2", None);
        let cases: Vec<Case> = vec![
            ("not yaml", "listen: [".into(), |p| matches!(p, Problem::Parse(_)), ""),
            (
                "unknown field",
                format!("{HEAD}\nlisten_port: 3\npeers: []"),
                |p| matches!(p, Problem::Parse(_)),
                "listen_port",
            ),
            (
                "missing listen",
                "private_key_file: private.key\nvirtual_ip: 10.214.0.1".into(),
                |p| matches!(p, Problem::Parse(_)),
                "listen",
            ),
            (
                "bad listen address",
                "private_key_file: private.key\nlisten: nowhere:x\nvirtual_ip: 10.214.0.1".into(),
                |p| matches!(p, Problem::Parse(_)),
                "",
            ),
            (
                "listen without port",
                "private_key_file: private.key\nlisten: 127.0.0.1:0\nvirtual_ip: 10.214.0.1"
                    .into(),
                |p| matches!(p, Problem::Address(_)),
                "fixed port",
            ),
            (
                "missing key file",
                doc(
                    "private_key_file: nope.key\nlisten: 127.0.0.1:1\nvirtual_ip: 10.214.0.1",
                    &p1,
                ),
                |p| matches!(p, Problem::Key(_)),
                "nope.key",
            ),
            (
                "malformed key file",
                doc(
                    "private_key_file: garbage.key\nlisten: 127.0.0.1:1\nvirtual_ip: 10.214.0.1",
                    &p1,
                ),
                |p| matches!(p, Problem::Key(_)),
                "garbage.key",
            ),
            (
                "bad peer public key",
                doc(HEAD, &peer("w", "AAAA", "10.214.0.2", None)),
                |p| matches!(p, Problem::Parse(_)),
                "",
            ),
            (
                "bad peer endpoint",
                doc(HEAD, &peer("w", &pk(1), "10.214.0.2", Some("host:port"))),
                |p| matches!(p, Problem::Parse(_)),
                "",
            ),
            (
                "peer endpoint without port",
                doc(HEAD, &peer("w", &pk(1), "10.214.0.2", Some("127.0.0.1:0"))),
                |p| matches!(p, Problem::Address(_)),
                "cannot be dialled",
            ),
            (
                "duplicate name",
                doc(HEAD, &(p1.clone() + &peer("w", &pk(2), "10.214.0.3", None))),
                |p| matches!(p, Problem::Duplicate(_)),
                "name w",
            ),
            (
                "duplicate key",
                doc(HEAD, &(p1.clone() + &peer("x", &pk(1), "10.214.0.3", None))),
                |p| matches!(p, Problem::Duplicate(_)),
                "public key",
            ),
            (
                "duplicate virtual ip",
                doc(HEAD, &(p1.clone() + &peer("x", &pk(2), "10.214.0.2", None))),
                |p| matches!(p, Problem::Duplicate(_)),
                "10.214.0.2",
            ),
            (
                "peer uses our virtual ip",
                doc(HEAD, &peer("w", &pk(1), "10.214.0.1", None)),
                |p| matches!(p, Problem::Duplicate(_)),
                "already taken",
            ),
            (
                "peer with our own key",
                doc(HEAD, &peer("w", OWN_PK, "10.214.0.2", None)),
                |p| matches!(p, Problem::Duplicate(_)),
                "own public key",
            ),
            (
                "unusable peer virtual ip",
                doc(HEAD, &peer("w", &pk(1), "0.0.0.0", None)),
                |p| matches!(p, Problem::Address(_)),
                "0.0.0.0",
            ),
            (
                "peer without a name",
                doc(HEAD, "  - public_key: \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n    virtual_ip: 10.214.0.2\n"),
                |p| matches!(p, Problem::Invalid(_)),
                "no name",
            ),
            (
                "zero heartbeat interval",
                format!("{HEAD}\nheartbeat_interval_ms: 0\npeers: []"),
                |p| matches!(p, Problem::Invalid(_)),
                "heartbeat",
            ),
        ];
        for (what, text, kind, needle) in cases {
            let err = parse(&text, Path::new("/cfg"), &read_key).expect_err(what);
            assert!(kind(&err), "{what}: wrong kind {err:?}");
            let msg = err.at(Path::new("/cfg/link.yaml")).to_string();
            assert!(msg.contains("/cfg/link.yaml"), "{what}: {msg}");
            assert!(msg.contains(needle), "{what}: {msg} lacks {needle:?}");
        }
    }

    #[test]
    fn load_reads_the_key_next_to_the_file_and_resolves_peer_names() {
        let dir = std::env::temp_dir().join(format!("continuum-linkcfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("link.yaml");
        assert_eq!(
            LinkConfigFile::load(&path).expect_err("missing").label(),
            "read"
        );
        let (own, _, _) = super::super::keys::keygen(Some(&dir), None, None).expect("keygen");
        std::fs::write(
            &path,
            doc(
                "private_key_file: private.key\nlisten: 127.0.0.1:51820\nvirtual_ip: 10.214.0.1",
                &peer("witness-a", &pk(1), "10.214.0.2", Some("127.0.0.1:51821")),
            ),
        )
        .expect("write");
        let f = LinkConfigFile::load(&path).expect("loads");
        assert_eq!(f.link.private_key.public_key(), own);
        let names = vec!["witness-a".to_string()];
        assert_eq!(f.peers_named(&names).expect("known")[0].name, "witness-a");
        let err = f.peers_named(&["witness-z".into()]).expect_err("unknown");
        assert!(err.to_string().contains("witness-a"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
