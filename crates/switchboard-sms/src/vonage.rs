//! The Vonage SMS API: the `sig` parameter, inbound messages (concat parts
//! included) and delivery receipts.

use chrono::{NaiveDateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use switchboard_core::{
    Channel, DeliveryError, DeliveryState, Direction, Envelope, ProviderRaw, ThreadHints, Trace,
};
use uuid::Uuid;

use crate::common::{Malformed, Params, Stamp, constant_time_eq, get, raw_text, require};
use crate::config::{AccountConfig, VonageSigMethod};
use crate::phone;

/// The string Vonage signs: `&key=value` for every parameter but `sig`,
/// keys sorted, `&` and `=` inside values replaced by `_`.
pub fn signing_string(params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().filter(|(k, _)| k != "sig").collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut s = String::new();
    for (k, v) in sorted {
        s.push('&');
        s.push_str(k);
        s.push('=');
        s.push_str(&v.replace(['&', '='], "_"));
    }
    s
}

fn hmac_hex<M: Mac + hmac::digest::KeyInit>(secret: &str, data: &str) -> String {
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(secret.as_bytes())
        .expect("hmac takes keys of any length");
    mac.update(data.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The signature of `params` (lowercase hex).
pub fn sign(method: VonageSigMethod, secret: &str, params: &[(String, String)]) -> String {
    let s = signing_string(params);
    match method {
        VonageSigMethod::Md5Hash => hex::encode(Md5::digest(format!("{s}{secret}").as_bytes())),
        VonageSigMethod::Md5 => hmac_hex::<Hmac<Md5>>(secret, &s),
        VonageSigMethod::Sha1 => hmac_hex::<Hmac<Sha1>>(secret, &s),
        VonageSigMethod::Sha256 => hmac_hex::<Hmac<Sha256>>(secret, &s),
        VonageSigMethod::Sha512 => hmac_hex::<Hmac<Sha512>>(secret, &s),
    }
}

/// Whether the request's `sig` signs the other parameters (hex compared
/// case-insensitively). No `sig` is no signature.
pub fn verify(method: VonageSigMethod, secret: &str, params: &[(String, String)]) -> bool {
    let Some(given) = get(params, "sig") else {
        return false;
    };
    constant_time_eq(
        sign(method, secret, params).as_bytes(),
        given.trim().to_ascii_lowercase().as_bytes(),
    )
}

/// One part of a concatenated SMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcatPart {
    /// The set it belongs to: sender, recipient, `concat-ref`, total.
    pub set_key: String,
    /// `concat-part`, from 1.
    pub part: u32,
    /// `concat-total`.
    pub total: u32,
    /// This part's `messageId`.
    pub message_id: String,
}

/// What a Vonage webhook reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A whole inbound message.
    Message(Box<Envelope>),
    /// One part of a concatenated message, to hold until the set is
    /// complete.
    Part(ConcatPart),
    /// A delivery receipt for one of our messages.
    Status(Box<switchboard_core::Command>),
    /// A receipt that is no news (accepted, buffered) or not for a message
    /// of ours.
    Ignored(String),
}

fn sent_at(params: &[(String, String)]) -> Result<Option<chrono::DateTime<Utc>>, Malformed> {
    match get(params, "message-timestamp").map(str::trim) {
        None | Some("") => Ok(None),
        Some(ts) => NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S")
            .map(|t| Some(Utc.from_utc_datetime(&t)))
            .map_err(|_| {
                Malformed::new(
                    "message-timestamp",
                    format!("{ts:?} is not YYYY-MM-DD HH:MM:SS"),
                )
            }),
    }
}

fn is_receipt(params: &[(String, String)]) -> bool {
    get(params, "err-code").is_some() || get(params, "scts").is_some()
}

/// Reads a webhook: an inbound message, a concat part, or a receipt.
pub fn parse(
    params: &[(String, String)],
    account: &AccountConfig,
    stamp: &Stamp,
    content_type: &str,
    raw: &[u8],
) -> Result<Event, Malformed> {
    if is_receipt(params) {
        return parse_receipt(params, stamp);
    }
    let message_id = require(params, "messageId")?;
    let msisdn = require(params, "msisdn")?;
    let to = require(params, "to")?;
    if get(params, "concat").map(str::trim) == Some("true") {
        let num = |name: &str| -> Result<u32, Malformed> {
            let v = require(params, name)?;
            v.parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| Malformed::new(name, format!("{v:?} is not a positive number")))
        };
        let total = num("concat-total")?;
        let part = num("concat-part")?;
        let reference = require(params, "concat-ref")?;
        if part > total {
            return Err(Malformed::new(
                "concat-part",
                format!("part {part} of {total}"),
            ));
        }
        return Ok(Event::Part(ConcatPart {
            set_key: format!("{msisdn}|{to}|{reference}|{total}"),
            part,
            total,
            message_id: message_id.to_owned(),
        }));
    }
    let _ = (msisdn, to);
    Ok(Event::Message(Box::new(envelope(
        params,
        account,
        stamp,
        get(params, "text").unwrap_or_default().to_owned(),
        raw_text(content_type, raw),
    )?)))
}

