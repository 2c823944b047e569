//! Sending: the WhatsApp Cloud API messages endpoint, the Messenger Send
//! API, Instagram messaging and Telegram sendMessage; one HTTP request per
//! [`Outbound::send`], the answer classified into [`SendError`] variants
//! (retries belong to the dispatcher).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use switchboard_core::{
    Channel, Identity, IdentityKind, Live, Outbound, OutboundMessage, SendError, SendReceipt,
};

use crate::config::SocialConfig;
use crate::messenger::METADATA_PREFIX;
use crate::state::State;
use crate::whatsapp::is_throttle_code;

/// The sending side of one channel (WhatsApp, Messenger, Instagram or
/// Telegram) over every account of it.
pub struct SocialOutbound {
    channel: Channel,
    live: Arc<Live<SocialConfig>>,
    client: reqwest::Client,
    state: Arc<State>,
}

impl SocialOutbound {
    /// The sending side of `channel`.
    pub fn new(
        channel: Channel,
        live: Arc<Live<SocialConfig>>,
        client: reqwest::Client,
        state: Arc<State>,
    ) -> Self {
        SocialOutbound {
            channel,
            live,
            client,
            state,
        }
    }
}

fn transport(e: &reqwest::Error, timeout: Duration) -> SendError {
    if e.is_timeout() {
        SendError::Timeout(timeout)
    } else {
        let mut s = e.to_string();
        if let Some(url) = e.url() {
            s = s.replace(url.as_str(), "<url>");
        }
        SendError::Connect(s)
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Classifies a Graph API error answer: throttling codes retry, 131047 (and
/// Messenger's 10/2018278) say the 24-hour window is closed, 5xx and
/// `is_transient` retry, the rest is refused with Meta's reason.
pub fn classify_graph_error(status: u16, body: &Value, advised: Option<Duration>) -> SendError {
    let e = &body["error"];
    let code = match &e["code"] {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    };
    let subcode = e["error_subcode"].as_i64();
    let message = e["message"].as_str().unwrap_or("no message");
    let details = e["error_data"]["details"].as_str();
    let mut reason = format!(
        "meta error {}{}: {message}",
        code.as_deref().unwrap_or("?"),
        subcode.map(|s| format!("/{s}")).unwrap_or_default()
    );
    if let Some(d) = details {
        reason.push_str(&format!(" ({d})"));
    }
    let code_s = code.as_deref().unwrap_or("");
    if status == 429 || is_throttle_code(code_s) {
        return SendError::Throttled {
            retry_after: advised,
            reason,
        };
    }
    if code_s == "131047" || (code_s == "10" && subcode == Some(2_018_278)) {
        return SendError::Rejected {
            status,
            code,
            reason: format!(
                "outside the 24 h customer-service window: a template is required; {reason}"
            ),
        };
    }
    if status >= 500
        || e["is_transient"].as_bool() == Some(true)
        || matches!(code_s, "1" | "2" | "131000" | "131016")
    {
        return SendError::Provider { status, reason };
    }
    SendError::Rejected {
        status,
        code,
        reason,
    }
}

impl SocialOutbound {
    async fn post_graph(&self, url: String, token: &str, body: &Value) -> Result<Value, SendError> {
        let cfg = self.live.get();
        let timeout = cfg.meta.timeout;
        let resp = self
            .client
            .post(url)
            .bearer_auth(token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| transport(&e, timeout))?;
        let status = resp.status().as_u16();
        let advised = retry_after(resp.headers());
        let text = resp.text().await.map_err(|e| transport(&e, timeout))?;
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(parsed);
        }
        if parsed.get("error").is_some() {
            return Err(classify_graph_error(status, &parsed, advised));
        }
        let snippet: String = text.chars().take(300).collect();
        if status == 429 {
            return Err(SendError::Throttled {
                retry_after: advised,
                reason: format!("meta answered 429: {snippet}"),
            });
        }
        if status >= 500 {
            return Err(SendError::Provider {
                status,
                reason: snippet,
            });
        }
        Err(SendError::Rejected {
            status,
            code: None,
            reason: format!("meta answered {status}: {snippet}"),
        })
    }

    async fn send_whatsapp(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        let cfg = self.live.get();
        let a = cfg.whatsapp_account(&msg.account).ok_or_else(|| {
            SendError::NotConfigured(format!(
                "whatsapp account {:?} is not configured",
                msg.account
            ))
        })?;
        if !msg.to.kind.is_phone_number() {
            return Err(SendError::Rejected {
                status: 400,
                code: None,
                reason: format!("the recipient {} is not a phone number", msg.to),
            });
        }
        let to = msg.to.value.trim_start_matches('+');
        let mut body = json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            // Comes back on every status of this message.
            "biz_opaque_callback_data": msg.message_id.to_string(),
        });
        if let Some(t) = &msg.template {
            let params: Vec<Value> = t
                .params
                .iter()
                .map(|p| json!({"type": "text", "text": p}))
                .collect();
            let mut template = json!({
                "name": t.name,
                "language": {"code": t.language.clone().unwrap_or_else(|| "en_US".into())},
            });
            if !params.is_empty() {
                template["components"] = json!([{"type": "body", "parameters": params}]);
            }
            body["type"] = json!("template");
            body["template"] = template;
        } else if let Some(att) = msg.attachments.iter().find(|a| a.url.is_some()) {
            if msg.attachments.len() > 1 {
                return Err(SendError::Rejected {
                    status: 400,
                    code: None,
                    reason: "whatsapp carries one attachment per message".into(),
                });
            }
            let kind = match att.content_type.split('/').next().unwrap_or("") {
                "image" => "image",
                "video" => "video",
                "audio" => "audio",
                _ => "document",
            };
            let mut media = json!({"link": att.url});
            if !msg.text.is_empty() && kind != "audio" {
                media["caption"] = json!(msg.text);
            }
            if kind == "document"
                && let Some(n) = &att.name
            {
                media["filename"] = json!(n);
            }
            body["type"] = json!(kind);
            body[kind] = media;
        } else {
            body["type"] = json!("text");
            body["text"] = json!({"body": msg.text, "preview_url": false});
        }
        let url = format!(
            "{}/{}/{}/messages",
            cfg.meta.graph_api_base, cfg.meta.graph_api_version, a.phone_number_id
        );
        let answer = self.post_graph(url, a.access_token.expose(), &body).await?;
        let id = answer["messages"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| SendError::Provider {
                status: 200,
                reason: "whatsapp answered without a message id".into(),
            })?;
        Ok(SendReceipt {
            provider_message_id: Some(id),
            segments: None,
        })
    }

    async fn send_page(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        let cfg = self.live.get();
        let (url, token, instagram) = match self.channel {
            Channel::Messenger => {
                let a = cfg.messenger_account(&msg.account).ok_or_else(|| {
                    SendError::NotConfigured(format!(
                        "messenger page {:?} is not configured",
                        msg.account
                    ))
                })?;
                (
                    format!(
                        "{}/{}/me/messages",
                        cfg.meta.graph_api_base, cfg.meta.graph_api_version
                    ),
                    a.access_token.expose().to_owned(),
                    false,
                )
            }
            _ => {
                let a = cfg.instagram_account(&msg.account).ok_or_else(|| {
                    SendError::NotConfigured(format!(
                        "instagram account {:?} is not configured",
                        msg.account
                    ))
                })?;
                (
                    format!(
                        "{}/{}/{}/messages",
                        a.api_base, cfg.meta.graph_api_version, a.account_id
                    ),
                    a.access_token.expose().to_owned(),
                    true,
                )
            }
        };
        let urls: Vec<&switchboard_core::Attachment> =
            msg.attachments.iter().filter(|a| a.url.is_some()).collect();
        if urls.len() > 1 || (!urls.is_empty() && !msg.text.is_empty()) {
            return Err(SendError::Rejected {
                status: 400,
                code: None,
                reason: format!("{} sends text or one attachment per message", self.channel),
            });
        }
        let mut message = match urls.first() {
            Some(att) => {
                let kind = match att.content_type.split('/').next().unwrap_or("") {
                    "image" => "image",
                    "video" => "video",
                    "audio" => "audio",
                    _ => "file",
                };
                json!({"attachment": {"type": kind, "payload": {"url": att.url, "is_reusable": true}}})
            }
            None => json!({"text": msg.text}),
        };
        if !instagram {
            // Comes back on the echo: the echo is then known as this send.
            let md = format!("{METADATA_PREFIX}{}", msg.idempotency_key);
            if md.len() <= 1000 {
                message["metadata"] = json!(md);
            }
        }
        let mut body = json!({
            "recipient": {"id": msg.to.value},
            "message": message,
        });
        match &msg.template {
            // Outside the window Messenger takes a message tag, not a
            // template: the template's name is the tag (HUMAN_AGENT, …).
            Some(t) => {
                body["messaging_type"] = json!("MESSAGE_TAG");
                body["tag"] = json!(t.name);
            }
            None => body["messaging_type"] = json!("RESPONSE"),
        }
        let answer = self.post_graph(url, &token, &body).await?;
        let id = answer["message_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| SendError::Provider {
                status: 200,
                reason: format!("{} answered without a message id", self.channel),
            })?;
        Ok(SendReceipt {
            provider_message_id: Some(id),
            segments: None,
        })
    }

    async fn send_telegram(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        let cfg = self.live.get();
        let a = cfg.telegram_account(&msg.account).ok_or_else(|| {
            SendError::NotConfigured(format!("telegram bot {:?} is not configured", msg.account))
        })?;
        // A conversation held in a group (or a forum topic of one) is
        // answered there, in the supergroup if the group became one;
        // otherwise the private chat with the user.
        let (chat, topic) = match msg.thread.provider_thread_id.as_deref() {
            Some(thread) => {
                let (chat, topic) = match thread.split_once('/') {
                    Some((c, t)) => (c.to_owned(), t.parse::<i64>().ok()),
                    None => (thread.to_owned(), None),
                };
                let chat = match chat.parse::<i64>() {
                    Ok(id) => match self.state.migrated_to(&a.bot_id, id) {
                        Ok(Some(to)) => to.to_string(),
                        _ => chat,
                    },
                    Err(_) => chat,
                };
                (chat, topic)
            }
            None => (msg.to.value.clone(), None),
        };
        let private = msg.thread.provider_thread_id.is_none();
        match self.state.unreachable("telegram", &a.bot_id, &chat) {
            Ok(Some(why)) if private => {
                return Err(SendError::Rejected {
                    status: 403,
                    code: Some("403".into()),
                    reason: format!("telegram user {chat} is unreachable: {why}"),
                });
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read the unreachable list; sending anyway")
            }
        }
        let (method, body) = telegram_message(msg, true)?;
        let post = |method: &'static str, mut body: Value| {
            body["chat_id"] = json!(chat);
            if let Some(t) = topic {
                body["message_thread_id"] = json!(t);
            }
            let url = format!("{}/bot{}/{method}", a.api_base, a.bot_token.expose());
            self.client.post(url).timeout(a.timeout).json(&body).send()
        };
        let read = |resp: reqwest::Response| async move {
            let status = resp.status().as_u16();
            let advised = retry_after(resp.headers());
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (status, advised, body)
        };
        let resp = post(method, body)
            .await
            .map_err(|e| transport(&e, a.timeout))?;
        let (mut status, mut advised, mut body) = read(resp).await;
        let refused = body["error_code"].as_i64().unwrap_or(i64::from(status)) == 400;
        if method != "sendMessage" && refused {
            // Telegram could not take the URL as that media (a format or a
            // size it refuses): the link goes as text instead.
            tracing::info!(
                bot = %a.bot_id, method, answer = %body["description"],
                "telegram refused the attachment as media; sending it as a link"
            );
            let (method, text) = telegram_message(msg, false)?;
            let resp = post(method, text)
                .await
                .map_err(|e| transport(&e, a.timeout))?;
            (status, advised, body) = read(resp).await;
        }
        if body["ok"].as_bool() == Some(true) {
            let id = body["result"]["message_id"]
                .as_i64()
                .map(|m| format!("{chat}:{m}"));
            return Ok(SendReceipt {
                provider_message_id: id,
                segments: None,
            });
        }
        let code = body["error_code"].as_i64().unwrap_or(i64::from(status));
        let description = body["description"].as_str().unwrap_or("no description");
        let reason = format!("telegram error {code}: {description}");
        let params = &body["parameters"];
        if code == 429 || status == 429 {
            let after = params["retry_after"]
                .as_u64()
                .map(Duration::from_secs)
                .or(advised);
            return Err(SendError::Throttled {
                retry_after: after,
                reason,
            });
        }
        if let Some(new_chat) = params["migrate_to_chat_id"].as_i64() {
            return Err(SendError::Rejected {
                status,
                code: Some(code.to_string()),
                reason: format!("{reason}; the group is now supergroup {new_chat}"),
            });
        }
        if code == 403 && private {
            let why = description.trim_start_matches("Forbidden: ").to_owned();
            if let Err(error) = self.state.mark_unreachable(
                "telegram",
                &a.bot_id,
                &chat,
                &why,
                chrono::Utc::now().timestamp_millis(),
            ) {
                tracing::warn!(%error, "cannot record an unreachable telegram user");
            }
            tracing::info!(bot = %a.bot_id, chat = %chat, reason = %why, "telegram user marked unreachable");
            return Err(SendError::Rejected {
                status,
                code: Some("403".into()),
                reason: format!("{reason}; the user is marked unreachable until they write again"),
            });
        }
        if status >= 500 || code >= 500 {
            return Err(SendError::Provider { status, reason });
        }
        Err(SendError::Rejected {
            status,
            code: Some(code.to_string()),
            reason,
        })
    }
}

