//! Throwaway certificates made on the spot (rcgen, with ring as the rest of the workspace):
//! a CA that signs server and station certificates, and rustls client configurations that
//! trust it. The CA's key never leaves memory, so it signs nothing after the process ends.
//!
//! Keys are ECDSA P-256, rcgen's default. The `try_` and `_for` forms return rcgen's error
//! (the load generator's `pki` takes server names from its command line); the others panic,
//! as a test wants.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Why a certificate could not be made (rcgen's error).
pub use rcgen::Error;

/// A certificate authority that signs server and station certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl Ca {
    /// A CA whose subject is `CN=<name>`.
    pub fn new(name: &str) -> Ca {
        Ca::try_new(name).expect("make a CA")
    }

    /// [`Ca::new`], returning rcgen's error.
    pub fn try_new(name: &str) -> Result<Ca, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = common_name(name);
        let pem = params.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.server_for(&["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("sign a server certificate")
    }

    /// A server certificate for `names` (host names or IP addresses), its subject
    /// `CN=<the first name>` (`localhost` when there is none).
    pub fn server_for(&self, names: &[String]) -> Result<Leaf, Error> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = common_name(names.first().map_or("localhost", String::as_str));
        self.sign(params)
    }

    /// A station (client) certificate whose subject is `CN=<common_name>`.
    pub fn station(&self, common_name: &str) -> Leaf {
        self.try_station(common_name)
            .expect("sign a station certificate")
    }

    /// [`Ca::station`], returning rcgen's error.
    pub fn try_station(&self, name: &str) -> Result<Leaf, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Leaf, Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client configuration that trusts this CA, presenting `identity` when given.
    pub fn client_config(&self, identity: Option<&Leaf>) -> Arc<ClientConfig> {
        self.client_config_for(identity, rustls::DEFAULT_VERSIONS)
    }

    /// [`Ca::client_config`] speaking only the TLS `versions` given.
    pub fn client_config_for(
        &self,
        identity: Option<&Leaf>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match identity {
            None => builder.with_no_client_auth(),
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
        })
    }
}

impl Leaf {
    /// Writes the certificate and key to `dir` as `<name>.crt` and `<name>.key`, each by a
    /// rename (what a certificate manager does), and returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        replace(&cert, &self.cert_pem);
        replace(&key, &self.key_pem);
        (cert, key)
    }

    /// The certificate, DER.
    pub fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A fresh directory for certificate files.
pub fn pki_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stormgate-tls-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
