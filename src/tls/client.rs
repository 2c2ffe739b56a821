//! TLS to an upstream's servers: their certificates verified against the configured CA (or, when
//! `insecure_skip_verify = true` is written out, not at all), an optional client certificate for mutual TLS.
//! Relayed connections, plain HTTP and health checks all connect through [`ClientTls::connect`].

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

use super::{ALPN_HTTP1, TlsError, VERSIONS, certificates, certified_key, provider, read};

/// An upstream's TLS, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// PEM file of the CA certificates the servers' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// The name to ask for (SNI) and to verify; `None` = each server's host as written in the config.
    pub server_name: Option<String>,
    /// Client certificate and key, for servers that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Accept any certificate (tests, and nothing else).
    pub insecure_skip_verify: bool,
}

/// An upstream's TLS, loaded.
pub struct ClientTls {
    settings: TlsSettings,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl Eq for ClientTls {}

impl ClientTls {
    pub fn load(settings: TlsSettings) -> Result<ClientTls, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = match (&settings.ca, settings.insecure_skip_verify) {
            (_, true) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate)),
            (Some(ca), false) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(ca, &read(ca)?)? {
                    roots.add(cert).map_err(|e| TlsError::BadCa {
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
                }
                builder.with_root_certificates(roots)
            }
            (None, false) => {
                return Err(TlsError::Setup(
                    "`tls` needs `ca` (the CA file the servers' certificates chain to)".into(),
                ));
            }
        };
        let mut config = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => {
                let key_pem = read(key)?;
                let certified = certified_key(cert, &read(cert)?, key, &key_pem)?;
                builder
                    .with_client_auth_cert(certified.cert, super::private_key(key, &key_pem)?)
                    .map_err(|e| TlsError::BadKey {
                        path: key.clone(),
                        reason: e.to_string(),
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::Setup("`cert` and `key` go together".into())),
        };
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(ClientTls {
            settings,
            config: Arc::new(config),
        })
    }

    /// TLS to servers whose certificates chain to the system's CA certificates (those a browser would trust), for
    /// public services such as an identity provider's JWKS.
    pub fn system_roots() -> Result<ClientTls, TlsError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found.errors.first().map_or("none found".to_string(), |e| e.to_string());
            return Err(TlsError::Setup(format!(
                "no system CA certificates ({why}): give a CA file"
            )));
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(ClientTls {
            settings: TlsSettings::default(),
            config: Arc::new(config),
        })
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The name a server is asked for and verified against: `server_name`, else `host` (a server's host as written
    /// in the config, a name or an IP address).
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.settings.server_name.as_deref().unwrap_or(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::Setup(format!("`{name}` is not a server name for TLS")))
    }

    /// Runs the TLS handshake on a connected socket.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        name: ServerName<'static>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }
}

/// The host part of a server's `host:port`.
pub fn host_of(server: &str) -> &str {
    match server.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => server,
    }
}

/// `insecure_skip_verify`: any certificate is taken; the handshake's signatures are still checked, so the
/// connection is encrypted to whoever holds the presented key, whoever that is.
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