#[async_trait]
impl Outbound for SocialOutbound {
    fn channel(&self) -> Channel {
        self.channel
    }

    fn idempotent(&self) -> bool {
        // None of these APIs takes an idempotency key.
        false
    }

    fn provider(&self, _account: &str) -> &'static str {
        match self.channel {
            Channel::Telegram => "telegram",
            _ => "meta",
        }
    }

    fn sender(&self, account: &str) -> Result<Identity, SendError> {
        let cfg = self.live.get();
        let missing = || {
            SendError::NotConfigured(format!(
                "{} account {account:?} is not configured",
                self.channel
            ))
        };
        let (kind, value) = match self.channel {
            Channel::Whatsapp => (
                IdentityKind::Whatsapp,
                cfg.whatsapp_account(account)
                    .ok_or_else(missing)?
                    .number
                    .clone(),
            ),
            Channel::Messenger => (
                IdentityKind::MessengerPsid,
                cfg.messenger_account(account)
                    .ok_or_else(missing)?
                    .page_id
                    .clone(),
            ),
            Channel::Instagram => (
                IdentityKind::InstagramIgsid,
                cfg.instagram_account(account)
                    .ok_or_else(missing)?
                    .account_id
                    .clone(),
            ),
            _ => (
                IdentityKind::TelegramUser,
                cfg.telegram_account(account)
                    .ok_or_else(missing)?
                    .bot_id
                    .clone(),
            ),
        };
        Identity::new(kind, &value).map_err(|e| SendError::NotConfigured(e.to_string()))
    }

    fn default_account(&self) -> Option<String> {
        let cfg = self.live.get();
        // The only account of the channel, when there is exactly one.
        match self.channel {
            Channel::Whatsapp => only(cfg.whatsapp.values().map(|a| a.number.clone())),
            Channel::Messenger => only(cfg.messenger.values().map(|a| a.page_id.clone())),
            Channel::Instagram => only(cfg.instagram.values().map(|a| a.account_id.clone())),
            _ => only(cfg.telegram.values().map(|a| a.bot_id.clone())),
        }
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        match self.channel {
            Channel::Whatsapp => self.send_whatsapp(msg).await,
            Channel::Messenger | Channel::Instagram => self.send_page(msg).await,
            _ => self.send_telegram(msg).await,
        }
    }
}

