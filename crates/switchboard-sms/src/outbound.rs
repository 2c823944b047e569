//! Sending: the Twilio Messages API and the Vonage SMS API, one HTTP
//! request per [`Outbound::send`], the answer classified into
//! [`SendError`] variants (retries belong to the dispatcher).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use switchboard_core::{
    Channel, Identity, IdentityKind, Live, Outbound, OutboundMessage, SendError, SendReceipt,
};

use crate::common::segments;
use crate::config::{AccountConfig, Provider, SmsConfig, TwilioAccount, VonageAccount};
use crate::media::without_url;
use crate::twilio;

/// The SMS channel's sending side: every configured account, by name and
/// by number.
pub struct SmsOutbound {
    cfg: Arc<Live<SmsConfig>>,
    client: reqwest::Client,
}

impl SmsOutbound {
    /// The sending side of `cfg`'s accounts; a send uses the credentials
    /// current when it starts.
    pub fn new(cfg: Arc<Live<SmsConfig>>, client: reqwest::Client) -> Self {
        SmsOutbound { cfg, client }
    }

    fn account(&self, name: &str) -> Result<AccountConfig, SendError> {
        self.cfg.get().account(name).cloned().ok_or_else(|| {
            SendError::NotConfigured(format!("sms account {name:?} is not configured"))
        })
    }
}

/// Parses `Retry-After`: seconds, or an HTTP date.
fn retry_after(resp: &reqwest::Response, now: SystemTime) -> Option<Duration> {
    let value = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(value)
        .ok()
        .map(|at| at.duration_since(now).unwrap_or_default())
}

fn transport(e: &reqwest::Error, timeout: Duration) -> SendError {
    if e.is_timeout() {
        SendError::Timeout(timeout)
    } else {
        SendError::Connect(without_url(e))
    }
}

/// The StatusCallback URL of a message: the account's public URL +
/// `/status?sb_message_id=<id>`.
pub fn status_callback(account: &AccountConfig, message_id: uuid::Uuid) -> Option<String> {
    account
        .public_url
        .as_ref()
        .map(|u| format!("{u}/status?{}={message_id}", twilio::MESSAGE_ID_PARAM))
}

async fn send_twilio(
    client: &reqwest::Client,
    account: &AccountConfig,
    t: &TwilioAccount,
    msg: &OutboundMessage,
) -> Result<SendReceipt, SendError> {
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        account.api_base, t.account_sid
    );
    let body = {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("To", &msg.to.value);
        match &t.messaging_service_sid {
            Some(sid) => form.append_pair("MessagingServiceSid", sid),
            None => form.append_pair("From", &account.number),
        };
        form.append_pair("Body", &msg.text);
        for a in &msg.attachments {
            if let Some(u) = &a.url {
                form.append_pair("MediaUrl", u);
            }
        }
        if let Some(cb) = status_callback(account, msg.message_id) {
            form.append_pair("StatusCallback", &cb);
        }
        form.finish()
    };
    let now = SystemTime::now();
    let resp = client
        .post(url)
        .timeout(account.timeout)
        .basic_auth(&t.account_sid, Some(t.auth_token.expose()))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .map_err(|e| transport(&e, account.timeout))?;
    let status = resp.status().as_u16();
    let advised = retry_after(&resp, now);
    let text = resp
        .text()
        .await
        .map_err(|e| transport(&e, account.timeout))?;
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let str_or_num = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    if (200..300).contains(&status) {
        let provider_message_id = body["sid"].as_str().map(str::to_owned);
        if provider_message_id.is_none() {
            return Err(SendError::Provider {
                status,
                reason: "twilio answered without a message sid".into(),
            });
        }
        let segments = str_or_num(&body["num_segments"])
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|n| *n > 0)
            .or_else(|| Some(segments(&msg.text)));
        return Ok(SendReceipt {
            provider_message_id,
            segments,
        });
    }
    let code = str_or_num(&body["code"]);
    let message = body["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| text.chars().take(300).collect());
    let reason = match &code {
        Some(c) => format!("twilio error {c}: {message} ({})", twilio::error_reason(c)),
        None => format!("twilio answered {status}: {message}"),
    };
    if status == 429 || code.as_deref() == Some("20429") {
        return Err(SendError::Throttled {
            retry_after: advised,
            reason,
        });
    }
    if status >= 500 || status == 408 {
        return Err(SendError::Provider { status, reason });
    }
    Err(SendError::Rejected {
        status,
        code,
        reason,
    })
}

/// What a Vonage SMS API `status` means (sms.yml `x-errors`), and whether
/// a retry can help.
pub fn vonage_status(code: &str) -> (&'static str, bool) {
    match code {
        "1" => ("throttled", true),
        "2" => ("missing parameters", false),
        "3" => ("invalid parameters", false),
        "4" => ("invalid credentials", false),
        // The platform's own failure: the docs advise trying again.
        "5" => ("internal error", true),
        "6" => ("invalid message", false),
        "7" => ("number barred", false),
        "8" => ("partner account barred", false),
        "9" => ("partner quota violation", false),
        "10" => ("too many existing binds", true),
        "11" => ("account not enabled for http", false),
        "12" => ("message too long", false),
        "14" => ("invalid signature", false),
        "15" => ("invalid sender address", false),
        "22" => ("invalid network code", false),
        "23" => ("invalid callback url", false),
        "29" => ("non-whitelisted destination", false),
        "32" => ("signature and api secret disallowed", false),
        "33" => ("number de-activated", false),
        _ => ("unknown error", false),
    }
}

fn is_gsm(text: &str) -> bool {
    crate::common::gsm_septets(text).is_some()
}

