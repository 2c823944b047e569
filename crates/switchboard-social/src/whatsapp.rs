//! WhatsApp Cloud API webhooks: `entry[].changes[].value` with
//! `field: "messages"`, carrying `messages[]` (every type) or `statuses[]`.

use serde_json::Value;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::{
    Attachment, Channel, DeliveryError, DeliveryState, Direction, Envelope, Identity, IdentityKind,
    ThreadHints, Trace,
};

use crate::common::{
    Change, ChangeKind, Malformed, Parsed, Stamp, StatusReport, e164, from_secs, id_text, raw_json,
};

/// The media message types: their object carries a media `id`.
pub const MEDIA_TYPES: [&str; 5] = ["image", "video", "audio", "document", "sticker"];

/// Prefix of the attachment URL of a WhatsApp media id not downloaded yet:
/// `whatsapp-media:<id>`; the webhook resolves and replaces it.
pub const MEDIA_URL_PREFIX: &str = "whatsapp-media:";

fn phone_identity(raw: &str) -> Identity {
    match e164(raw).and_then(|n| Identity::new(IdentityKind::Whatsapp, &n).ok()) {
        Some(id) => id,
        None => Identity {
            kind: IdentityKind::External,
            value: format!("whatsapp:{}", raw.trim()),
        },
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Parses one `changes[]` item's `value` (`field` is given separately).
/// `next` counts envelopes across the whole request, for their ids.
pub fn parse_value(
    field: &str,
    value: &Value,
    path: &str,
    stamp: &Stamp,
    next: &mut usize,
    out: &mut Vec<Parsed>,
) -> Result<(), Malformed> {
    if field != "messages" {
        out.push(Parsed::ignored(format!(
            "whatsapp field {field:?} is not handled"
        )));
        return Ok(());
    }
    let meta = value
        .get("metadata")
        .ok_or_else(|| Malformed::new(format!("{path}.metadata"), "missing"))?;
    let phone_number_id = str_at(meta, "phone_number_id")
        .ok_or_else(|| Malformed::new(format!("{path}.metadata.phone_number_id"), "missing"))?;
    let account = str_at(meta, "display_phone_number")
        .and_then(e164)
        .unwrap_or_else(|| phone_number_id.to_owned());
    let us = Identity::new(IdentityKind::Whatsapp, &account).unwrap_or_else(|_| Identity {
        kind: IdentityKind::External,
        value: format!("whatsapp:{phone_number_id}"),
    });
    let mut handled = false;
    if let Some(messages) = value.get("messages").and_then(Value::as_array) {
        handled = true;
        for (i, m) in messages.iter().enumerate() {
            let p = format!("{path}.messages[{i}]");
            out.push(parse_message(m, &p, &account, &us, stamp, next)?);
        }
    }
    if let Some(statuses) = value.get("statuses").and_then(Value::as_array) {
        handled = true;
        for (i, s) in statuses.iter().enumerate() {
            let p = format!("{path}.statuses[{i}]");
            out.push(parse_status(s, &p, &account)?);
        }
    }
    if !handled {
        let errors = value
            .get("errors")
            .map(Value::to_string)
            .unwrap_or_else(|| "no messages or statuses".into());
        out.push(Parsed::ignored(format!(
            "whatsapp value without messages or statuses: {errors}"
        )));
    }
    Ok(())
}

fn parse_message(
    m: &Value,
    path: &str,
    account: &str,
    us: &Identity,
    stamp: &Stamp,
    next: &mut usize,
) -> Result<Parsed, Malformed> {
    let need = |k: &str| {
        str_at(m, k)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| Malformed::new(format!("{path}.{k}"), "missing"))
    };
    let from = need("from")?;
    let id = need("id")?;
    let kind = need("type")?;
    let at = id_text(m.get("timestamp").unwrap_or(&Value::Null))
        .and_then(|s| s.parse::<i64>().ok())
        .and_then(from_secs)
        .ok_or_else(|| {
            Malformed::new(format!("{path}.timestamp"), "missing or not unix seconds")
        })?;
    let customer = phone_identity(from);
    let key = format!("whatsapp:{account}:{id}");
    let body = m.get(kind).unwrap_or(&Value::Null);

    // Changes to earlier messages.
    let change =
        |kind: ChangeKind, target: Option<&str>, text: Option<String>, emoji: Option<String>| {
            target
                .filter(|t| !t.is_empty())
                .map(|target| Parsed::Change {
                    change: Change {
                        kind,
                        idempotency_key: key.clone(),
                        channel: Channel::Whatsapp,
                        account: account.to_owned(),
                        target: target.to_owned(),
                        by: customer.clone(),
                        at,
                        text,
                        emoji,
                    },
                })
                .ok_or_else(|| Malformed::new(format!("{path}.{kind:?}"), "names no message"))
        };
    match kind {
        "reaction" => {
            let emoji = str_at(body, "emoji").unwrap_or("").to_owned();
            return change(
                ChangeKind::Reaction,
                str_at(body, "message_id"),
                None,
                Some(emoji),
            );
        }
        "edit" => {
            let inner = body.get("message").unwrap_or(&Value::Null);
            let text = str_at(inner.get("text").unwrap_or(&Value::Null), "body")
                .or_else(|| {
                    let t = str_at(inner, "type")?;
                    str_at(inner.get(t)?, "caption")
                })
                .map(str::to_owned);
            let target = str_at(body, "original_message_id")
                .or_else(|| str_at(m.get("context").unwrap_or(&Value::Null), "id"));
            return change(ChangeKind::Edit, target, text, None);
        }
        "revoke" => {
            let target = str_at(body, "original_message_id")
                .or_else(|| str_at(m.get("context").unwrap_or(&Value::Null), "id"));
            return change(ChangeKind::Delete, target, None, None);
        }
        _ => {}
    }

    let mut attachments = Vec::new();
    let text = match kind {
        "text" => str_at(body, "body").unwrap_or("").to_owned(),
        t if MEDIA_TYPES.contains(&t) => {
            let media_id = str_at(body, "id")
                .ok_or_else(|| Malformed::new(format!("{path}.{t}.id"), "missing"))?;
            attachments.push(Attachment {
                name: str_at(body, "filename").map(str::to_owned),
                content_type: str_at(body, "mime_type")
                    .unwrap_or("application/octet-stream")
                    .to_owned(),
                size: 0,
                url: Some(format!("{MEDIA_URL_PREFIX}{media_id}")),
                storage_ref: None,
                sha256: str_at(body, "sha256").map(str::to_owned),
            });
            str_at(body, "caption").unwrap_or("").to_owned()
        }
        "location" => {
            let lat = body
                .get("latitude")
                .map(Value::to_string)
                .unwrap_or_default();
            let lon = body
                .get("longitude")
                .map(Value::to_string)
                .unwrap_or_default();
            let place: Vec<&str> = ["name", "address"]
                .iter()
                .filter_map(|k| str_at(body, k))
                .collect();
            if place.is_empty() {
                format!("location: {lat},{lon}")
            } else {
                format!("location: {} ({lat},{lon})", place.join(", "))
            }
        }
        "contacts" => {
            let mut lines = Vec::new();
            for c in body.as_array().into_iter().flatten() {
                let name = c
                    .get("name")
                    .and_then(|n| str_at(n, "formatted_name"))
                    .unwrap_or("?");
                let phones: Vec<&str> = c
                    .get("phones")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| str_at(p, "phone"))
                    .collect();
                lines.push(
                    format!("contact: {name} {}", phones.join(", "))
                        .trim_end()
                        .to_owned(),
                );
            }
            lines.join("\n")
        }
        "interactive" => {
            let itype = str_at(body, "type").unwrap_or("");
            let reply = body.get(itype).unwrap_or(&Value::Null);
            str_at(reply, "title").unwrap_or("").to_owned()
        }
        "button" => str_at(body, "text").unwrap_or("").to_owned(),
        "unsupported" | "unknown" => {
            return Ok(Parsed::ignored(format!(
                "whatsapp message {id} of an unsupported type"
            )));
        }
        "system" => {
            return Ok(Parsed::ignored(format!(
                "whatsapp system message {id}: {}",
                str_at(body, "body").unwrap_or("")
            )));
        }
        other => {
            // Kept rather than refused: the original is in provider_raw.
            str_at(body, "body")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("[{other} message]"))
        }
    };
    let context = m.get("context").unwrap_or(&Value::Null);
    let envelope = Envelope {
        schema: EnvelopeSchema::V1,
        id: stamp.id(*next),
        idempotency_key: key,
        channel: Channel::Whatsapp,
        provider: "meta".into(),
        account: account.to_owned(),
        direction: Direction::Inbound,
        from: customer,
        to: us.clone(),
        sent_at: Some(at),
        received_at: stamp.received_at,
        subject: None,
        text,
        attachments,
        thread_hints: ThreadHints {
            message_id: Some(id.to_owned()),
            in_reply_to: str_at(context, "id")
                .map(str::to_owned)
                .into_iter()
                .collect(),
            references: Vec::new(),
            provider_thread_id: str_at(m, "group_id").map(str::to_owned),
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
        envelope: Box::new(envelope),
    })
}

