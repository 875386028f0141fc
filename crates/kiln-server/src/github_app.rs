//! GitHub App authentication: the App's private key signs a JWT, the JWT buys an installation
//! token, the installation token calls the API (check runs).
//!
//! ```text
//! PEM private key ─ RS256 ─> JWT {iss: app id, iat: now-60 s, exp: now+9 min}
//!   ─ POST /app/installations/{installation}/access_tokens ─> {token, expires_at}  (cached)
//!   ─ Authorization: Bearer <token> ─> /repos/{owner}/{repo}/check-runs
//! ```
//! The installation comes from the webhook payload's `installation.id`; for runs without one
//! (manual triggers) it is looked up with `GET /repos/{owner}/{repo}/installation`. Tokens are
//! cached per API URL and installation until five minutes before they expire, and dropped when
//! the API refuses one.
//!
//! The JWT is signed with aws-lc-rs (already used for webhook HMACs): RSASSA-PKCS1-v1_5 with
//! SHA-256 is all RS256 needs, and aws-lc-rs reads both key forms an App key comes in (PKCS#1
//! `BEGIN RSA PRIVATE KEY`, as GitHub hands it out, and PKCS#8 `BEGIN PRIVATE KEY`).

use std::collections::HashMap;
use std::sync::Mutex;

use aws_lc_rs::rsa::KeyPair;
use aws_lc_rs::signature::RSA_PKCS1_SHA256;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;

/// A misconfigured GitHub App.
#[derive(Debug, thiserror::Error)]
pub enum GitHubAppError {
    /// The App id is not a number.
    #[error("KILN_GITHUB_APP_ID: `{0}` is not a GitHub App id (a number)")]
    BadAppId(String),
    /// The key is not PEM.
    #[error(
        "KILN_GITHUB_APP_PRIVATE_KEY: not a PEM private key (expected the file GitHub gives, \
         starting with -----BEGIN RSA PRIVATE KEY-----)"
    )]
    NotPem,
    /// The PEM body is not base64.
    #[error("KILN_GITHUB_APP_PRIVATE_KEY: the PEM body is not base64")]
    Base64(#[source] base64::DecodeError),
    /// The key is not an RSA key aws-lc accepts.
    #[error("KILN_GITHUB_APP_PRIVATE_KEY: not a usable RSA private key ({0})")]
    Rejected(String),
    /// Signing failed.
    #[error("Cannot sign the GitHub App JWT")]
    Sign,
}

/// A configured GitHub App.
pub struct GitHubApp {
    app_id: u64,
    key: KeyPair,
    tokens: Mutex<HashMap<(String, u64), CachedToken>>,
}

impl std::fmt::Debug for GitHubApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubApp")
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: String,
    expires_at: jiff::Timestamp,
}

/// `POST /app/installations/{id}/access_tokens`'s answer.
#[derive(Debug, Deserialize)]
struct AccessToken {
    token: String,
    expires_at: jiff::Timestamp,
}

/// The DER body and label of the first PEM block in `text`.
fn pem_block(text: &str) -> Result<(String, Vec<u8>), GitHubAppError> {
    // Keys pasted into one environment variable often carry `\n` escapes.
    let text = if !text.contains('\n') && text.contains("\\n") {
        text.replace("\\n", "\n")
    } else {
        text.to_owned()
    };
    let mut lines = text.lines().map(str::trim);
    let label = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or(GitHubAppError::NotPem)?
        .to_owned();
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    let mut ended = false;
    for line in lines {
        if line == end {
            ended = true;
            break;
        }
        body.push_str(line);
    }
    if !ended {
        return Err(GitHubAppError::NotPem);
    }
    let der = STANDARD.decode(body).map_err(GitHubAppError::Base64)?;
    Ok((label, der))
}

impl GitHubApp {
    /// The App `app_id` with its PEM private key.
    pub fn new(app_id: &str, private_key_pem: &str) -> Result<GitHubApp, GitHubAppError> {
        let app_id = app_id
            .trim()
            .parse::<u64>()
            .map_err(|_| GitHubAppError::BadAppId(app_id.to_owned()))?;
        let (label, der) = pem_block(private_key_pem)?;
        let key = match label.as_str() {
            "RSA PRIVATE KEY" => KeyPair::from_der(&der),
            "PRIVATE KEY" => KeyPair::from_pkcs8(&der),
            _ => return Err(GitHubAppError::Rejected(format!("a PEM `{label}`"))),
        }
        .map_err(|e| GitHubAppError::Rejected(e.to_string()))?;
        Ok(GitHubApp {
            app_id,
            key,
            tokens: Mutex::default(),
        })
    }

    /// The App id.
    pub fn app_id(&self) -> u64 {
        self.app_id
    }

