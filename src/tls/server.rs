//! TLS on a listener: one or several certificates, chosen by the name the client asks for (SNI), swapped in place
//! when their files change.
//!
//! Each certificate answers for the names given in the config or, without those, for the DNS names its subject
//! alternative names list; `*.example.com` answers for one label under `example.com`. An exact name wins over a
//! wildcard. A client that names no server, or one no certificate answers for, gets the default certificate (the
//! entry marked `default`, or the only one); with no default its handshake fails.
//!
//! The certificates live behind an [`ArcSwap`] in the resolver every handshake asks: [`ServerTls::refresh`] reads
//! the files again and swaps a new table in when they changed (SIGHUP, or the watch on the files). Live
//! connections keep the keys they started with; a new set that does not load leaves the old one in force.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{ALPN_HTTP1, TlsError, VERSIONS, certified_key, provider, read};

/// One certificate of a listener, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM: the certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Server names it answers for; empty = the DNS names in the certificate.
    pub names: Vec<String>,
    /// Answers clients that name no server or a server no certificate answers for.
    pub default: bool,
}

/// A listener's TLS: its certificates and the rustls config that serves them.
pub struct ServerTls {
    files: Vec<CertFiles>,
    resolver: Arc<Resolver>,
    config: Arc<rustls::ServerConfig>,
    /// A hash of the files' contents as last loaded: a refresh with the same contents changes nothing.
    #[allow(clippy::disallowed_types)] // held for a hash compare, never across an await
    loaded: std::sync::Mutex<u64>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Two listeners' TLS are the same when they are configured the same.
impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl Eq for ServerTls {}

impl ServerTls {
    /// Loads the certificates: every file must be readable, every key must match its certificate.
    pub fn load(files: Vec<CertFiles>) -> Result<ServerTls, TlsError> {
        let (contents, hash) = read_all(&files)?;
        let table = Table::build(&files, &contents)?;
        let resolver = Arc::new(Resolver {
            table: ArcSwap::from_pointee(table),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        // One ticket is enough for a browser to resume; each costs the handshake a little.
        config.send_tls13_tickets = 1;
        #[allow(clippy::disallowed_types)]
        let loaded = std::sync::Mutex::new(hash);
        Ok(ServerTls {
            files,
            resolver,
            config: Arc::new(config),
            loaded,
        })
    }

    /// The rustls config a handshake on this listener uses.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// Whether some certificate answers for `name` (or a default answers for every name).
    pub fn answers_for(&self, name: Option<&str>) -> bool {
        self.resolver.table.load().find(name).is_some()
    }

    /// Reads the files again and swaps the new certificates in when their contents changed: `Ok(true)` when they
    /// did. An error leaves the certificates in force as they are.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let (contents, hash) = read_all(&self.files)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *loaded == hash {
            return Ok(false);
        }
        let table = Table::build(&self.files, &contents)?;
        self.resolver.table.store(Arc::new(table));
        *loaded = hash;
        Ok(true)
    }

    /// The files of the certificates, for log lines.
    pub fn files(&self) -> &[CertFiles] {
        &self.files
    }
}

/// The certificates of a listener, by the names they answer for.
#[derive(Default)]
struct Table {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the name under the wildcard label (`example.com` for `*.example.com`).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

/// The contents of a certificate file and of its key file.
type Pems = (Vec<u8>, Vec<u8>);

/// The contents of every certificate and key file, with a hash of them all.
fn read_all(files: &[CertFiles]) -> Result<(Vec<Pems>, u64), TlsError> {
    let mut hasher = DefaultHasher::new();
    let mut contents = Vec::with_capacity(files.len());
    for entry in files {
        let cert_pem = read(&entry.cert)?;
        let key_pem = read(&entry.key)?;
        cert_pem.hash(&mut hasher);
        key_pem.hash(&mut hasher);
        contents.push((cert_pem, key_pem));
    }
    Ok((contents, hasher.finish()))
}

impl Table {
    fn build(files: &[CertFiles], contents: &[Pems]) -> Result<Table, TlsError> {
        let mut table = Table::default();
        for (entry, (cert_pem, key_pem)) in files.iter().zip(contents) {
            let key = Arc::new(certified_key(&entry.cert, cert_pem, &entry.key, key_pem)?);
            let names = if entry.names.is_empty() {
                dns_names(&key)
            } else {
                entry.names.clone()
            };
            for name in names {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(under) => table.wildcard.entry(under.to_string()),
                    None => table.exact.entry(name),
                }
                .or_insert_with(|| key.clone());
            }
            if entry.default || files.len() == 1 {
                table.default.get_or_insert(key);
            }
        }
        Ok(table)
    }

    fn find(&self, name: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let found = name.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).or_else(|| {
                let (_, under) = name.split_once('.')?;
                self.wildcard.get(under)
            })
        });
        found.or(self.default.as_ref())
    }
}

/// The DNS names in a certificate's subject alternative names.
fn dns_names(key: &CertifiedKey) -> Vec<String> {
    let Some(cert) = key.cert.first() else {
        return Vec::new();
    };
    match webpki::EndEntityCert::try_from(cert) {
        Ok(cert) => cert.valid_dns_names().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    }
}

/// What every handshake on a listener asks for its certificate.
#[derive(Debug)]
struct Resolver {
    table: ArcSwap<Table>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.table.load().find(hello.server_name()).cloned()
    }
}
