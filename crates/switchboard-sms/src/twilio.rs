//! Twilio Programmable Messaging: `X-Twilio-Signature`, the inbound and
//! status-callback forms, and the Messages API.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use switchboard_core::{
    Attachment, Channel, Command, DeliveryError, DeliveryState, Direction, Envelope, ThreadHints,
    Trace,
};
use uuid::Uuid;

use crate::common::{Malformed, Stamp, constant_time_eq, get, raw_text, require, status_command};
use crate::config::AccountConfig;
use crate::phone;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// The query parameter of our StatusCallback URLs that carries
/// Switchboard's message id.
pub const MESSAGE_ID_PARAM: &str = "sb_message_id";

/// base64(HMAC-SHA1(auth token, url + every parameter name and value)):
/// names in sorted order; a repeated name's values sorted, de-duplicated,
/// each appended as name + value.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("hmac takes keys of any length");
    mac.update(url.as_bytes());
    for name in names {
        let mut values: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        values.sort_unstable();
        values.dedup();
        for v in values {
            mac.update(name.as_bytes());
            mac.update(v.as_bytes());
        }
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `scheme://`, `userinfo@`, host, `:port`, rest (path and query), found
/// in the URL text without re-encoding it.
fn split_url(url: &str) -> Option<(&str, &str, &str, Option<&str>, &str)> {
    let (scheme, after) = url.split_once("://")?;
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => authority.split_at(i + 1),
        None => ("", authority),
    };
    let (host, port) = match hostport.rfind(':') {
        Some(i) if !hostport[i + 1..].is_empty() && !hostport.ends_with(']') => {
            (&hostport[..i], Some(&hostport[i + 1..]))
        }
        _ => (hostport, None),
    };
    Some((scheme, userinfo, host, port, rest))
}

/// The spellings of `url` Twilio's SDKs accept: as given, without its port,
/// with the scheme's default port; each also with `'` and `%27`
/// exchanged in the query (Twilio encoded `'` both ways over the years).
pub fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    if let Some((scheme, userinfo, host, port, rest)) = split_url(url) {
        match port {
            Some(_) => out.push(format!("{scheme}://{userinfo}{host}{rest}")),
            None => {
                let default = match scheme {
                    "https" => Some("443"),
                    "http" => Some("80"),
                    _ => None,
                };
                if let Some(p) = default {
                    out.push(format!("{scheme}://{userinfo}{host}:{p}{rest}"));
                }
            }
        }
    }
    let mut all = Vec::new();
    for u in out {
        let swapped = match u.split_once('?') {
            Some((base, q)) if q.contains('\'') => {
                Some(format!("{base}?{}", q.replace('\'', "%27")))
            }
            Some((base, q)) if q.contains("%27") => {
                Some(format!("{base}?{}", q.replace("%27", "'")))
            }
            _ => None,
        };
        all.push(u);
        all.extend(swapped);
    }
    all.dedup();
    all
}

/// Whether `given` signs `url` and `params` under any accepted spelling
/// of the URL.
pub fn validate(auth_token: &str, given: &str, url: &str, params: &[(String, String)]) -> bool {
    url_variants(url).iter().any(|u| {
        constant_time_eq(
            signature(auth_token, u, params).as_bytes(),
            given.trim().as_bytes(),
        )
    })
}

/// A JSON webhook: the URL carries `bodySHA256`, the hex SHA-256 of the raw
/// body, and the signature covers the URL alone.
pub fn validate_with_body(auth_token: &str, given: &str, url: &str, body: &[u8]) -> bool {
    let Some((_, query)) = url.split_once('?') else {
        return false;
    };
    let Some(claimed) = crate::common::parse_form(query.as_bytes())
        .into_iter()
        .find(|(k, _)| k == "bodySHA256")
        .map(|(_, v)| v)
    else {
        return false;
    };
    let actual = hex::encode(Sha256::digest(body));
    constant_time_eq(
        actual.as_bytes(),
        claimed.trim().to_ascii_lowercase().as_bytes(),
    ) && validate(auth_token, given, url, &[])
}

/// What a Twilio webhook reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An inbound message.
    Message(Box<Envelope>),
    /// A status we turn into a command.
    Status(Box<Command>),
    /// A status that is no news for the history (queued, sent, …), or one
    /// for a message that is not ours.
    Ignored(String),
}

