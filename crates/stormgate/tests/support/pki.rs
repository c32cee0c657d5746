//! Certificates for the TLS tests, made on the spot (rcgen), and a blocking TLS station.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use stormgate_station::{Reply, read_reply};

/// A certificate authority that signs server and station certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        self.sign(params)
    }

    /// A station certificate whose subject is `CN=<common_name>`.
    pub fn station(&self, common_name: &str) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
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

/// A station over TLS, blocking, in the spirit of `stormgate_station::Station`.
pub struct TlsStation {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsStation {
    /// Connects and completes the handshake (with TLS 1.3 a refused client certificate is
    /// only seen at the first read: the server's alert follows the handshake).
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsStation> {
        let mut tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(TlsStation {
            stream: BufReader::new(StreamOwned::new(conn, tcp)),
        })
    }

    /// The TLS version the handshake settled on.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.get_ref().conn.protocol_version()
    }

    /// The server's certificate, DER.
    pub fn server_certificate(&self) -> Vec<u8> {
        self.stream.get_ref().conn.peer_certificates().unwrap()[0].to_vec()
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let s = self.stream.get_mut();
        s.write_all(bytes)?;
        s.flush()
    }

    /// The next reply line, parsed.
    pub fn reply(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.stream)
    }

    /// Fails unless the server's next move is an orderly TLS close: its close_notify, with no
    /// more bytes before it (an abrupt TCP close is `UnexpectedEof`, silence a timeout).
    pub fn expect_close_notify(&mut self) {
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "bytes before the close: {rest:?}"),
            Err(e) => panic!("not an orderly TLS close: {e} ({:?})", e.kind()),
        }
    }

    /// Reads until `seq` is acknowledged; any other reply fails.
    pub fn wait_for_ack(&mut self, seq: u64) {
        super::wait_for_ack(|| self.reply(), seq);
    }
}

/// An identify asking for acknowledgements, with `token` when given.
pub fn identify(zipcode: &str, token: Option<&str>) -> Vec<u8> {
    let mut v =
        serde_json::json!({"type": "identify", "zipcode": zipcode, "city": "Town", "acks": true});
    if let Some(token) = token {
        v["token"] = token.into();
    }
    format!("{v}\n").into_bytes()
}

/// A metrics line with `seq`.
pub fn metrics(seq: u64, data: &str) -> Vec<u8> {
    format!(
        "{}\n",
        serde_json::json!({"type": "metrics", "seq": seq, "data": data})
    )
    .into_bytes()
}