fn parse_status(s: &Value, path: &str, account: &str) -> Result<Parsed, Malformed> {
    let id = str_at(s, "id").ok_or_else(|| Malformed::new(format!("{path}.id"), "missing"))?;
    let raw_status =
        str_at(s, "status").ok_or_else(|| Malformed::new(format!("{path}.status"), "missing"))?;
    let at = id_text(s.get("timestamp").unwrap_or(&Value::Null))
        .and_then(|t| t.parse::<i64>().ok())
        .and_then(from_secs)
        .ok_or_else(|| {
            Malformed::new(format!("{path}.timestamp"), "missing or not unix seconds")
        })?;
    let status = match raw_status {
        "sent" => DeliveryState::Sent,
        "delivered" => DeliveryState::Delivered,
        "read" | "played" => DeliveryState::Read,
        "failed" => DeliveryState::Failed,
        other => {
            return Ok(Parsed::ignored(format!(
                "whatsapp status {other:?} of {id} is not a delivery state"
            )));
        }
    };
    let error = (status == DeliveryState::Failed).then(|| {
        let e = s
            .get("errors")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or(Value::Null);
        let code = id_text(e.get("code").unwrap_or(&Value::Null));
        let details = e
            .get("error_data")
            .and_then(|d| str_at(d, "details"))
            .or_else(|| str_at(&e, "message"))
            .or_else(|| str_at(&e, "title"))
            .unwrap_or("no reason given");
        let retryable = code.as_deref().is_some_and(is_throttle_code);
        DeliveryError {
            reason: format!(
                "whatsapp error {}: {details}",
                code.as_deref().unwrap_or("?")
            ),
            code,
            retryable,
        }
    });
    let message_id =
        str_at(s, "biz_opaque_callback_data").and_then(|d| uuid::Uuid::parse_str(d.trim()).ok());
    Ok(Parsed::Status {
        report: StatusReport {
            channel: Channel::Whatsapp,
            account: account.to_owned(),
            provider_message_id: Some(id.to_owned()),
            watermark: None,
            recipient: str_at(s, "recipient_id").and_then(e164).unwrap_or_default(),
            message_id,
            status,
            error,
            at,
        },
    })
}

/// Meta's throttling codes: app (4), page (32, 613), WABA (80007), cloud
/// API throughput (130429), spam rate (131048), pair rate (131056),
/// registration (133016).
pub fn is_throttle_code(code: &str) -> bool {
    matches!(
        code,
        "4" | "17" | "32" | "613" | "80007" | "130429" | "131048" | "131056" | "133016"
    )
}