/// Reads an inbound-message webhook. `content_type` and `raw` are the
/// original request body, kept on the envelope.
pub fn parse_message(
    params: &[(String, String)],
    account: &AccountConfig,
    stamp: &Stamp,
    content_type: &str,
    raw: &[u8],
) -> Result<Envelope, Malformed> {
    let sid = require(params, "MessageSid")
        .or_else(|_| require(params, "SmsMessageSid"))
        .map_err(|_| Malformed::new("MessageSid", "missing"))?;
    let from_raw = require(params, "From")?;
    let to_raw = require(params, "To")?;
    let whatsapp = from_raw.starts_with("whatsapp:");
    let channel = if whatsapp {
        Channel::Whatsapp
    } else {
        Channel::Sms
    };
    let from = phone::identity(from_raw, account.region, false);
    let to = phone::identity(to_raw, account.region, false);
    let mut text = get(params, "Body").unwrap_or_default().to_owned();
    if text.is_empty()
        && let (Some(lat), Some(lon)) = (get(params, "Latitude"), get(params, "Longitude"))
    {
        let mut parts = vec![format!("location {lat},{lon}")];
        parts.extend(get(params, "Label").map(str::to_owned));
        parts.extend(get(params, "Address").map(str::to_owned));
        text = parts.join(" ");
    }
    let declared: usize = match get(params, "NumMedia") {
        Some(n) => n
            .trim()
            .parse()
            .map_err(|_| Malformed::new("NumMedia", format!("{n:?} is not a count")))?,
        None => 0,
    };
    let mut attachments = Vec::new();
    for i in 0..declared {
        let url = require(params, &format!("MediaUrl{i}"))?;
        let content_type = get(params, &format!("MediaContentType{i}"))
            .filter(|c| !c.trim().is_empty())
            .unwrap_or("application/octet-stream");
        attachments.push(Attachment {
            name: None,
            content_type: content_type.to_owned(),
            size: 0,
            url: Some(url.to_owned()),
            storage_ref: None,
            sha256: None,
        });
    }
    Ok(Envelope {
        schema: Default::default(),
        id: stamp.id,
        idempotency_key: format!("{channel}:{}:{sid}", account.number),
        channel,
        provider: "twilio".into(),
        account: account.number.clone(),
        direction: Direction::Inbound,
        from,
        to,
        sent_at: None,
        received_at: stamp.received_at,
        subject: None,
        text,
        attachments,
        thread_hints: ThreadHints {
            message_id: Some(sid.to_owned()),
            ..ThreadHints::default()
        },
        provider_raw: Some(raw_text(content_type, raw)),
        trace: Trace {
            request_id: stamp.request_id.clone(),
            correlation_id: None,
        },
        automated: None,
        change: None,
    })
}

/// What a Twilio error code means, for the ones a sender meets most.
pub fn error_reason(code: &str) -> &'static str {
    match code {
        "21211" => "invalid 'To' phone number",
        "21408" => "permission to send to this region is not enabled",
        "21610" => "the recipient has unsubscribed (replied STOP)",
        "21612" => "the 'To' number cannot be reached from this 'From' number",
        "21614" => "'To' is not a mobile number",
        "30001" => "queue overflow",
        "30002" => "account suspended",
        "30003" => "unreachable destination handset",
        "30004" => "message blocked",
        "30005" => "unknown destination handset",
        "30006" => "landline or unreachable carrier",
        "30007" => "message filtered by the carrier",
        "30008" => "unknown error",
        "30022" => "rate limit exceeded (US A2P 10DLC)",
        "63016" => "outside the WhatsApp 24 hour window; a template is needed",
        "63018" => "rate limit exceeded for the channel",
        _ => "the provider reported the message failed",
    }
}

