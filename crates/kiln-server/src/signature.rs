//! Webhook signatures.
//!
//! GitHub signs the raw body with HMAC-SHA256 under the webhook secret and sends
//! `X-Hub-Signature-256: sha256=<hex>`; Gitea sends the bare hex digest in `X-Gitea-Signature`.
//! The digest is decoded and compared in constant time (`aws_lc_rs::hmac::verify`). GitHub's
//! legacy `X-Hub-Signature` (SHA-1) is never accepted.

use aws_lc_rs::hmac;

/// Why a signature was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature header.
    #[error("Missing signature")]
    Missing,
    /// The header does not name SHA-256 (`sha256=`).
    #[error("Unsupported signature algorithm")]
    Algorithm,
    /// The digest is not hex of the right length.
    #[error("Malformed signature")]
    Malformed,
    /// The digest does not match the body.
    #[error("Signature mismatch")]
    Mismatch,
}

/// Checks GitHub's `X-Hub-Signature-256` header value against `body`.
pub fn verify_github(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?.trim();
    let (algorithm, hex) = header.split_once('=').ok_or(SignatureError::Malformed)?;
    if !algorithm.eq_ignore_ascii_case("sha256") {
        return Err(SignatureError::Algorithm);
    }
    verify_hex(secret, hex, body)
}

/// Checks Gitea's `X-Gitea-Signature` header value (bare hex) against `body`.
pub fn verify_gitea(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?.trim();
    verify_hex(secret, header, body)
}

fn verify_hex(secret: &[u8], hex: &str, body: &[u8]) -> Result<(), SignatureError> {
    let tag = decode_hex(hex).ok_or(SignatureError::Malformed)?;
    if tag.len() != 32 {
        return Err(SignatureError::Malformed);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, body, &tag).map_err(|_| SignatureError::Mismatch)
}

/// The hex `X-Hub-Signature-256` value for `body` (for clients and tests).
pub fn sign_github(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", sign_hex(secret, body))
}

/// The bare hex HMAC-SHA256 of `body`.
pub fn sign_hex(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, body);
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's documented example ("Validating webhook deliveries").
    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    const SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_documented_vector_verifies() {
        assert_eq!(sign_github(SECRET, BODY), SIGNATURE);
        assert_eq!(verify_github(SECRET, Some(SIGNATURE), BODY), Ok(()));
    }

    #[test]
    fn wrong_secret_or_body_is_a_mismatch() {
        assert_eq!(
            verify_github(b"other", Some(SIGNATURE), BODY),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_github(SECRET, Some(SIGNATURE), b"Hello, World?"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn missing_malformed_and_sha1_are_rejected() {
        assert_eq!(
            verify_github(SECRET, None, BODY),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_github(SECRET, Some("sha1=0123"), BODY),
            Err(SignatureError::Algorithm)
        );
        assert_eq!(
            verify_github(SECRET, Some("sha256=zz"), BODY),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_github(SECRET, Some("sha256=abcd"), BODY),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_github(SECRET, Some(SIGNATURE.trim_start_matches("sha256=")), BODY),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn gitea_uses_bare_hex() {
        let hex = sign_hex(SECRET, BODY);
        assert_eq!(verify_gitea(SECRET, Some(&hex), BODY), Ok(()));
        assert_eq!(
            verify_gitea(SECRET, Some(SIGNATURE), BODY),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_gitea(SECRET, None, BODY),
            Err(SignatureError::Missing)
        );
    }
}
