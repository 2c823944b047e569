//! What the providers share: request parameters, the "malformed" error that
//! names the field, the context a parse needs, and status commands.

use chrono::{DateTime, Utc};
use switchboard_core::{Command, DeliveryError, DeliveryState, ProviderRaw};
use uuid::Uuid;

/// Request parameters in the order received (names may repeat).
pub type Params = Vec<(String, String)>;

/// The first value of `name`.
pub fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The first non-empty value of `name`, or a [`Malformed`] naming it.
pub fn require<'a>(params: &'a [(String, String)], name: &str) -> Result<&'a str, Malformed> {
    get(params, name)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Malformed::new(name, "missing"))
}

/// Decodes `application/x-www-form-urlencoded` bytes (also a query string).
pub fn parse_form(bytes: &[u8]) -> Params {
    form_urlencoded::parse(bytes).into_owned().collect()
}

/// Reads a JSON object's members as parameters: strings as they are,
/// numbers and booleans in their JSON spelling. Nested values are refused.
pub fn parse_json_object(bytes: &[u8]) -> Result<Params, Malformed> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Malformed::new(".", format!("malformed json: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(Malformed::new(".", "expected a json object"));
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let s = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => continue,
            _ => return Err(Malformed::new(&k, "expected a string, number or boolean")),
        };
        out.push((k, s));
    }
    Ok(out)
}

/// A payload that cannot be what the provider sends: answered 400 with the
/// field at fault (a retry of the same bytes fails the same way).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct Malformed {
    /// The parameter at fault (`.` for the whole body).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Malformed {
    /// A problem with `field`.
    pub fn new(field: &str, reason: impl Into<String>) -> Self {
        Malformed {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What a parse needs besides the payload: the ids and the time it stamps,
/// passed in so that golden tests are deterministic.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// The envelope id to use.
    pub id: Uuid,
    /// Receipt time.
    pub received_at: DateTime<Utc>,
    /// The webhook request's id, for logs.
    pub request_id: Option<String>,
}

impl Stamp {
    /// A fresh id, now.
    pub fn now() -> Self {
        Stamp {
            id: Uuid::now_v7(),
            received_at: Utc::now(),
            request_id: None,
        }
    }
}

/// The original payload as UTF-8 text.
pub fn raw_text(content_type: &str, body: &[u8]) -> ProviderRaw {
    ProviderRaw {
        content_type: content_type.to_owned(),
        body: Some(String::from_utf8_lossy(body).into_owned()),
        encoding: Some("utf8".to_owned()),
        storage_ref: None,
        parse_error: None,
    }
}

/// Namespace of the deterministic ids of status commands.
const STATUS_NAMESPACE: Uuid = Uuid::from_u128(0x5b0a_7d1e_3c2f_4e8a_9b61_0c4d_2e7f_a1b3);

/// A `message.status` command whose id is derived from what the provider
/// reported (`provider:provider_message_id:status`), so that the
/// provider's redelivery of one callback is applied once.
pub fn status_command(
    provider: &str,
    message_id: Uuid,
    provider_message_id: &str,
    status: DeliveryState,
    error: Option<DeliveryError>,
    at: DateTime<Utc>,
) -> Command {
    Command::reported_status(
        &STATUS_NAMESPACE,
        provider,
        message_id,
        provider_message_id,
        status,
        error,
        at,
    )
}

pub use switchboard_core::constant_time_eq;

const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const GSM_EXTENDED: &str = "^{}\\[~]|€\x0c";

/// The GSM-7 septets `text` takes, or `None` when a character is outside
/// the GSM 03.38 basic set and its extension (which counts double).
pub fn gsm_septets(text: &str) -> Option<usize> {
    let mut septets = 0usize;
    for c in text.chars() {
        if GSM_BASIC.contains(c) {
            septets += 1;
        } else if GSM_EXTENDED.contains(c) {
            septets += 2;
        } else {
            return None;
        }
    }
    Some(septets)
}

/// How many SMS segments `text` takes: GSM-7 (160, or 153 per part) when
/// every character is GSM-7, else UCS-2 (70, or 67 per part) counted in
/// UTF-16 units.
pub fn segments(text: &str) -> u32 {
    let (len, single, multi) = match gsm_septets(text) {
        Some(septets) => (septets, 160, 153),
        None => (text.encode_utf16().count(), 70, 67),
    };
    if len <= single {
        1
    } else {
        len.div_ceil(multi) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_gsm_and_ucs2_limits() {
        assert_eq!(segments(""), 1);
        assert_eq!(segments(&"a".repeat(160)), 1);
        assert_eq!(segments(&"a".repeat(161)), 2);
        assert_eq!(segments(&"a".repeat(306)), 2);
        assert_eq!(segments(&"a".repeat(307)), 3);
        assert_eq!(segments(&"€".repeat(80)), 1);
        assert_eq!(segments(&"€".repeat(81)), 2);
        assert_eq!(segments(&"é".repeat(160)), 1);
        assert_eq!(segments(&"ł".repeat(70)), 1);
        assert_eq!(segments(&"ł".repeat(71)), 2);
        assert_eq!(segments(&"😀".repeat(35)), 1);
        assert_eq!(segments(&"😀".repeat(36)), 2);
    }

    #[test]
    fn status_command_ids_are_stable_per_report() {
        let m = Uuid::now_v7();
        let at = Utc::now();
        let a = status_command("twilio", m, "SM1", DeliveryState::Delivered, None, at);
        let b = status_command("twilio", m, "SM1", DeliveryState::Delivered, None, at);
        let c = status_command("twilio", m, "SM1", DeliveryState::Failed, None, at);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn json_params_refuse_nesting_and_name_the_field() {
        let p = parse_json_object(br#"{"a":"x","n":3,"b":true,"z":null}"#).unwrap();
        assert_eq!(get(&p, "n"), Some("3"));
        assert_eq!(get(&p, "b"), Some("true"));
        assert_eq!(get(&p, "z"), None);
        assert_eq!(
            parse_json_object(br#"{"a":{"b":1}}"#).unwrap_err().field,
            "a"
        );
        assert_eq!(parse_json_object(b"[1]").unwrap_err().field, ".");
    }
}
