//! Telegram Bot API updates: one `Update` per webhook request (or per
//! getUpdates item), with `update_id` and one of `message`,
//! `edited_message`, `channel_post`, `edited_channel_post`,
//! `message_reaction`, `callback_query`, …
//!
//! The customer is the sending user (`telegram_user`); our side is the bot.
//! Messages in groups, supergroups and forum topics carry the chat (and
//! topic) as the provider thread id, so each group is a conversation of its
//! own; private chats thread by time windows. Message ids are unique per
//! chat only, so a message is named `CHAT:MESSAGE_ID`.

use serde_json::Value;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::{
    Attachment, Channel, Direction, Envelope, IdentityKind, ThreadHints, Trace,
};

use crate::common::{
    Change, ChangeKind, Malformed, Parsed, Stamp, from_secs, id_text, raw_json, scoped_identity,
};

/// The URL of a Telegram file on an envelope: `telegram-file:<file_id>`
/// (resolved with getFile and the bot token, which is never put in a URL
/// that leaves the daemon); kept after the download too.
pub const FILE_URL_PREFIX: &str = "telegram-file:";

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The thread id of a message's chat: `None` for a private chat, the chat id
/// for a group, `CHAT/TOPIC` for a forum topic.
fn thread_of(msg: &Value, chat_id: &str) -> Option<String> {
    let chat = msg.get("chat")?;
    if str_at(chat, "type") == Some("private") {
        return None;
    }
    let topic = (msg.get("is_topic_message").and_then(Value::as_bool) == Some(true))
        .then(|| msg.get("message_thread_id").and_then(id_text_ref))
        .flatten();
    Some(match topic {
        Some(t) => format!("{chat_id}/{t}"),
        None => chat_id.to_owned(),
    })
}

fn id_text_ref(v: &Value) -> Option<String> {
    id_text(v)
}

