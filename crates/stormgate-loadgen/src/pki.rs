//! `pki`: a throwaway certificate authority that signs a server certificate and a client
//! certificate, written as PEM files, so that benchmarks and tests of TLS need nothing
//! installed (`stormgate_testkit::pki`, which the tests' certificates come from too: rcgen,
//! with the ring provider the rest of the workspace uses).
//!
//! ```text
//! DIR/ca.pem                    the CA's certificate: send --tls-ca, stormgate --tls-client-ca
//! DIR/server.crt  DIR/server.key  for --server-name (localhost and 127.0.0.1): stormgate --tls-cert/--tls-key
//! DIR/client.crt  DIR/client.key  CN=stormgate-loadgen: send --tls-cert/--tls-key
//! ```
//!
//! Keys are ECDSA P-256 (rcgen's default, and a common choice for servers today), written
//! with mode 0600. The CA's key is never written, so the CA signs nothing after this run.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use stormgate_testkit::pki::{self, Ca};

use crate::cli::PkiArgs;
use crate::{LoadgenError, output};

/// Common name of the CA.
pub const CA_NAME: &str = "Stormgate benchmark CA";
/// Common name of the client certificate.
pub const CLIENT_NAME: &str = "stormgate-loadgen";

/// The JSON summary of `pki`: where each file went.
#[derive(Debug, Clone, Serialize)]
pub struct PkiSummary {
    /// Always `"pki"`.
    pub mode: &'static str,
    /// The CA's certificate.
    pub ca: String,
    /// The server's certificate.
    pub server_cert: String,
    /// The server certificate's key.
    pub server_key: String,
    /// The names the server certificate is valid for.
    pub server_names: Vec<String>,
    /// The client certificate.
    pub client_cert: String,
    /// The client certificate's key.
    pub client_key: String,
}

/// Runs `pki`.
pub fn run(args: &PkiArgs) -> Result<ExitCode, LoadgenError> {
    let summary = write(&args.out, &args.server_names)?;
    output::emit(&summary, args.summary.as_deref())?;
    Ok(ExitCode::SUCCESS)
}

/// Makes the CA and both certificates and writes them to `dir` (created if missing).
pub fn write(dir: &Path, server_names: &[String]) -> Result<PkiSummary, LoadgenError> {
    let made = |e: pki::Error| LoadgenError::Tls(format!("cannot make a certificate: {e}"));
    fs::create_dir_all(dir).map_err(|e| LoadgenError::io("create the --out directory", e))?;

    let ca = Ca::try_new(CA_NAME).map_err(made)?;
    let server = ca.server_for(server_names).map_err(made)?;
    let client = ca.try_station(CLIENT_NAME).map_err(made)?;

    let path = |name: &str| dir.join(name).display().to_string();
    let summary = PkiSummary {
        mode: "pki",
        ca: path("ca.pem"),
        server_cert: path("server.crt"),
        server_key: path("server.key"),
        server_names: server_names.to_vec(),
        client_cert: path("client.crt"),
        client_key: path("client.key"),
    };
    write_file(&summary.ca, &ca.pem, 0o644)?;
    write_file(&summary.server_cert, &server.cert_pem, 0o644)?;
    write_file(&summary.server_key, &server.key_pem, 0o600)?;
    write_file(&summary.client_cert, &client.cert_pem, 0o644)?;
    write_file(&summary.client_key, &client.key_pem, 0o600)?;
    Ok(summary)
}

/// Writes `text` to `path` with permissions `mode` (also when the file already existed).
fn write_file(path: &str, text: &str, mode: u32) -> Result<(), LoadgenError> {
    let io = |e| LoadgenError::io("write a certificate file", e);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsClient;

    #[test]
    fn the_files_make_a_client_configuration_and_keys_are_private() {
        let dir = std::env::temp_dir().join(format!("loadgen-pki-{}", std::process::id()));
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let s = write(&dir, &names).unwrap();
        for (file, mode) in [
            (&s.server_key, 0o600),
            (&s.client_key, 0o600),
            (&s.ca, 0o644),
        ] {
            let meta = fs::metadata(file).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        assert!(
            fs::read_to_string(&s.ca)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        let client = TlsClient::new(
            Path::new(&s.ca),
            "127.0.0.1",
            Some((Path::new(&s.client_cert), Path::new(&s.client_key))),
        );
        assert!(client.is_ok(), "{:?}", client.err());
        // Writing again over the same files works (the keys stay private).
        write(&dir, &names).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