fn envelope(
    params: &[(String, String)],
    account: &AccountConfig,
    stamp: &Stamp,
    text: String,
    raw: ProviderRaw,
) -> Result<Envelope, Malformed> {
    let message_id = require(params, "messageId")?;
    let from = phone::identity(require(params, "msisdn")?, account.region, true);
    let to = phone::identity(require(params, "to")?, account.region, true);
    Ok(Envelope {
        schema: Default::default(),
        id: stamp.id,
        idempotency_key: format!("sms:{}:{message_id}", account.number),
        channel: Channel::Sms,
        provider: "vonage".into(),
        account: account.number.clone(),
        direction: Direction::Inbound,
        from,
        to,
        sent_at: sent_at(params)?,
        received_at: stamp.received_at,
        subject: None,
        text,
        attachments: Vec::new(),
        thread_hints: ThreadHints {
            message_id: Some(message_id.to_owned()),
            ..ThreadHints::default()
        },
        provider_raw: Some(raw),
        trace: Trace {
            request_id: stamp.request_id.clone(),
            correlation_id: None,
        },
        automated: None,
        change: None,
    })
}

/// Builds the message of a concat set from the parts held, in part order:
/// `(part number, parameters)`. A missing part shows in the text as
/// `[part N of M missing]`, and the original (`application/json`) says
/// `"complete": false`. Keyed by the lowest part's `messageId`.
pub fn assemble(
    parts: &[(u32, Params)],
    total: u32,
    account: &AccountConfig,
    stamp: &Stamp,
) -> Result<Envelope, Malformed> {
    let mut sorted: Vec<&(u32, Params)> = parts.iter().collect();
    sorted.sort_by_key(|(n, _)| *n);
    sorted.dedup_by_key(|(n, _)| *n);
    let Some((_, first)) = sorted.first() else {
        return Err(Malformed::new("concat-part", "no part held"));
    };
    let mut text = String::new();
    let mut received = Vec::new();
    for n in 1..=total {
        match sorted.iter().find(|(m, _)| *m == n) {
            Some((_, p)) => {
                text.push_str(get(p, "text").unwrap_or_default());
                received.push(n);
            }
            None => text.push_str(&format!("[part {n} of {total} missing]")),
        }
    }
    let complete = received.len() == total as usize;
    let raw = serde_json::json!({
        "concat_ref": get(first, "concat-ref"),
        "total": total,
        "received": received,
        "complete": complete,
        "parts": sorted
            .iter()
            .map(|(n, p)| serde_json::json!({
                "part": n,
                "params": p.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect::<serde_json::Map<_, _>>(),
            }))
            .collect::<Vec<_>>(),
    });
    envelope(
        first,
        account,
        stamp,
        text,
        ProviderRaw {
            content_type: "application/json".into(),
            body: Some(raw.to_string()),
            encoding: Some("utf8".into()),
            storage_ref: None,
            parse_error: (!complete).then(|| {
                format!(
                    "incomplete concatenated message: {} of {total} parts arrived",
                    received.len()
                )
            }),
        },
    )
}

/// What a DLR `err-code` means (Vonage SMS API delivery receipt codes).
pub fn dlr_reason(code: &str) -> &'static str {
    match code {
        "0" => "delivered",
        "1" => "unknown",
        "2" => "absent subscriber (temporary)",
        "3" => "absent subscriber (permanent)",
        "4" => "call barred by user",
        "5" => "portability error",
        "6" => "anti-spam rejection",
        "7" => "handset busy",
        "8" => "network error",
        "9" => "illegal number",
        "10" => "illegal message",
        "11" => "unroutable",
        "12" => "destination unreachable",
        "13" => "subscriber age restriction",
        "14" => "number blocked by carrier",
        "15" => "prepaid insufficient funds",
        "16" => "gateway quota exceeded",
        "50" => "entity filter",
        "51" => "header filter",
        "52" => "content filter",
        "53" => "consent filter",
        "54" => "regulation error",
        _ => "general error",
    }
}