/// Parses one update for bot `bot_id`.
pub fn parse_update(
    bot_id: &str,
    update: &Value,
    stamp: &Stamp,
    next: &mut usize,
) -> Result<Parsed, Malformed> {
    let update_id = update
        .get("update_id")
        .and_then(Value::as_i64)
        .ok_or_else(|| Malformed::new("update_id", "missing"))?;
    let us = scoped_identity(IdentityKind::TelegramUser, bot_id, "telegram");
    if let Some(m) = update.get("message").or_else(|| update.get("channel_post")) {
        let field = if update.get("message").is_some() {
            "message"
        } else {
            "channel_post"
        };
        return parse_message(bot_id, m, field, &us, stamp, next);
    }
    if let Some(m) = update
        .get("edited_message")
        .or_else(|| update.get("edited_channel_post"))
    {
        let chat = chat_id(m, "edited_message")?;
        let mid = message_id(m, "edited_message")?;
        let by = sender(m, &chat);
        let at = m
            .get("edit_date")
            .or_else(|| m.get("date"))
            .and_then(Value::as_i64)
            .and_then(from_secs)
            .ok_or_else(|| Malformed::new("edited_message.edit_date", "missing"))?;
        return Ok(Parsed::Change {
            change: Change {
                kind: ChangeKind::Edit,
                idempotency_key: format!("telegram:{bot_id}:edit:{update_id}"),
                channel: Channel::Telegram,
                account: bot_id.to_owned(),
                target: format!("{chat}:{mid}"),
                by,
                at,
                text: str_at(m, "text")
                    .or_else(|| str_at(m, "caption"))
                    .map(str::to_owned),
                emoji: None,
            },
        });
    }
    if let Some(r) = update.get("message_reaction") {
        let chat = chat_id(r, "message_reaction")?;
        let mid = message_id(r, "message_reaction")?;
        let by = r
            .get("user")
            .and_then(|u| id_text(u.get("id")?))
            .map(|id| scoped_identity(IdentityKind::TelegramUser, &id, "telegram"))
            .unwrap_or_else(|| scoped_identity(IdentityKind::TelegramUser, &chat, "telegram"));
        let at = r
            .get("date")
            .and_then(Value::as_i64)
            .and_then(from_secs)
            .ok_or_else(|| Malformed::new("message_reaction.date", "missing"))?;
        let emoji = r
            .get("new_reaction")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|x| str_at(x, "emoji").or_else(|| str_at(x, "custom_emoji_id")))
            .collect::<Vec<_>>()
            .join("");
        return Ok(Parsed::Change {
            change: Change {
                kind: ChangeKind::Reaction,
                idempotency_key: format!("telegram:{bot_id}:reaction:{update_id}"),
                channel: Channel::Telegram,
                account: bot_id.to_owned(),
                target: format!("{chat}:{mid}"),
                by,
                at,
                text: None,
                emoji: Some(emoji),
            },
        });
    }
    if let Some(q) = update.get("callback_query") {
        let from = q
            .get("from")
            .and_then(|u| id_text(u.get("id")?))
            .ok_or_else(|| Malformed::new("callback_query.from.id", "missing"))?;
        let qid = str_at(q, "id").ok_or_else(|| Malformed::new("callback_query.id", "missing"))?;
        let msg = q.get("message").unwrap_or(&Value::Null);
        let chat = msg
            .get("chat")
            .and_then(|c| id_text(c.get("id")?))
            .unwrap_or_else(|| from.clone());
        let at = msg
            .get("date")
            .and_then(Value::as_i64)
            .and_then(from_secs)
            .unwrap_or(stamp.received_at);
        let env = Envelope {
            schema: EnvelopeSchema::V1,
            id: stamp.id(*next),
            idempotency_key: format!("telegram:{bot_id}:callback:{qid}"),
            channel: Channel::Telegram,
            provider: "telegram".into(),
            account: bot_id.to_owned(),
            direction: Direction::Inbound,
            from: scoped_identity(IdentityKind::TelegramUser, &from, "telegram"),
            to: us,
            sent_at: None,
            received_at: stamp.received_at,
            subject: None,
            text: str_at(q, "data").unwrap_or("").to_owned(),
            attachments: Vec::new(),
            thread_hints: ThreadHints {
                message_id: None,
                in_reply_to: msg
                    .get("message_id")
                    .and_then(id_text)
                    .map(|m| format!("{chat}:{m}"))
                    .into_iter()
                    .collect(),
                references: Vec::new(),
                provider_thread_id: thread_of(msg, &chat),
            },
            provider_raw: Some(raw_json(update)),
            trace: Trace {
                request_id: stamp.request_id.clone(),
                correlation_id: None,
            },
            automated: None,
            change: None,
        };
        let _ = at;
        *next += 1;
        return Ok(Parsed::Message {
            envelope: Box::new(env),
        });
    }
    let kind = update
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "update_id").cloned())
        .unwrap_or_else(|| "empty".into());
    Ok(Parsed::ignored(format!(
        "telegram update {update_id} of kind {kind:?} is not handled"
    )))
}

fn chat_id(m: &Value, field: &str) -> Result<String, Malformed> {
    m.get("chat")
        .and_then(|c| id_text(c.get("id")?))
        .ok_or_else(|| Malformed::new(format!("{field}.chat.id"), "missing"))
}

fn message_id(m: &Value, field: &str) -> Result<String, Malformed> {
    m.get("message_id")
        .and_then(id_text)
        .ok_or_else(|| Malformed::new(format!("{field}.message_id"), "missing"))
}

/// The sending user; a channel post (no `from`) is the chat itself.
fn sender(m: &Value, chat: &str) -> switchboard_core::Identity {
    let id = m
        .get("from")
        .and_then(|u| id_text(u.get("id")?))
        .or_else(|| m.get("sender_chat").and_then(|c| id_text(c.get("id")?)))
        .unwrap_or_else(|| chat.to_owned());
    scoped_identity(IdentityKind::TelegramUser, &id, "telegram")
}