/// Telegram's longest caption.
const TELEGRAM_CAPTION: usize = 1024;

/// The Bot API method and body (without the chat) of a message: one
/// attachment with a URL goes as a photo, video, audio or document that
/// Telegram fetches, the text as its caption; anything else (several
/// attachments, a text too long for a caption) as text with the links.
/// `as_media` false: always text with the links.
fn telegram_message(
    msg: &OutboundMessage,
    as_media: bool,
) -> Result<(&'static str, Value), SendError> {
    let urls: Vec<_> = msg.attachments.iter().filter(|a| a.url.is_some()).collect();
    if let [att] = urls.as_slice()
        && as_media
        // Telegram counts a caption's length in UTF-16 code units.
        && msg.text.encode_utf16().count() <= TELEGRAM_CAPTION
        && let Some(url) = &att.url
    {
        let (method, field) = match att.content_type.split('/').next().unwrap_or("") {
            "image" => ("sendPhoto", "photo"),
            "video" => ("sendVideo", "video"),
            "audio" => ("sendAudio", "audio"),
            _ => ("sendDocument", "document"),
        };
        let mut body = json!({ field: url });
        if !msg.text.is_empty() {
            body["caption"] = json!(msg.text);
        }
        return Ok((method, body));
    }
    let mut text = msg.text.clone();
    for u in urls.iter().filter_map(|a| a.url.as_deref()) {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(u);
    }
    if text.is_empty() {
        return Err(SendError::Rejected {
            status: 400,
            code: None,
            reason: "telegram sends text or attachments with a URL; the request has neither (templates are a WhatsApp and Messenger notion)".into(),
        });
    }
    Ok(("sendMessage", json!({ "text": text })))
}

fn only(mut it: impl Iterator<Item = String>) -> Option<String> {
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_errors_are_classified() {
        let e = |code: i64, status: u16| {
            classify_graph_error(
                status,
                &json!({"error": {"message": "m", "type": "OAuthException", "code": code, "fbtrace_id": "x"}}),
                None,
            )
        };
        for throttle in [4, 613, 80007, 130429, 131048, 131056] {
            assert!(
                matches!(e(throttle, 400), SendError::Throttled { .. }),
                "{throttle}"
            );
        }
        let SendError::Rejected { reason, code, .. } = e(131047, 400) else {
            panic!("131047 is permanent");
        };
        assert!(reason.contains("24 h customer-service window"), "{reason}");
        assert_eq!(code.as_deref(), Some("131047"));
        assert!(matches!(e(100, 400), SendError::Rejected { .. }));
        assert!(matches!(e(190, 401), SendError::Rejected { .. }));
        assert!(matches!(e(1, 500), SendError::Provider { .. }));
        assert!(matches!(e(131000, 500), SendError::Provider { .. }));
    }
}