async fn send_vonage(
    client: &reqwest::Client,
    account: &AccountConfig,
    v: &VonageAccount,
    msg: &OutboundMessage,
) -> Result<SendReceipt, SendError> {
    if msg.attachments.iter().any(|a| a.url.is_some()) {
        return Err(SendError::NotConfigured(
            "the vonage sms api cannot send media; send it through a twilio account".into(),
        ));
    }
    let url = format!("{}/sms/json", account.api_base);
    let body = {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("api_key", &v.api_key);
        form.append_pair("api_secret", v.api_secret.expose());
        form.append_pair("from", account.number.trim_start_matches('+'));
        form.append_pair("to", msg.to.value.trim_start_matches('+'));
        form.append_pair("text", &msg.text);
        form.append_pair("type", if is_gsm(&msg.text) { "text" } else { "unicode" });
        form.append_pair("client-ref", &msg.message_id.to_string());
        form.append_pair("status-report-req", "1");
        if let Some(u) = &account.public_url {
            form.append_pair("callback", &format!("{u}/status"));
        }
        form.finish()
    };
    let now = SystemTime::now();
    let resp = client
        .post(url)
        .timeout(account.timeout)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .map_err(|e| transport(&e, account.timeout))?;
    let status = resp.status().as_u16();
    let advised = retry_after(&resp, now);
    let text = resp
        .text()
        .await
        .map_err(|e| transport(&e, account.timeout))?;
    if status == 429 {
        return Err(SendError::Throttled {
            retry_after: advised,
            reason: format!(
                "vonage answered 429: {}",
                text.chars().take(200).collect::<String>()
            ),
        });
    }
    if status >= 500 || status == 408 {
        return Err(SendError::Provider {
            status,
            reason: text.chars().take(300).collect(),
        });
    }
    let body: serde_json::Value = serde_json::from_str(&text).map_err(|_| SendError::Provider {
        status,
        reason: format!(
            "vonage answered {status} without json: {}",
            text.chars().take(200).collect::<String>()
        ),
    })?;
    let parts = body["messages"].as_array().cloned().unwrap_or_default();
    if parts.is_empty() {
        return Err(SendError::Rejected {
            status,
            code: None,
            reason: format!("vonage answered {status} without messages"),
        });
    }
    let code_of = |p: &serde_json::Value| -> String {
        match &p["status"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => "?".into(),
        }
    };
    let failed: Vec<&serde_json::Value> = parts.iter().filter(|p| code_of(p) != "0").collect();
    if failed.is_empty() {
        let segments = body["message-count"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or(body["message-count"].as_u64().map(|n| n as u32))
            .unwrap_or(parts.len() as u32);
        return Ok(SendReceipt {
            provider_message_id: parts[0]["message-id"].as_str().map(str::to_owned),
            segments: Some(segments),
        });
    }
    let first = failed[0];
    let code = code_of(first);
    let (meaning, retry) = vonage_status(&code);
    let reason = format!(
        "vonage status {code} ({meaning}): {}",
        first["error-text"].as_str().unwrap_or("no error text")
    );
    if failed.len() < parts.len() {
        // Some parts went out: sending again would duplicate them.
        return Err(SendError::Rejected {
            status,
            code: Some(code),
            reason: format!(
                "{} of {} parts were refused, the others sent; {reason}",
                failed.len(),
                parts.len()
            ),
        });
    }
    match (code.as_str(), retry) {
        ("1", _) => Err(SendError::Throttled {
            // Vonage advises no delay: 1 s is its documented rate unit.
            retry_after: Some(advised.unwrap_or(Duration::from_secs(1))),
            reason,
        }),
        (_, true) => Err(SendError::Provider { status, reason }),
        (_, false) => Err(SendError::Rejected {
            status,
            code: Some(code),
            reason,
        }),
    }
}

#[async_trait]
impl Outbound for SmsOutbound {
    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn idempotent(&self) -> bool {
        // Neither API takes an idempotency key.
        false
    }

    fn provider(&self, account: &str) -> &'static str {
        match self.cfg.get().account(account).map(|a| &a.provider) {
            Some(crate::config::Provider::Twilio(_)) => "twilio",
            Some(crate::config::Provider::Vonage(_)) => "vonage",
            None => "sms",
        }
    }

    fn sender(&self, account: &str) -> Result<Identity, SendError> {
        let a = self.account(account)?;
        Identity::new(IdentityKind::Phone, &a.number)
            .map_err(|e| SendError::NotConfigured(e.to_string()))
    }

    fn default_account(&self) -> Option<String> {
        let cfg = self.cfg.get();
        cfg.default_account
            .as_ref()
            .and_then(|n| cfg.accounts.get(n))
            .map(|a| a.number.clone())
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        let account = self.account(&msg.account)?;
        if msg.to.kind != IdentityKind::Phone {
            return Err(SendError::Rejected {
                status: 400,
                code: None,
                reason: format!("the recipient {} is not a phone number", msg.to),
            });
        }
        match &account.provider {
            Provider::Twilio(t) => send_twilio(&self.client, &account, t, msg).await,
            Provider::Vonage(v) => send_vonage(&self.client, &account, v, msg).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm_text_is_sent_as_text_and_the_rest_as_unicode() {
        assert!(is_gsm("Hello, where is my parcel? 10€ [ok]"));
        assert!(is_gsm(""));
        assert!(!is_gsm("Zażółć gęślą jaźń"));
        assert!(!is_gsm("hi 😀"));
    }

    #[test]
    fn vonage_codes_say_whether_to_retry() {
        assert!(vonage_status("1").1);
        for permanent in ["2", "3", "4", "6", "7", "8", "9", "15", "29", "33"] {
            assert!(!vonage_status(permanent).1, "{permanent}");
        }
    }
}
