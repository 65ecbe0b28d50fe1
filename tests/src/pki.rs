//! Test PKI: a CA, a server certificate for `127.0.0.1`/`localhost`, client
//! certificates signed by the CA, and a rogue CA with its own client
//! certificate (which a witness must refuse at the TLS handshake).
//!
//! Everything is written as PEM files into a temporary directory that lives
//! as long as the [`Pki`].
//!
//! ```no_run
//! let pki = continuum_tests::pki::Pki::generate()?;
//! // pki.server_cert / pki.server_key / pki.ca_cert for the witness,
//! // pki.client (cert + key paths) and pki.ca_cert for a client.
//! # anyhow::Ok(())
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, as PEM files and PEM text.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Pki {
    dir: tempfile::TempDir,
    /// CA that signs the server and client certificates (give it to the
    /// witness as `--client-ca` and to clients as their trust root).
    pub ca_cert: PathBuf,
    pub ca_pem: String,
    /// Server certificate for `127.0.0.1`, `::1` and `localhost`.
    pub server: Identity,
    /// A client certificate signed by the CA (CN `client`).
    pub client: Identity,
    /// The rogue CA's certificate (trusted by nobody).
    pub rogue_ca_cert: PathBuf,
    /// A client certificate signed by the rogue CA.
    pub rogue_client: Identity,
    ca: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn leaf(
    dir: &Path,
    file: &str,
    cn: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<Identity> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    let id = Identity {
        cert: dir.join(format!("{file}.crt")),
        key: dir.join(format!("{file}.key")),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    std::fs::write(&id.cert, &id.cert_pem)?;
    std::fs::write(&id.key, &id.key_pem)?;
    Ok(id)
}

impl Pki {
    /// Generates a fresh CA, server and client certificates, and a rogue CA.
    pub fn generate() -> anyhow::Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("continuum-pki-")
            .tempdir()
            .context("temp dir for PKI")?;
        let ca_key = KeyPair::generate()?;
        let ca_p = ca_params("continuum test CA")?;
        let ca_pem = ca_p.self_signed(&ca_key)?.pem();
        let ca = Issuer::new(ca_p, ca_key);
        let ca_cert = dir.path().join("ca.crt");
        std::fs::write(&ca_cert, &ca_pem)?;

        let rogue_key = KeyPair::generate()?;
        let rogue_params = ca_params("rogue CA")?;
        let rogue_pem = rogue_params.self_signed(&rogue_key)?.pem();
        let rogue = Issuer::new(rogue_params, rogue_key);
        let rogue_ca_cert = dir.path().join("rogue-ca.crt");
        std::fs::write(&rogue_ca_cert, &rogue_pem)?;

        let server = leaf(
            dir.path(),
            "server",
            "witness",
            vec!["127.0.0.1".into(), "::1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        )?;
        let client = leaf(
            dir.path(),
            "client",
            "client",
            vec!["client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        )?;
        let rogue_client = leaf(
            dir.path(),
            "rogue-client",
            "client",
            vec!["client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue,
        )?;
        Ok(Pki {
            dir,
            ca_cert,
            ca_pem,
            server,
            client,
            rogue_ca_cert,
            rogue_client,
            ca,
        })
    }

    /// Issues another client certificate signed by the CA (e.g. one per region).
    pub fn issue_client(&self, name: &str) -> anyhow::Result<Identity> {
        leaf(
            self.dir.path(),
            &format!("client-{name}"),
            name,
            vec![name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &self.ca,
        )
    }

    /// Directory holding every PEM file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
