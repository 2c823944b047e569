//! Meta's webhook signatures (`X-Hub-Signature-256`, and the legacy sha1
//! `X-Hub-Signature` where configured), the GET verification handshake,
//! and Telegram's secret token. Every comparison takes the same time
//! wherever the inputs differ.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use crate::common::constant_time_eq;

/// The header of the SHA-256 signature.
pub const META_SHA256_HEADER: &str = "x-hub-signature-256";
/// The legacy header of the SHA-1 signature.
pub const META_SHA1_HEADER: &str = "x-hub-signature";
/// Telegram's secret token header.
pub const TELEGRAM_SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body`, the raw
/// bytes exactly as received, under `app_secret`.
pub fn meta_sha256_valid(app_secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    constant_time_eq(&mac.finalize().into_bytes(), &given)
}

/// Whether `header` (`sha1=<hex>`) is the HMAC-SHA1 of `body` under
/// `app_secret`.
pub fn meta_sha1_valid(app_secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha1=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(app_secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    constant_time_eq(&mac.finalize().into_bytes(), &given)
}

/// Checks a POST: the SHA-256 header when present; the SHA-1 header only
/// when `accept_sha1` and no SHA-256 header came.
pub fn meta_signed(
    app_secret: &str,
    body: &[u8],
    sha256: Option<&str>,
    sha1: Option<&str>,
    accept_sha1: bool,
) -> bool {
    match (sha256, sha1) {
        (Some(h), _) => meta_sha256_valid(app_secret, body, h),
        (None, Some(h)) if accept_sha1 => meta_sha1_valid(app_secret, body, h),
        _ => false,
    }
}

/// The answer to Meta's verification GET: the challenge when `hub.mode` is
/// `subscribe` and `hub.verify_token` is ours, else `None` (answered 403).
pub fn meta_handshake<'a>(
    verify_token: &str,
    mode: Option<&str>,
    token: Option<&str>,
    challenge: Option<&'a str>,
) -> Option<&'a str> {
    if mode != Some("subscribe") {
        return None;
    }
    let token = token?;
    if !constant_time_eq(token.as_bytes(), verify_token.as_bytes()) {
        return None;
    }
    challenge
}

/// Whether Telegram's `X-Telegram-Bot-Api-Secret-Token` is ours.
pub fn telegram_secret_valid(expected: &str, given: Option<&str>) -> bool {
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from /work/shared/notes/protocols.md §2 (bottender); the
    // payload vectors (pywa, messenger4j) are in tests/signatures.rs.
    #[test]
    fn bottender_sha1_vectors() {
        assert!(meta_sha1_valid(
            "FAKE_SECRET",
            b"rawBody",
            "sha1=0d814d436b45c33ef664a317ff4b8dc2d3d8fe2a"
        ));
        assert!(meta_sha1_valid(
            "FAKE_SECRET",
            b"{}",
            "sha1=1c99183cb7c44ea27fb834746086b65b89800db8"
        ));
        assert!(!meta_sha1_valid(
            "FAKE_SECRET",
            b"{} ",
            "sha1=1c99183cb7c44ea27fb834746086b65b89800db8"
        ));
        assert!(!meta_sha1_valid("FAKE_SECRET", b"rawBody", "sha1=zz"));
        assert!(!meta_sha1_valid(
            "FAKE_SECRET",
            b"rawBody",
            "0d814d436b45c33ef664a317ff4b8dc2d3d8fe2a"
        ));
    }

    #[test]
    fn sha1_only_counts_where_configured() {
        let h = "sha1=0d814d436b45c33ef664a317ff4b8dc2d3d8fe2a";
        assert!(meta_signed("FAKE_SECRET", b"rawBody", None, Some(h), true));
        assert!(!meta_signed(
            "FAKE_SECRET",
            b"rawBody",
            None,
            Some(h),
            false
        ));
        assert!(!meta_signed("FAKE_SECRET", b"rawBody", None, None, true));
    }

    #[test]
    fn handshake_cases() {
        // bottender: token 1qaz2wsx, challenge abc.
        assert_eq!(
            meta_handshake("1qaz2wsx", Some("subscribe"), Some("1qaz2wsx"), Some("abc")),
            Some("abc")
        );
        assert_eq!(
            meta_handshake("1qaz2wsx", Some("subscribe"), Some("3edc4rfv"), Some("abc")),
            None
        );
        // messenger4j: bad mode, bad token.
        let t = "CUSTOM_VERIFY_TOKEN";
        assert!(meta_handshake(t, Some("subscribe"), Some(t), Some("c")).is_some());
        assert!(meta_handshake(t, Some("INVALID_MODE"), Some(t), Some("c")).is_none());
        assert!(
            meta_handshake(
                t,
                Some("subscribe"),
                Some("INVALID_VERIFY_TOKEN"),
                Some("c")
            )
            .is_none()
        );
        assert!(meta_handshake(t, None, Some(t), Some("c")).is_none());
        assert!(meta_handshake(t, Some("subscribe"), None, Some("c")).is_none());
    }

    #[test]
    fn telegram_secret_is_an_exact_match() {
        assert!(telegram_secret_valid("s3cr3t_A-b", Some("s3cr3t_A-b")));
        assert!(!telegram_secret_valid("s3cr3t_A-b", Some("s3cr3t_A-c")));
        assert!(!telegram_secret_valid("s3cr3t_A-b", Some("s3cr3t_A-b ")));
        assert!(!telegram_secret_valid("s3cr3t_A-b", None));
    }
}
