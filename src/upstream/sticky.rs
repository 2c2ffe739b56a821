//! Which server a request asks for, found from the request: the server its sticky cookie names, the owner of its
//! sticky header or client IP on the hash ring, and the key a hashing balancer hashes; and the sticky cookie an
//! answer carries. A cookie names its server by a keyed hash, never by its address.

use std::net::IpAddr;

use sha1::{Digest, Sha1};

use super::balance::hash_bytes;
use super::server::ServerState;
use super::{Choice, Upstream};
use crate::config::{self, Balance, HashKey, Sticky};
use crate::http::RequestView;

impl Upstream {
    /// Which server the request asks for: the server its sticky cookie names, or the owner of its sticky header or
    /// IP on the hash ring; and the key a hashing balancer hashes.
    pub fn choose(&self, req: &impl RequestView, client_ip: IpAddr) -> Choice {
        let ip_hash = || match client_ip.to_canonical() {
            IpAddr::V4(ip) => hash_bytes(&ip.octets()),
            IpAddr::V6(ip) => hash_bytes(&ip.octets()),
        };
        let (sticky, ring_key) = match &self.config.sticky {
            Some(Sticky::Cookie(c)) => (req.cookie(&c.name).and_then(|v| self.server_by_cookie(v)), None),
            Some(Sticky::Header(name)) => (None, req.header(name).map(hash_bytes)),
            Some(Sticky::SourceIp) => (None, Some(ip_hash())),
            None => (None, None),
        };
        let key = match (self.config.balance, &self.config.hash_key) {
            (Balance::SourceIp, _) | (Balance::ConsistentHash, HashKey::SourceIp) => Some(ip_hash()),
            (Balance::ConsistentHash, HashKey::Header(name)) => req.header(name).map(hash_bytes),
            (Balance::ConsistentHash, HashKey::Cookie(name)) => req.cookie(name).map(hash_bytes),
            (Balance::ConsistentHash, HashKey::Query(name)) => req.query(name).map(hash_bytes),
            (Balance::ConsistentHash, HashKey::Path) => Some(hash_bytes(req.path())),
            _ => None,
        };
        Choice { sticky, ring_key, key }
    }

    /// The `Set-Cookie` value that sticks a client to `server`, when the upstream uses a sticky cookie and the client
    /// did not present one naming that server.
    pub fn sticky_cookie(&self, choice: Choice, server: &ServerState) -> Option<String> {
        let Some(Sticky::Cookie(c)) = &self.config.sticky else {
            return None;
        };
        let presented = choice.sticky.and_then(|i| self.servers().get(i));
        if presented.is_some_and(|s| std::ptr::eq(&**s, server)) {
            return None;
        }
        let mut cookie = format!(
            "{}={}; Path={}; HttpOnly; SameSite=Lax",
            c.name,
            self.cookie_id(server)?,
            c.path
        );
        if let Some(age) = c.max_age {
            cookie.push_str(&format!("; Max-Age={}", age.as_secs()));
        }
        Some(cookie)
    }

    /// The server whose sticky cookie has this value.
    pub fn server_by_cookie(&self, value: &[u8]) -> Option<usize> {
        self.cookie_ids.iter().position(|id| id.as_bytes() == value)
    }

    /// The value of the sticky cookie naming `server` (`None` for a server this upstream does not list).
    pub fn cookie_id(&self, server: &ServerState) -> Option<&str> {
        let index = self.servers.iter().position(|s| std::ptr::eq(&**s, server))?;
        self.cookie_ids.get(index).map(String::as_str)
    }
}

/// The sticky-cookie id of a server: a keyed hash of its identity, so it names the server without revealing its
/// address, and stays the same across reloads and restarts.
pub(super) fn cookie_id(upstream: &config::Upstream, server: &str) -> String {
    let secret = match &upstream.sticky {
        Some(config::Sticky::Cookie(c)) => c.secret.as_str(),
        _ => upstream.name.as_str(),
    };
    let mut sha = Sha1::new();
    sha.update((secret.len() as u64).to_be_bytes());
    sha.update(secret.as_bytes());
    sha.update(server.as_bytes());
    let digest = sha.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::upstream;
    use super::*;

    #[test]
    fn cookie_ids_are_keyed_stable_and_reveal_no_address() {
        let cookie = |secret: &str| {
            config::Sticky::Cookie(config::StickyCookie {
                name: "SERVERID".into(),
                path: "/".into(),
                max_age: None,
                forward_cookie: false,
                secret: secret.into(),
            })
        };
        let a = Upstream::new(&upstream(2, Some(cookie("s1"))), None);
        let again = Upstream::new(&upstream(2, Some(cookie("s1"))), None);
        let other_key = Upstream::new(&upstream(2, Some(cookie("s2"))), None);
        let id = a.cookie_id(&a.servers()[1]).expect("listed").to_string();
        assert_eq!(id.len(), 16);
        assert!(!id.contains("9001"));
        assert_eq!(again.cookie_id(&again.servers()[1]), Some(id.as_str()));
        assert_ne!(other_key.cookie_id(&other_key.servers()[1]), Some(id.as_str()));
        // A new secret on reload renames the servers that stay.
        let reloaded = Upstream::new(&upstream(2, Some(cookie("s2"))), Some(&a));
        assert!(Arc::ptr_eq(&reloaded.servers()[1], &a.servers()[1]));
        assert_eq!(reloaded.server_by_cookie(id.as_bytes()), None);
        assert_eq!(a.server_by_cookie(id.as_bytes()), Some(1));
        assert_eq!(a.server_by_cookie(b"nope"), None);
    }
}
