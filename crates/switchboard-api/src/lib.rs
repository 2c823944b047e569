//! The api channel: Switchboard hands a message to another system by POSTing
//! it as JSON (`switchboard.api-message.v1`) to a URL configured per account.
//!
//! Contract: one [`Outbound::send`] call is one HTTP request; retries belong
//! to the dispatcher. Every request is signed with HMAC-SHA256 over the exact
//! body bytes (header `Switchboard-Signature: t=<unix seconds>,v1=<hex>`,
//! the MAC taken over `<t>.<body>`), and carries the request's key as
//! `Idempotency-Key`, so a receiver that deduplicates on it never delivers a
//! message twice, even when Switchboard resends after a crash. The answer is
//! classified by type: 2xx sent; 429 throttled (honouring `Retry-After`);
//! 408 and 5xx provider failures; timeouts and connection errors retryable;
//! any other status rejected for good. Secrets are never logged.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;
pub use switchboard_core::Secret;
use switchboard_core::records::{ApiMessage, ApiMessageSchema};
use switchboard_core::{
    Channel, Identity, IdentityKind, Outbound, OutboundMessage, SendError, SendReceipt,
};

/// URLs of api accounts.
pub use reqwest::Url;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "switchboard-signature";
/// The idempotency header.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// One account of the api channel.
#[derive(Debug, Clone)]
pub struct ApiAccount {
    /// Where messages for this account go.
    pub url: reqwest::Url,
    /// The HMAC key.
    pub secret: Secret,
    /// How long one request may take.
    pub timeout: Duration,
}

/// Why the api channel could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ApiChannelError {
    /// The HTTP client could not be built.
    #[error("cannot build the http client: {0}")]
    Client(String),
}

/// The api channel's sending side.
pub struct ApiChannel {
    client: reqwest::Client,
    accounts: HashMap<String, ApiAccount>,
    default_account: Option<String>,
}

/// Signs `body` at time `t` (unix seconds): the header value.
pub fn sign(secret: &Secret, t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("hmac takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature header against `body`, accepting timestamps within
/// `tolerance` of `now` (unix seconds). What a receiver does; used in tests
/// and documented in `docs/integration.md`.
pub fn verify(secret: &Secret, header: &str, body: &[u8], now: u64, tolerance: u64) -> bool {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if now.abs_diff(t) > tolerance {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return false;
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    sigs.iter().any(|s| {
        hex::decode(s).is_ok_and(|given| {
            given.len() == expected.len()
                && given
                    .iter()
                    .zip(expected.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    })
}

/// Parses `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(value)
        .ok()
        .map(|at| at.duration_since(now).unwrap_or_default())
}

impl ApiChannel {
    /// The channel for these accounts.
    pub fn new(
        accounts: HashMap<String, ApiAccount>,
        default_account: Option<String>,
    ) -> Result<Self, ApiChannelError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ApiChannelError::Client(e.to_string()))?;
        Ok(ApiChannel {
            client,
            accounts,
            default_account,
        })
    }

    fn account(&self, name: &str) -> Result<&ApiAccount, SendError> {
        self.accounts.get(name).ok_or_else(|| {
            SendError::NotConfigured(format!("api account {name:?} is not configured"))
        })
    }
}

#[async_trait]
impl Outbound for ApiChannel {
    fn channel(&self) -> Channel {
        Channel::Api
    }

    fn idempotent(&self) -> bool {
        true
    }

    fn sender(&self, account: &str) -> Result<Identity, SendError> {
        self.account(account)?;
        Identity::new(IdentityKind::External, account)
            .map_err(|e| SendError::NotConfigured(e.to_string()))
    }

    fn default_account(&self) -> Option<String> {
        self.default_account.clone()
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        let account = self.account(&msg.account)?;
        let body = serde_json::to_vec(&ApiMessage {
            schema: ApiMessageSchema::V1,
            message_id: msg.message_id,
            idempotency_key: msg.idempotency_key.clone(),
            conversation_id: msg.conversation_id,
            customer_id: msg.customer_id,
            account: msg.account.clone(),
            to: msg.to.clone(),
            subject: msg.subject.clone(),
            text: msg.text.clone(),
            attachments: msg.attachments.clone(),
            template: msg.template.clone(),
            attempt: msg.attempt,
        })
        .map_err(|e| SendError::NotConfigured(format!("cannot encode the message: {e}")))?;
        let now = SystemTime::now();
        let t = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signature = sign(&account.secret, t, &body);
        let res = self
            .client
            .post(account.url.clone())
            .timeout(account.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(IDEMPOTENCY_HEADER, &msg.idempotency_key)
            .header("switchboard-message-id", msg.message_id.to_string())
            .header("switchboard-attempt", msg.attempt.to_string())
            .body(body)
            .send()
            .await;
        let resp = match res {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(SendError::Timeout(account.timeout)),
            Err(e) => return Err(SendError::Connect(without_url(&e))),
        };
        let status = resp.status();
        let advised = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, now));
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) if e.is_timeout() => return Err(SendError::Timeout(account.timeout)),
            Err(e) => return Err(SendError::Connect(without_url(&e))),
        };
        let reason = || {
            let t: String = text.chars().take(300).collect();
            if t.trim().is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no reason given")
                    .to_owned()
            } else {
                t
            }
        };
        match status.as_u16() {
            200..=299 => {
                let provider_message_id = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|id| id.as_str().map(str::to_owned)));
                Ok(SendReceipt {
                    provider_message_id,
                    segments: None,
                })
            }
            429 => Err(SendError::Throttled {
                retry_after: advised,
                reason: reason(),
            }),
            408 | 500..=599 => Err(SendError::Provider {
                status: status.as_u16(),
                reason: reason(),
            }),
            other => Err(SendError::Rejected {
                status: other,
                code: None,
                reason: reason(),
            }),
        }
    }
}

/// A reqwest error's text without the URL, which may carry credentials.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}

#[cfg(test)]
mod tests;