fn parse_receipt(params: &[(String, String)], stamp: &Stamp) -> Result<Event, Malformed> {
    let provider_id = require(params, "messageId")?;
    let status = require(params, "status")?;
    let state = match status {
        "delivered" => DeliveryState::Delivered,
        "expired" | "failed" | "rejected" => DeliveryState::Failed,
        "accepted" | "buffered" | "unknown" => {
            return Ok(Event::Ignored(format!("receipt {status}")));
        }
        other => {
            return Err(Malformed::new(
                "status",
                format!("{other:?} is not a Vonage receipt status"),
            ));
        }
    };
    let message_id = match get(params, "client-ref").map(str::trim) {
        None | Some("") => {
            return Ok(Event::Ignored(format!(
                "receipt {status} of {provider_id} without client-ref: not a message Switchboard sent"
            )));
        }
        Some(r) => match Uuid::parse_str(r) {
            Ok(id) => id,
            Err(_) => {
                return Ok(Event::Ignored(format!(
                    "receipt {status} of {provider_id}: client-ref {r:?} is not a Switchboard message id"
                )));
            }
        },
    };
    let error = (state == DeliveryState::Failed).then(|| {
        let code = get(params, "err-code")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        DeliveryError {
            reason: format!(
                "{status}: {} (vonage err-code {})",
                code.as_deref().map_or("no error code given", dlr_reason),
                code.as_deref().unwrap_or("-")
            ),
            // Absent subscriber (temporary) and handset busy clear up.
            retryable: matches!(code.as_deref(), Some("2" | "7" | "8")),
            code,
        }
    });
    Ok(Event::Status(Box::new(crate::common::status_command(
        "vonage",
        message_id,
        provider_id,
        state,
        error,
        stamp.received_at,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_params() -> Params {
        [
            ("message-timestamp", "2013-11-21 15:27:30"),
            ("messageId", "020000001B0FE827"),
            ("msisdn", "14843472194"),
            ("text", "Test again"),
            ("timestamp", "1385047698"),
            ("to", "13239877404"),
            ("type", "text"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    const NODE_SECRET: &str = "my_secret_key_for_testing";

    /// vonage-node-sdk packages/sms/__tests__/__dataSets__/signature.ts.
    #[test]
    fn node_sdk_vectors() {
        assert_eq!(
            signing_string(&node_params()),
            "&message-timestamp=2013-11-21 15:27:30&messageId=020000001B0FE827&msisdn=14843472194&text=Test again&timestamp=1385047698&to=13239877404&type=text"
        );
        let vectors = [
            (VonageSigMethod::Md5Hash, "d2e7b1dc968737c5998ad624e02f90b7"),
            (VonageSigMethod::Md5, "DDEBD46008C2D4E93CCE578A332A52D5"),
            (
                VonageSigMethod::Sha1,
                "27D0D05C2876C7CB1720DBCDBA4D492E1E55C09A",
            ),
            (
                VonageSigMethod::Sha256,
                "DDB8397C2B90AAC7F3882D306475C9A5058C92322EEF43C92B298B6E0FC0D330",
            ),
            (
                VonageSigMethod::Sha512,
                "E0D3C650F8C9D1A5C174D10DDDBFB003E561F59B265616208B0487C5D819481CD3C311D59CF6165ECD1139622D5BA3A256C0D763AC4A9AD9144B5A426B94FE82",
            ),
        ];
        for (method, expected) in vectors {
            let mut params = node_params();
            params.push(("sig".into(), expected.into()));
            assert!(verify(method, NODE_SECRET, &params), "{method:?}");
            assert_eq!(sign(method, NODE_SECRET, &params), expected.to_lowercase());
            // Another secret, another text, or no sig at all fail.
            assert!(!verify(method, "other", &params), "{method:?}");
            let mut changed = params.clone();
            changed[3].1 = "Test again!".into();
            assert!(!verify(method, NODE_SECRET, &changed), "{method:?}");
            assert!(!verify(method, NODE_SECRET, &node_params()), "{method:?}");
        }
    }

    /// vonage-python-sdk http_client/tests/test_auth.py (HMAC-MD5, its
    /// default).
    #[test]
    fn python_sdk_vector() {
        let params: Params = vec![
            ("param".into(), "value".into()),
            ("timestamp".into(), "1234567890".into()),
        ];
        assert_eq!(
            sign(VonageSigMethod::Md5, "signature_secret", &params),
            "655a4d0b7f064dff438defc52b012cf5"
        );
    }

    #[test]
    fn ampersands_and_equals_in_values_are_replaced() {
        let params: Params = vec![("text".into(), "a=b&c".into()), ("b".into(), "1".into())];
        assert_eq!(signing_string(&params), "&b=1&text=a_b_c");
    }
}
