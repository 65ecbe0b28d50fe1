//! Static x25519 keys, written and read as base64 the way `wg` does, so that
//! keys from `wg genkey`/`wg pubkey` and ours are interchangeable.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519;

/// Why a key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key is not 32 bytes of base64: {0}")]
    Format(String),
    // `error`, not `source`: the message already includes it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl KeyError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            KeyError::Format(_) => "format",
            KeyError::Io { .. } => "io",
        }
    }
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|e| KeyError::Format(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| KeyError::Format(format!("{} bytes", bytes.len())))
}

/// A peer's public key: how config files and metrics name a peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    /// First characters of the base64 form: a label for logs and metrics.
    pub fn short(&self) -> String {
        self.to_base64().chars().take(8).collect()
    }
    /// The key as boringtun takes it.
    pub fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A static private key. Debug output never shows it.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> PrivateKey {
        PrivateKey(rand::random::<[u8; 32]>())
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.to_x25519()).to_bytes())
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    /// The key as boringtun takes it.
    pub fn to_x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
    /// Reads a base64 private key file (as written by `keygen` or `wg genkey`).
    pub fn from_file(path: &Path) -> Result<PrivateKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|error| KeyError::Io {
            path: path.to_owned(),
            error,
        })?;
        text.parse()
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PrivateKey)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), KeyError> {
    let io = |error| KeyError::Io {
        path: path.to_owned(),
        error,
    };
    // create_new: never overwrite an existing key by accident.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)?;
    f.sync_all().map_err(io)
}

/// Writes a new key pair: the private key with mode 0600, the public key
/// with 0644. Refuses to overwrite existing files. Returns the public key.
pub fn write_key_pair(private_path: &Path, public_path: &Path) -> Result<PublicKey, KeyError> {
    let key = PrivateKey::generate();
    let public = key.public_key();
    write_new(private_path, &key.to_base64(), 0o600)?;
    write_new(public_path, &public.to_base64(), 0o644)?;
    Ok(public)
}

/// File names `keygen --out-dir` uses.
pub const PRIVATE_KEY_FILE: &str = "private.key";
pub const PUBLIC_KEY_FILE: &str = "public.key";

/// What the binaries' `keygen` subcommand does: writes a new pair to
/// `out_dir/{private,public}.key` or to the explicit paths (explicit paths
/// win), creating `out_dir` if needed. Returns the public key and the paths.
pub fn keygen(
    out_dir: Option<&Path>,
    private_path: Option<&Path>,
    public_path: Option<&Path>,
) -> Result<(PublicKey, PathBuf, PathBuf), KeyError> {
    let dir = out_dir.unwrap_or(Path::new("."));
    let sk = private_path.map_or_else(|| dir.join(PRIVATE_KEY_FILE), Path::to_path_buf);
    let pk = public_path.map_or_else(|| dir.join(PUBLIC_KEY_FILE), Path::to_path_buf);
    for parent in [sk.parent(), pk.parent()].into_iter().flatten() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|error| KeyError::Io {
                path: parent.to_owned(),
                error,
            })?;
        }
    }
    let public = write_key_pair(&sk, &pk)?;
    Ok((public, sk, pk))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_pair_files_round_trip_with_private_mode_0600() {
        let dir = std::env::temp_dir().join(format!("continuum-keys-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let (sk, pk) = (dir.join(PRIVATE_KEY_FILE), dir.join(PUBLIC_KEY_FILE));
        let public = write_key_pair(&sk, &pk).expect("written");
        let mode = std::fs::metadata(&sk).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let read = PrivateKey::from_file(&sk).expect("readable");
        assert_eq!(read.public_key(), public);
        let pub_text = std::fs::read_to_string(&pk).expect("public");
        assert_eq!(
            pub_text.trim().parse::<PublicKey>().expect("parses"),
            public
        );
        assert!(write_key_pair(&sk, &pk).is_err(), "must not overwrite");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn matches_wireguard_tools_key_derivation() {
        // `echo <priv> | wg pubkey` reference pair.
        let private: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .expect("valid");
        assert_eq!(
            private.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn refuses_malformed_keys() {
        for bad in ["", "abc", "AAAA", "!!!!"] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad}");
        }
    }
}