fn parse_message(
    bot_id: &str,
    m: &Value,
    field: &str,
    us: &switchboard_core::Identity,
    stamp: &Stamp,
    next: &mut usize,
) -> Result<Parsed, Malformed> {
    let chat = chat_id(m, field)?;
    let mid = message_id(m, field)?;
    if let Some(to) = m.get("migrate_to_chat_id").and_then(Value::as_i64) {
        let from_chat = chat
            .parse::<i64>()
            .map_err(|_| Malformed::new(format!("{field}.chat.id"), "not an integer"))?;
        return Ok(Parsed::Migrated {
            account: bot_id.to_owned(),
            from_chat,
            to_chat: to,
        });
    }
    if m.get("migrate_from_chat_id").is_some() {
        return Ok(Parsed::ignored(format!(
            "telegram chat {chat} was migrated from a group"
        )));
    }
    let at = m
        .get("date")
        .and_then(Value::as_i64)
        .and_then(from_secs)
        .ok_or_else(|| Malformed::new(format!("{field}.date"), "missing"))?;
    let mut attachments = Vec::new();
    let mut file = |obj: &Value, default_type: &str| {
        if let Some(file_id) = str_at(obj, "file_id") {
            attachments.push(Attachment {
                name: str_at(obj, "file_name").map(str::to_owned),
                content_type: str_at(obj, "mime_type").unwrap_or(default_type).to_owned(),
                size: obj.get("file_size").and_then(Value::as_u64).unwrap_or(0),
                url: Some(format!("{FILE_URL_PREFIX}{file_id}")),
                storage_ref: None,
                sha256: None,
            });
        }
    };
    if let Some(sizes) = m.get("photo").and_then(Value::as_array)
        && let Some(largest) = sizes.last()
    {
        file(largest, "image/jpeg");
    }
    for (k, t) in [
        ("document", "application/octet-stream"),
        ("video", "video/mp4"),
        ("voice", "audio/ogg"),
        ("audio", "audio/mpeg"),
        ("sticker", "image/webp"),
        ("animation", "video/mp4"),
        ("video_note", "video/mp4"),
    ] {
        if let Some(obj) = m.get(k) {
            file(obj, t);
        }
    }
    let mut text = str_at(m, "text")
        .or_else(|| str_at(m, "caption"))
        .unwrap_or("")
        .to_owned();
    if let Some(loc) = m.get("location")
        && text.is_empty()
    {
        text = format!(
            "location: {},{}",
            loc.get("latitude")
                .map(Value::to_string)
                .unwrap_or_default(),
            loc.get("longitude")
                .map(Value::to_string)
                .unwrap_or_default()
        );
    }
    if let Some(c) = m.get("contact")
        && text.is_empty()
    {
        text = format!(
            "contact: {} {}",
            str_at(c, "first_name").unwrap_or(""),
            str_at(c, "phone_number").unwrap_or("")
        )
        .trim()
        .to_owned();
    }
    if text.is_empty() && attachments.is_empty() {
        return Ok(Parsed::ignored(format!(
            "telegram message {chat}:{mid} carries no text or file (a service message)"
        )));
    }
    let env = Envelope {
        schema: EnvelopeSchema::V1,
        id: stamp.id(*next),
        idempotency_key: format!("telegram:{bot_id}:{chat}:{mid}"),
        channel: Channel::Telegram,
        provider: "telegram".into(),
        account: bot_id.to_owned(),
        direction: Direction::Inbound,
        from: sender(m, &chat),
        to: us.clone(),
        sent_at: Some(at),
        received_at: stamp.received_at,
        subject: None,
        text,
        attachments,
        thread_hints: ThreadHints {
            message_id: Some(format!("{chat}:{mid}")),
            in_reply_to: m
                .get("reply_to_message")
                .and_then(|r| id_text(r.get("message_id")?))
                .map(|r| format!("{chat}:{r}"))
                .into_iter()
                .collect(),
            references: Vec::new(),
            provider_thread_id: thread_of(m, &chat),
        },
        provider_raw: Some(raw_json(m)),
        trace: Trace {
            request_id: stamp.request_id.clone(),
            correlation_id: None,
        },
        automated: None,
        change: None,
    };
    *next += 1;
    Ok(Parsed::Message {
        envelope: Box::new(env),
    })
}
