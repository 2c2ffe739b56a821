//! The RFC 6455 pieces that several parts of wsgate share: the frame codec ([`frame`], pure and incremental) and
//! the `Sec-WebSocket-Accept` key. Nothing here touches a socket, a runtime or the config: the relay, the health
//! probe and the demo backend reach these from above.

pub mod frame;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};

/// The GUID every accept key is derived with (RFC 6455 §1.3).
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WEBSOCKET_GUID);
    let mut out = [0u8; 28];
    // A 20-byte digest always encodes to exactly 28 base64 bytes.
    let _ = BASE64.encode_slice(sha.finalize(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            &super::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
