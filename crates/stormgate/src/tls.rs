//! TLS on the station listener (`TLS_CERT`, `TLS_KEY`, `TLS_CLIENT_CA`): loading the PEM
//! files into a rustls configuration, reloading it without a restart, and what a station's
//! client certificate proves (`STATION_AUTH`).
//!
//! # Configuration
//!
//! rustls with the *ring* crypto provider: no OpenSSL on the station path, and no C
//! toolchain beyond what ring builds. TLS 1.3 and 1.2 (`TLS_MIN_VERSION=1.3` drops 1.2), with
//! rustls's default cipher suites: all AEAD with forward secrecy, none of the legacy ones.
//! With `TLS_CLIENT_CA` every station must present a certificate that chains to one of those
//! CAs (mutual TLS): a client without one, or with another CA's, fails its handshake.
//!
//! # Reloading
//!
//! [`LiveTls`] is what the shards ask ([`StationTls`]) at each accepted connection; [`serve`]
//! loads the files and starts a [`Watcher`] that reloads them within
//! [`RELOAD_INTERVAL`](crate::reload::RELOAD_INTERVAL) of a change, or at once on SIGHUP, and
//! publishes the new configuration with one atomic pointer swap. Open connections keep the
//! session they negotiated; new ones get the new certificate. Files that fail to load (a key
//! that does not match its certificate, a half-copied PEM) are logged, and the previous
//! configuration stays.
//!
//! # Certificates as station credentials
//!
//! Under mutual TLS the client CA vouches for the certificate's subject, so the subject can
//! stand in for a token: a certificate whose subject's common name is exactly a zipcode
//! (`CN=12345`) proves that zipcode ([`certificate_names`]). With `STATION_AUTH=token` it is
//! accepted in place of the token; with `STATION_AUTH=certificate` it is the only proof.
//! Issuing a station its certificate is then what registering it is, and revoking means
//! replacing the client CA bundle (this server reads no revocation lists).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use stormgate_shard::{Credentials, StationAuth, StationTls};
use tracing::info;

use crate::reload::{FileVersion, RELOAD_INTERVAL, Watcher};

/// The oldest TLS version stations may use (`TLS_MIN_VERSION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3: the default, for station firmware whose TLS stack predates 1.3.
    #[value(name = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    V1_3,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        })
    }
}

/// The files and choices a TLS configuration is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM: the server's certificate, then its chain.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs station certificates must chain to; `None` = no client certificates.
    pub client_ca: Option<PathBuf>,
    /// The oldest protocol version accepted.
    pub min_version: TlsVersion,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{}: {problem}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the certificates or the key (e.g. a key that is not the certificate's).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA bundle cannot verify client certificates.
    #[error("TLS_CLIENT_CA: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

impl TlsFiles {
    /// The files a change to which means a reload.
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }

    /// Reads the files and builds the configuration every handshake uses.
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(&self.cert)?;
        let key = read(&self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            problem: format!("no private key: {e}"),
        })?;
        let versions: &[&SupportedProtocolVersion] = match self.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
        };
        // Fails unless the key is the end-entity certificate's.
        Ok(builder.with_single_cert(chain, key)?)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let pem_error = |problem: String| TlsError::Pem {
        path: path.to_owned(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no certificate in it".to_owned()));
    }
    Ok(certs)
}

fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?)
}

/// The configuration every shard hands its next handshake, replaced whole on reload.
#[derive(Debug)]
pub struct LiveTls {
    current: ArcSwap<ServerConfig>,
}

impl StationTls for LiveTls {
    fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }
}

/// Loads the TLS files for the server and starts watching them for changes.
pub fn serve(files: &TlsFiles) -> Result<(Arc<LiveTls>, Watcher), TlsError> {
    let paths = files.paths();
    // Looked at before reading, so that a change while reading is seen as a change.
    let versions = FileVersion::of_all(&paths);
    let live = Arc::new(LiveTls {
        current: ArcSwap::from_pointee(files.load()?),
    });
    let published = Arc::clone(&live);
    let reload = files.clone();
    let watcher = Watcher::start(
        "tls-reload",
        "TLS certificate",
        paths,
        versions,
        RELOAD_INTERVAL,
        move || reload.load(),
        move |config: ServerConfig| {
            info!("TLS certificate reloaded; new connections use it");
            published.current.store(Arc::new(config));
        },
    )
    .map_err(|source| TlsError::Read {
        path: files.cert.clone(),
        source,
    })?;
    Ok((live, watcher))
}

/// Whether `certificate` (a station's verified client certificate, DER) names `zipcode`: its
/// subject has exactly one common name, and it is the zipcode, byte for byte. A subject
/// with several common names names none of them (which one would the CA have meant?).
pub fn certificate_names(certificate: Option<&[u8]>, zipcode: &str) -> bool {
    let Some(der) = certificate else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let mut names = cert.subject().iter_common_name();
    match (names.next(), names.next()) {
        (Some(name), None) => name.as_str().is_ok_and(|name| name == zipcode),
        _ => false,
    }
}

/// `STATION_AUTH=certificate`: only a client certificate naming the zipcode proves it.
#[derive(Debug)]
pub struct CertificateAuth;

impl StationAuth for CertificateAuth {
    fn verify(&self, credentials: &Credentials<'_>) -> bool {
        certificate_names(credentials.certificate, credentials.zipcode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate_with_subject(common_name: Option<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(name) = common_name {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_names_the_zipcode_of_its_only_common_name() {
        let cert = certificate_with_subject(Some("12345"));
        assert!(certificate_names(Some(&cert), "12345"));
        assert!(!certificate_names(Some(&cert), "1234"));
        assert!(!certificate_names(Some(&cert), "123456"));
        assert!(!certificate_names(None, "12345"));
        assert!(!certificate_names(Some(b"not DER"), "12345"));
        let none = certificate_with_subject(None);
        assert!(!certificate_names(Some(&none), ""));
    }
}
