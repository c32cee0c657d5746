//! The client side of TLS to the station listener (`send --tls-ca`): one rustls
//! configuration per process, built from PEM files, shared by every connection of every
//! sending thread.
//!
//! rustls with the *ring* provider, as the server uses; TLS 1.3 and 1.2 with rustls's default
//! cipher suites, so a connection negotiates what a current station would. Session resumption
//! is off: every connection makes a full handshake, as a station does on its first
//! connection and after a server restart (the server's session cache is in memory), and as a
//! benchmark of handshakes must.

use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::LoadgenError;
use crate::cli::SendArgs;

/// What each TLS connection is made from.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// The TLS client `args` asks for (`--tls-ca` and the flags that go with it); `None` for
    /// plain TCP.
    pub fn from_args(args: &SendArgs) -> Result<Option<TlsClient>, LoadgenError> {
        let Some(ca) = &args.tls_ca else {
            return Ok(None);
        };
        let identity = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            _ => None,
        };
        TlsClient::new(ca, &args.tls_server_name, identity).map(Some)
    }

    /// A client that trusts the CAs in the PEM file `ca`, expects the server's certificate to
    /// name `server_name`, and presents `identity` (a PEM certificate chain and its key) when
    /// given.
    pub fn new(
        ca: &Path,
        server_name: &str,
        identity: Option<(&Path, &Path)>,
    ) -> Result<TlsClient, LoadgenError> {
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            LoadgenError::Usage(format!(
                "--tls-server-name {server_name:?} is not a DNS name or IP address: {e}"
            ))
        })?;
        let mut roots = RootCertStore::empty();
        for cert in certificates(ca)? {
            roots
                .add(cert)
                .map_err(|e| pem_error(ca, &format!("not a usable CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| LoadgenError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| pem_error(key, &format!("no private key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| LoadgenError::Tls(format!("--tls-cert/--tls-key: {e}")))?
            }
        };
        config.resumption = Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }

    /// A new client connection: its ClientHello is ready to be written.
    pub fn connection(&self) -> Result<ClientConnection, rustls::Error> {
        ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())
    }
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, LoadgenError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate in it"));
    }
    Ok(certs)
}

fn pem_error(path: &Path, problem: &str) -> LoadgenError {
    LoadgenError::Tls(format!("{}: {problem}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_pem_are_refused_with_their_name() {
        let dir = std::env::temp_dir().join(format!("loadgen-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = TlsClient::new(&empty, "localhost", None).unwrap_err();
        assert!(
            err.to_string().contains("empty.pem: no certificate"),
            "{err}"
        );
        let missing = dir.join("missing.pem");
        let err = TlsClient::new(&missing, "localhost", None).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = TlsClient::new(&empty, "not a name!", None).unwrap_err();
        assert!(matches!(err, LoadgenError::Usage(_)), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
