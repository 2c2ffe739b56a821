//! A test PKI made in the tests (rcgen): a CA, certificates it signs for given names, written as PEM files; TLS
//! clients that trust the CA, and the pieces of a TLS backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;

use super::{WAIT, within, ws_config};

/// A CA of the tests' own, and the directory its files go to.
pub struct TestCa {
    pub dir: PathBuf,
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
    /// The CA certificate's PEM file.
    pub ca_file: PathBuf,
}

/// A certificate signed by a [`TestCa`]: its files and its DER, to recognise it on the wire.
#[derive(Clone)]
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(what: &str) -> TestCa {
        let dir = super::peers::unique_temp_dir(what);
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("wsgate test CA {what}"));
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write CA");
        TestCa {
            dir,
            key,
            cert,
            ca_file,
        }
    }

    /// A certificate for `names` (DNS names, or IP addresses), its files called `file`.pem and `file`.key.
    pub fn issue(&self, file: &str, names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, file.to_string());
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let issued = Issued {
            cert_file: self.dir.join(format!("{file}.pem")),
            key_file: self.dir.join(format!("{file}.key")),
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        issued.write_to(&issued.cert_file, &issued.key_file);
        issued
    }

    /// A client config trusting this CA (TLS 1.3 and 1.2, ALPN http/1.1).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_with(None)
    }

    /// [`TestCa::client_config`] presenting `client` as a client certificate.
    pub fn client_config_with(&self, client: Option<&Issued>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("root");
        let builder = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some(c) => builder
                .with_client_auth_cert(vec![c.der.clone()], c.private_key())
                .expect("client cert"),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A server config with `issued`'s certificate; with `clients`, one that requires a client certificate signed by
    /// this CA.
    pub fn server_config(&self, issued: &Issued, clients: bool) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(wsgate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if clients {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.cert.der().clone()).expect("root");
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), wsgate::tls::provider())
                    .build()
                    .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(vec![issued.der.clone()], issued.private_key())
            .expect("server cert");
        Arc::new(config)
    }
}

impl Issued {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        use rustls::pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM")
    }

    /// Writes the certificate and key to these files (replacing them in one rename each).
    pub fn write_to(&self, cert: &Path, key: &Path) {
        for (path, text) in [(key, &self.key_pem), (cert, &self.cert_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, path).expect("rename");
        }
    }
}

/// Opens TLS to `addr` asking for `name`; the error when the handshake fails.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    tokio::time::timeout(WAIT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// The certificate the server presented.
pub fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    let certs = stream.get_ref().1.peer_certificates().expect("a certificate");
    certs[0].clone().into_owned()
}

pub type WssClient = WebSocketStream<TlsStream<TcpStream>>;

/// A wss client to `addr` asking for `name`, upgraded on `path`; with the certificate it was shown.
pub async fn wss(
    addr: SocketAddr,
    name: &str,
    path: &str,
    config: Arc<rustls::ClientConfig>,
) -> (WssClient, CertificateDer<'static>) {
    let stream = tls_connect(addr, name, config).await.expect("TLS handshake");
    let cert = presented(&stream);
    let url = format!("wss://{name}{path}");
    let (ws, _) = within(
        "the WebSocket handshake over TLS",
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())),
    )
    .await
    .expect("upgrade over TLS");
    (ws, cert)
}