    /// A JWT for the App, valid from a minute before `now` (clock drift, as GitHub advises)
    /// until nine minutes after (GitHub's limit is ten).
    pub fn jwt(&self, now: jiff::Timestamp) -> Result<String, GitHubAppError> {
        let now = now.as_second();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"iat": now - 60, "exp": now + 9 * 60, "iss": self.app_id.to_string()})
                .to_string(),
        );
        let signing_input = format!("{header}.{claims}");
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| GitHubAppError::Sign)?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }

    /// An installation token for `installation` (looked up for `repository` when `None`),
    /// from the cache while it has more than five minutes left. `Err` is a message for the log.
    pub(crate) async fn installation_token(
        &self,
        http: &reqwest::Client,
        api_url: &str,
        repository: &str,
        installation: Option<u64>,
    ) -> Result<String, String> {
        let installation = match installation {
            Some(id) => id,
            None => self.find_installation(http, api_url, repository).await?,
        };
        let cache_key = (api_url.to_owned(), installation);
        let now = jiff::Timestamp::now();
        if let Some(cached) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cache_key)
            && cached.expires_at.duration_since(now).as_secs() > 5 * 60
        {
            return Ok(cached.token.clone());
        }
        let jwt = self.jwt(now).map_err(|e| e.to_string())?;
        let url = format!("{api_url}/app/installations/{installation}/access_tokens");
        let response = github_request(http.post(&url), &jwt)
            .send()
            .await
            .map_err(|e| format!("Installation token: {}", crate::api::chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "Installation token for installation {installation}: HTTP {status}"
            ));
        }
        let token: AccessToken = response
            .json()
            .await
            .map_err(|e| format!("Installation token: unreadable answer: {e}"))?;
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                cache_key,
                CachedToken {
                    token: token.token.clone(),
                    expires_at: token.expires_at,
                },
            );
        Ok(token.token)
    }

    /// Forgets a token the API refused.
    pub(crate) fn forget_token(&self, api_url: &str, token: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(url, _), cached| !(url == api_url && cached.token == token));
    }

    async fn find_installation(
        &self,
        http: &reqwest::Client,
        api_url: &str,
        repository: &str,
    ) -> Result<u64, String> {
        #[derive(Deserialize)]
        struct Installation {
            id: u64,
        }
        let jwt = self
            .jwt(jiff::Timestamp::now())
            .map_err(|e| e.to_string())?;
        let url = format!("{api_url}/repos/{repository}/installation");
        let response = github_request(http.get(&url), &jwt)
            .send()
            .await
            .map_err(|e| format!("Finding the App installation: {}", crate::api::chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "The GitHub App is not installed on {repository} (HTTP {status})"
            ));
        }
        let found: Installation = response
            .json()
            .await
            .map_err(|e| format!("Finding the App installation: unreadable answer: {e}"))?;
        Ok(found.id)
    }
}

/// GitHub's recommended headers with a bearer token.
pub(crate) fn github_request(
    request: reqwest::RequestBuilder,
    token: &str,
) -> reqwest::RequestBuilder {
    request
        .bearer_auth(token)
        .header("Accept", "application/vnd.github+json")
        .header("X-GitHub-Api-Version", "2022-11-28")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    fn pem(label: &str, der: &[u8]) -> String {
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn the_jwt_verifies_with_the_public_key_and_names_the_app() {
        let key = KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("generate");
        let pkcs8 = key.as_der().expect("pkcs8");
        let app = GitHubApp::new("12345", &pem("PRIVATE KEY", pkcs8.as_ref())).expect("app");
        let now = jiff::Timestamp::from_second(1_700_000_000).expect("time");
        let jwt = app.jwt(now).expect("jwt");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("base64");
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public_key().as_ref())
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("the signature verifies");
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(header["alg"], "RS256");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["iss"], "12345");
        assert_eq!(claims["iat"], 1_700_000_000 - 60);
        assert_eq!(claims["exp"], 1_700_000_000 + 540);
    }

    #[test]
    fn a_pkcs1_key_as_github_hands_it_out_signs_verifiable_jwts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let pem = std::fs::read_to_string(dir.join("github-app-test-key.pem")).expect("key");
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let public = std::fs::read(dir.join("github-app-test-key.pub.der")).expect("public");
        let app = GitHubApp::new("7", &pem).expect("app");
        let jwt = app.jwt(jiff::Timestamp::now()).expect("jwt");
        let (input, signature) = jwt.rsplit_once('.').expect("three parts");
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public)
            .verify(
                input.as_bytes(),
                &URL_SAFE_NO_PAD.decode(signature).expect("base64"),
            )
            .expect("the signature verifies");
    }

    #[test]
    fn escaped_newlines_in_one_line_are_accepted() {
        let key = KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("generate");
        let text = pem("PRIVATE KEY", key.as_der().expect("pkcs8").as_ref()).replace('\n', "\\n");
        GitHubApp::new("1", &text).expect("app");
    }

    #[test]
    fn bad_ids_and_keys_are_named() {
        assert!(matches!(
            GitHubApp::new("abc", ""),
            Err(GitHubAppError::BadAppId(_))
        ));
        assert!(matches!(
            GitHubApp::new("1", "not a key"),
            Err(GitHubAppError::NotPem)
        ));
        assert!(matches!(
            GitHubApp::new(
                "1",
                "-----BEGIN RSA PRIVATE KEY-----\n!!!\n-----END RSA PRIVATE KEY-----"
            ),
            Err(GitHubAppError::Base64(_))
        ));
        assert!(matches!(
            GitHubApp::new("1", &pem("RSA PRIVATE KEY", b"garbage")),
            Err(GitHubAppError::Rejected(_))
        ));
    }
}