/// Reads a status callback. `message_id` is what our StatusCallback URL
/// carried.
pub fn parse_status(
    params: &[(String, String)],
    message_id: Option<Uuid>,
    stamp: &Stamp,
) -> Result<Event, Malformed> {
    let sid = require(params, "MessageSid").or_else(|_| require(params, "SmsSid"))?;
    let status = require(params, "MessageStatus")
        .or_else(|_| require(params, "SmsStatus"))
        .map_err(|_| Malformed::new("MessageStatus", "missing"))?;
    let state = match status {
        "delivered" => DeliveryState::Delivered,
        "read" => DeliveryState::Read,
        "failed" | "undelivered" | "canceled" => DeliveryState::Failed,
        "queued"
        | "sending"
        | "sent"
        | "accepted"
        | "scheduled"
        | "receiving"
        | "received"
        | "partially_delivered" => return Ok(Event::Ignored(format!("status {status}"))),
        other => {
            return Err(Malformed::new(
                "MessageStatus",
                format!("{other:?} is not a Twilio message status"),
            ));
        }
    };
    let Some(message_id) = message_id else {
        return Ok(Event::Ignored(format!(
            "status {status} of {sid} without {MESSAGE_ID_PARAM}: not a message Switchboard sent"
        )));
    };
    let error = (state == DeliveryState::Failed).then(|| {
        let code = get(params, "ErrorCode")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        DeliveryError {
            reason: match &code {
                Some(c) => format!("{status}: {} (twilio error {c})", error_reason(c)),
                None if status == "canceled" => "canceled before sending".to_owned(),
                None => format!("{status}: no error code given"),
            },
            retryable: matches!(code.as_deref(), Some("30001" | "30022" | "63018")),
            code,
        }
    });
    Ok(Event::Status(Box::new(status_command(
        "twilio",
        message_id,
        sid,
        state,
        error,
        stamp.received_at,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const TOKEN: &str = "12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn default_params() -> Vec<(String, String)> {
        p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ])
    }

    // Every vector below is from twilio-python
    // tests/unit/test_request_validator.py and twilio-node
    // spec/validation.spec.js (see shared/notes/protocols.md §2).

    #[test]
    fn sdk_vector_default() {
        assert_eq!(
            signature(TOKEN, URL, &default_params()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(validate(
            TOKEN,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            URL,
            &default_params()
        ));
        assert!(!validate(TOKEN, "WRONG_SIGNATURE", URL, &default_params()));
        let mut changed = default_params();
        changed[2].1 = "1235".into();
        assert!(!validate(
            TOKEN,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            URL,
            &changed
        ));
    }

    #[test]
    fn sdk_vectors_with_and_without_the_port() {
        let params = default_params();
        // Signed with :443: validates on the URL without it.
        assert!(validate(
            TOKEN,
            "kvajT1Ptam85bY51eRf/AJRuM3w=",
            URL,
            &params
        ));
        // Signed without the port: validates on the URL with :443 and with
        // another port (the SDKs strip it).
        let with_443 = URL.replace(".com", ".com:443");
        assert!(validate(
            TOKEN,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            &with_443,
            &params
        ));
        assert!(validate(
            TOKEN,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            &URL.replace(".com", ".com:1234"),
            &params
        ));
        let http = URL.replace("https", "http");
        assert!(validate(
            TOKEN,
            "0ZXoZLH/DfblKGATFgpif+LLRf4=",
            &http,
            &params
        ));
        assert!(validate(
            TOKEN,
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
            &http.replace(".com", ".com:1234"),
            &params
        ));
    }

    #[test]
    fn sdk_vectors_with_credentials_in_the_url() {
        let params = default_params();
        let creds = "https://user:pass@mycompany.com/myapp.php?foo=1&bar=2";
        assert!(validate(
            TOKEN,
            "CukzLTc1tT5dXEDIHm/tKBanW10=",
            creds,
            &params
        ));
        assert!(validate(
            TOKEN,
            "ZQFR1PTIZXF2MXB8ZnKCvnnA+rI=",
            creds,
            &params
        ));
        assert!(validate(
            TOKEN,
            "2YRLlVAflCqxaNicjMpJcSTgzSs=",
            "https://user@mycompany.com/myapp.php?foo=1&bar=2",
            &params
        ));
    }

    #[test]
    fn sdk_vectors_with_repeated_parameters() {
        let multi = p(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            signature(TOKEN, URL, &multi),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        for order in [
            ["+1325xxxxxxx", "+1415xxxxxxx"],
            ["+1415xxxxxxx", "+1325xxxxxxx"],
        ] {
            let arr = p(&[
                ("MessagingBinding.Address", order[0]),
                ("MessagingBinding.Address", order[1]),
            ]);
            assert!(validate(TOKEN, "83O6e2vORAoJHUNzJjDWN1jz+BA=", URL, &arr));
        }
    }

    #[test]
    fn sdk_vectors_with_a_quote_in_the_query() {
        let url = format!("{URL}&Body=It's+amazing");
        let params = default_params();
        // The older revision signed the raw quote, the current one %27.
        assert!(validate(
            TOKEN,
            "dsq4Ehbj6cs+KdTkpF5sSSplOWw=",
            &url,
            &params
        ));
        assert!(validate(
            TOKEN,
            "TfZzewPq8wqrGlMfyAud8+/IvJ0=",
            &url,
            &params
        ));
    }

    #[test]
    fn sdk_vectors_of_json_bodies() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(hex::encode(Sha256::digest(body)), hash);
        let url = format!("{URL}&bodySHA256={hash}");
        assert!(validate_with_body(
            TOKEN,
            "a9nBmqA0ju/hNViExpshrM61xv4=",
            &url,
            body
        ));
        // A changed body no longer matches its hash.
        assert!(!validate_with_body(
            TOKEN,
            "a9nBmqA0ju/hNViExpshrM61xv4=",
            &url,
            br#"{"property": "value", "boolean": false}"#
        ));
        // A hash cut short fails.
        assert!(!validate_with_body(
            TOKEN,
            "a9nBmqA0ju/hNViExpshrM61xv4=",
            &url[..url.len() - 1],
            body
        ));
        // No bodySHA256 at all fails.
        assert!(!validate_with_body(
            TOKEN,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            URL,
            body
        ));
        let empty = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        assert_eq!(hex::encode(Sha256::digest(b"{}")), empty);
        assert!(validate_with_body(
            TOKEN,
            "Ldidvp12m26NI7eqEvxnEpkd9Hc=",
            &format!("{URL}&bodySHA256={empty}"),
            b"{}"
        ));
        assert!(validate_with_body(
            TOKEN,
            "y77kIzt2vzLz71DgmJGsen2scGs=",
            &format!("https://mycompany.com/myapp.php?bodySHA256={hash}"),
            body
        ));
    }

    #[test]
    fn url_variants_keep_the_query_text() {
        let v = url_variants("https://a.example:8443/x?y='1'");
        assert!(v.contains(&"https://a.example/x?y='1'".to_owned()), "{v:?}");
        assert!(
            v.contains(&"https://a.example:8443/x?y=%271%27".to_owned()),
            "{v:?}"
        );
        let v = url_variants("http://[::1]/hook");
        assert!(v.contains(&"http://[::1]:80/hook".to_owned()), "{v:?}");
    }
}
