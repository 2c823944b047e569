//! Messenger and Instagram webhooks: `entry[].messaging[]` items, each with
//! exactly one of `message`, `delivery`, `read`, `postback`, `reaction`,
//! `message_edit`, `referral`, `optin`.

use serde_json::Value;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::{
    Attachment, Channel, DeliveryState, Direction, Envelope, Identity, IdentityKind, ThreadHints,
    Trace,
};

use crate::common::{
    Change, ChangeKind, Malformed, Parsed, Stamp, StatusReport, from_ms, id_text, raw_json,
    scoped_identity,
};

/// The prefix of the `metadata` Switchboard puts on what it sends, followed
/// by the request's idempotency key: an echo carrying it is our own send.
pub const METADATA_PREFIX: &str = "switchboard:";

fn kind_of(channel: Channel) -> IdentityKind {
    if channel == Channel::Instagram {
        IdentityKind::InstagramIgsid
    } else {
        IdentityKind::MessengerPsid
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Parses one `messaging[]` item of `channel` (Messenger or Instagram).
pub fn parse_item(
    channel: Channel,
    item: &Value,
    path: &str,
    stamp: &Stamp,
    next: &mut usize,
) -> Result<Parsed, Malformed> {
    let prefix = channel.as_str();
    let kind = kind_of(channel);
    let sender = item
        .get("sender")
        .and_then(|s| id_text(s.get("id")?))
        .ok_or_else(|| Malformed::new(format!("{path}.sender.id"), "missing"))?;
    let recipient = item
        .get("recipient")
        .and_then(|s| id_text(s.get("id")?))
        .ok_or_else(|| Malformed::new(format!("{path}.recipient.id"), "missing"))?;
    let at = item
        .get("timestamp")
        .and_then(Value::as_i64)
        .and_then(from_ms)
        .ok_or_else(|| Malformed::new(format!("{path}.timestamp"), "missing or not epoch ms"))?;
    let null = Value::Null;
    let message = item.get("message");
    let echo = message
        .and_then(|m| m.get("is_echo"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // Our page (account) is the recipient of a customer's item and the
    // sender of an echo.
    let (account, customer) = if echo {
        (sender, recipient)
    } else {
        (recipient, sender)
    };
    let customer_id = scoped_identity(kind, &customer, prefix);
    let us = scoped_identity(kind, &account, prefix);

    let change = |ckind: ChangeKind,
                  target: Option<String>,
                  text: Option<String>,
                  emoji: Option<String>,
                  key: String| {
        target
            .map(|target| Parsed::Change {
                change: Change {
                    kind: ckind,
                    idempotency_key: key,
                    channel,
                    account: account.clone(),
                    target,
                    by: customer_id.clone(),
                    at,
                    text,
                    emoji,
                },
            })
            .ok_or_else(|| Malformed::new(format!("{path}.mid"), "missing"))
    };

    if let Some(r) = item.get("reaction") {
        let target = str_at(r, "mid").map(str::to_owned);
        let unreact = str_at(r, "action") == Some("unreact");
        let emoji = if unreact {
            String::new()
        } else {
            str_at(r, "emoji")
                .or_else(|| str_at(r, "reaction"))
                .unwrap_or("")
                .to_owned()
        };
        let key = format!(
            "{prefix}:{account}:reaction:{}:{customer}:{}",
            target.as_deref().unwrap_or(""),
            at.timestamp_millis()
        );
        return change(ChangeKind::Reaction, target, None, Some(emoji), key);
    }
    if let Some(e) = item.get("message_edit") {
        let target = str_at(e, "mid").map(str::to_owned);
        let n = e.get("num_edit").map(Value::to_string).unwrap_or_default();
        let key = format!(
            "{prefix}:{account}:edit:{}:{n}",
            target.as_deref().unwrap_or("")
        );
        return change(
            ChangeKind::Edit,
            target,
            str_at(e, "text").map(str::to_owned),
            None,
            key,
        );
    }
    if let Some(d) = item.get("delivery") {
        let watermark = d.get("watermark").and_then(Value::as_i64).and_then(from_ms);
        let mids: Vec<String> = d
            .get("mids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect();
        if mids.len() > 1 {
            // One report per mid: the webhook handles the list.
            return Ok(Parsed::Status {
                report: StatusReport {
                    channel,
                    account: account.clone(),
                    provider_message_id: Some(mids.join(",")),
                    watermark,
                    recipient: customer.clone(),
                    message_id: None,
                    status: DeliveryState::Delivered,
                    error: None,
                    at,
                },
            });
        }
        return Ok(Parsed::Status {
            report: StatusReport {
                channel,
                account: account.clone(),
                provider_message_id: mids.into_iter().next(),
                watermark,
                recipient: customer.clone(),
                message_id: None,
                status: DeliveryState::Delivered,
                error: None,
                at,
            },
        });
    }
    if let Some(r) = item.get("read") {
        return Ok(Parsed::Status {
            report: StatusReport {
                channel,
                account: account.clone(),
                // Instagram names the message read; Messenger gives a
                // watermark.
                provider_message_id: str_at(r, "mid").map(str::to_owned),
                watermark: r.get("watermark").and_then(Value::as_i64).and_then(from_ms),
                recipient: customer.clone(),
                message_id: None,
                status: DeliveryState::Read,
                error: None,
                at,
            },
        });
    }
    if item.get("optin").is_some() {
        return Ok(Parsed::ignored(format!("{prefix} optin from {customer}")));
    }

    let mut text = String::new();
    let mut attachments = Vec::new();
    let mut hints = ThreadHints::default();
    let key;
    let mut direction = Direction::Inbound;
    if let Some(m) = message {
        let mid = str_at(m, "mid")
            .ok_or_else(|| Malformed::new(format!("{path}.message.mid"), "missing"))?;
        if m.get("is_deleted").and_then(Value::as_bool) == Some(true) {
            return change(
                ChangeKind::Delete,
                Some(mid.to_owned()),
                None,
                None,
                format!("{prefix}:{account}:delete:{mid}"),
            );
        }
        if echo {
            direction = Direction::Outbound;
        }
        key = match str_at(m, "metadata").and_then(|md| md.strip_prefix(METADATA_PREFIX)) {
            // Our own send: the dispatcher stored it under this key, so the
            // echo is a duplicate of it.
            Some(request_key) if echo => format!("outbound:{request_key}"),
            _ => format!("{prefix}:{account}:{mid}"),
        };
        text = str_at(m, "text").unwrap_or("").to_owned();
        for a in m
            .get("attachments")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let atype = str_at(a, "type").unwrap_or("file");
            let payload = a.get("payload").unwrap_or(&null);
            let url = str_at(payload, "url").map(str::to_owned);
            if url.is_none() && atype != "like_heart" {
                continue;
            }
            let content_type = match atype {
                "image" | "story_mention" => "image/*",
                "video" | "ig_reel" | "reel" => "video/*",
                "audio" => "audio/*",
                "like_heart" => "text/plain",
                _ => "application/octet-stream",
            };
            if atype == "like_heart" {
                if text.is_empty() {
                    text = "❤".into();
                }
                continue;
            }
            attachments.push(Attachment {
                name: str_at(payload, "title").map(str::to_owned),
                content_type: content_type.to_owned(),
                size: 0,
                url,
                storage_ref: None,
                sha256: None,
            });
            if atype == "story_mention" && text.is_empty() {
                text = "[story mention]".into();
            }
        }
        if let Some(q) = m.get("quick_reply")
            && text.is_empty()
        {
            text = str_at(q, "payload").unwrap_or("").to_owned();
        }
        hints.message_id = Some(mid.to_owned());
        if let Some(r) = m.get("reply_to").and_then(|r| str_at(r, "mid")) {
            hints.in_reply_to.push(r.to_owned());
        }
    } else if let Some(p) = item.get("postback") {
        text = str_at(p, "title")
            .or_else(|| str_at(p, "payload"))
            .unwrap_or("")
            .to_owned();
        key = match str_at(p, "mid") {
            Some(mid) => {
                hints.message_id = Some(mid.to_owned());
                format!("{prefix}:{account}:{mid}")
            }
            None => format!(
                "{prefix}:{account}:postback:{customer}:{}",
                at.timestamp_millis()
            ),
        };
    } else if let Some(r) = item.get("referral") {
        // The customer arrived through a link or an ad: kept as an empty
        // message (the referral is in provider_raw) so the conversation
        // shows where it began.
        key = format!(
            "{prefix}:{account}:referral:{customer}:{}",
            at.timestamp_millis()
        );
        let _ = r;
    } else {
        return Ok(Parsed::ignored(format!(
            "{prefix} messaging item of an unknown kind"
        )));
    }
    let (from, to): (Identity, Identity) = if direction == Direction::Outbound {
        (us, customer_id)
    } else {
        (customer_id, us)
    };
    let envelope = Envelope {
        schema: EnvelopeSchema::V1,
        id: stamp.id(*next),
        idempotency_key: key,
        channel,
        provider: "meta".into(),
        account,
        direction,
        from,
        to,
        sent_at: Some(at),
        received_at: stamp.received_at,
        subject: None,
        text,
        attachments,
        thread_hints: hints,
        provider_raw: Some(raw_json(item)),
        trace: Trace {
            request_id: stamp.request_id.clone(),
            correlation_id: None,
        },
        automated: None,
        change: None,
    };
    *next += 1;
    Ok(Parsed::Message {
        envelope: Box::new(envelope),
    })
}
