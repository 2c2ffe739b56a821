//! API keys: a file of SHA-256 hashes of the keys (never the keys themselves), each with the identity it stands
//! for and its own limits. A presented key is hashed and compared with every entry in constant time; `wsgate
//! hash-key` writes the hash to put in the file.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::HandshakeRate;

/// The highest per-key handshake rate (as for `handshakes_per_second_per_ip`).
pub const MAX_KEY_RATE: u32 = 1_000_000;

/// One key of the file.
#[derive(Debug, Clone)]
pub struct ApiKey {
    hash: [u8; 32],
    pub identity: String,
    /// Live connections this key may hold; over it: 429.
    pub max_connections: Option<u32>,
    /// Handshakes per second this key may start (with its burst); over it: 429.
    pub rate: Option<HandshakeRate>,
}

impl ApiKey {
    /// The key's hash: what its limits are counted by.
    pub fn id(&self) -> [u8; 32] {
        self.hash
    }
}

/// A route's API keys.
#[derive(Debug)]
pub struct ApiKeys {
    pub keys: Vec<ApiKey>,
    /// The header a key is sent in (lowercase).
    pub header: String,
    /// The query parameter a key may be sent in.
    pub query: Option<String>,
    /// The header the key's identity is forwarded in.
    pub identity_header: String,
}

impl ApiKeys {
    /// The entry of a presented key: every entry is compared, in constant time, whatever matches.
    pub fn lookup(&self, presented: &[u8]) -> Option<&ApiKey> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.hash.ct_eq(&digest)) && found.is_none() {
                found = Some(key);
            }
        }
        found
    }
}

/// The hex SHA-256 of a key, as the keys file holds it.
pub fn hash_hex(key: &[u8]) -> String {
    Sha256::digest(key).iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    key: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    hash: String,
    identity: String,
    max_connections: Option<u32>,
    handshakes_per_second: Option<u32>,
    burst: Option<u32>,
}

/// Reads a keys file: `[[key]]` tables with `hash` (hex SHA-256), `identity`, and optionally `max_connections`,
/// `handshakes_per_second` and `burst`. The error says what is wrong (and where, for TOML problems).
pub fn load(path: &Path) -> Result<Vec<ApiKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    parse(&text)
}

fn parse(text: &str) -> Result<Vec<ApiKey>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| {
            let before = text.get(..s.start).unwrap_or_default();
            format!("line {}: ", before.matches('\n').count() + 1)
        });
        format!("{}{}", at.unwrap_or_default(), e.message().trim_end())
    })?;
    if raw.key.is_empty() {
        return Err("no [[key]] entries".into());
    }
    let mut keys: Vec<ApiKey> = Vec::with_capacity(raw.key.len());
    for (i, k) in raw.key.into_iter().enumerate() {
        let n = i + 1;
        let hash = parse_hex(&k.hash)
            .ok_or_else(|| format!("key #{n}: `hash` must be 64 hex digits (the SHA-256 of the key)"))?;
        if keys.iter().any(|other| other.hash == hash) {
            return Err(format!("key #{n}: the same hash is listed twice"));
        }
        if k.identity.is_empty() || !k.identity.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(format!("key #{n}: `identity` must be non-empty visible ASCII"));
        }
        if k.max_connections == Some(0) {
            return Err(format!(
                "key #{n}: `max_connections` must be at least 1 (leave it out for no limit)"
            ));
        }
        let rate = match (k.handshakes_per_second, k.burst) {
            (Some(r), _) if !(1..=MAX_KEY_RATE).contains(&r) => {
                return Err(format!(
                    "key #{n}: `handshakes_per_second` must be from 1 to {MAX_KEY_RATE}"
                ));
            }
            (Some(per_second), burst) => Some(HandshakeRate {
                per_second,
                burst: burst.unwrap_or(per_second),
            }),
            (None, Some(_)) => return Err(format!("key #{n}: `burst` applies only with `handshakes_per_second`")),
            (None, None) => None,
        };
        keys.push(ApiKey {
            hash,
            identity: k.identity,
            max_connections: k.max_connections,
            rate,
        });
    }
    Ok(keys)
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_their_hash_only() {
        let file = format!(
            "[[key]]\nhash = \"{}\"\nidentity = \"alice\"\nmax_connections = 2\n\
             [[key]]\nhash = \"{}\"\nidentity = \"bob\"\nhandshakes_per_second = 5\n",
            hash_hex(b"alice-key"),
            hash_hex(b"bob-key").to_uppercase()
        );
        let keys = ApiKeys {
            keys: parse(&file).expect("a keys file"),
            header: "x-api-key".into(),
            query: None,
            identity_header: "X-Auth-Subject".into(),
        };
        assert_eq!(keys.lookup(b"alice-key").map(|k| k.identity.as_str()), Some("alice"));
        let bob = keys.lookup(b"bob-key").expect("bob");
        assert_eq!(
            bob.rate,
            Some(HandshakeRate {
                per_second: 5,
                burst: 5
            })
        );
        assert!(keys.lookup(b"mallory").is_none());
        assert!(
            keys.lookup(hash_hex(b"alice-key").as_bytes()).is_none(),
            "the hash is not the key"
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(parse("").unwrap_err().contains("no [[key]]"));
        assert!(
            parse("[[key]]\nhash = \"abc\"\nidentity = \"a\"\n")
                .unwrap_err()
                .contains("64 hex digits")
        );
        assert!(parse("[[key]]\nhash = 1\n").unwrap_err().starts_with("line 2"));
        let twice = format!(
            "[[key]]\nhash = \"{0}\"\nidentity = \"a\"\n[[key]]\nhash = \"{0}\"\nidentity = \"b\"\n",
            hash_hex(b"k")
        );
        assert!(parse(&twice).unwrap_err().contains("twice"));
    }
}
