//! Switchboard's shared vocabulary: the versioned records that travel on the
//! topics, the identities they name, and the traits the other crates meet at.
//!
//! Contract: this crate does no I/O. Every record carries a `schema` field
//! naming its version; [`decode`] refuses a record whose version it does not
//! know, naming the field at fault, so a reader can dead-letter it instead of
//! crashing. Identities are normalized on construction and on
//! deserialization, so a record injected by another system compares equal to
//! one built by an adapter. Serialization is deterministic for a given value.
#![warn(missing_docs)]

pub mod bus;
pub mod envelope;
pub mod identity;
pub mod intake;
pub mod live;
pub mod outbound;
pub mod records;
pub mod schemas;
pub mod secret;
pub mod settings;

pub use bus::{Bus, BusError, Consumer, Groups, Record, Topics};
pub use envelope::{
    Attachment, Automated, AutomatedKind, Channel, Direction, Envelope, MessageChange,
    MessageChangeKind, ProviderRaw, ThreadHints, Trace,
};
pub use identity::{Identity, IdentityError, IdentityKind};
pub use intake::{Intake, IntakeError, Received};
pub use live::Live;
pub use outbound::{Outbound, OutboundMessage, SendError, SendReceipt, ThreadRefs};
pub use records::{
    Command, CommandKind, DeadLetter, Delivery, DeliveryError, DeliveryState, Event, EventKind,
    OutboundRequest, Template, ThreadRule,
};
pub use secret::{Secret, constant_time_eq};
pub use settings::{parse_duration, secret_setting};

/// Declares a one-value enum that serializes as a schema version string, so a
/// record with another version fails to decode with a message naming the
/// expected one.
#[macro_export]
#[doc(hidden)]
macro_rules! schema_tag {
    ($(#[$meta:meta])* $name:ident, $value:literal) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, Hash,
            serde::Serialize, serde::Deserialize, schemars::JsonSchema,
        )]
        pub enum $name {
            /// The only version this build reads and writes.
            #[default]
            #[serde(rename = $value)]
            V1,
        }

        impl $name {
            /// The version string.
            pub const NAME: &'static str = $value;
        }
    };
}

/// Why a record could not be decoded. Never retryable: the same bytes will
/// fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("malformed json at line {line} column {column}: {reason}")]
    Syntax {
        /// Line of the fault.
        line: usize,
        /// Column of the fault.
        column: usize,
        /// What the parser said.
        reason: String,
    },
    /// A field is missing, of the wrong type, or has a value out of range.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// The path of the field (`from.value`, `attachments[0].size`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl DecodeError {
    /// The field at fault, if the fault is in one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            DecodeError::Syntax { .. } => None,
            DecodeError::Invalid { field, .. } => Some(field),
        }
    }
}

/// Decodes a JSON record, naming the field at fault on failure. The
/// `schema` field is checked first, so an unknown version says so rather than
/// complaining about some field the new version renamed.
pub fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    expected_schema: &str,
) -> Result<T, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Syntax {
            line: e.line(),
            column: e.column(),
            reason: e.to_string(),
        })?;
    match value.get("schema") {
        Some(serde_json::Value::String(s)) if s == expected_schema => {}
        Some(serde_json::Value::String(s)) => {
            return Err(DecodeError::Invalid {
                field: "schema".into(),
                reason: format!(
                    "unknown schema version {s:?}, this build reads {expected_schema:?}"
                ),
            });
        }
        Some(_) => {
            return Err(DecodeError::Invalid {
                field: "schema".into(),
                reason: "must be a string".into(),
            });
        }
        None if value.is_object() => {
            return Err(DecodeError::Invalid {
                field: "schema".into(),
                reason: format!("missing; expected {expected_schema:?}"),
            });
        }
        None => {
            return Err(DecodeError::Invalid {
                field: ".".into(),
                reason: "expected a json object".into(),
            });
        }
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        let missing = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next());
        let field = match (path.as_str(), missing) {
            ("" | ".", Some(name)) => name.to_owned(),
            (parent, Some(name)) => format!("{parent}.{name}"),
            ("", None) => ".".to_owned(),
            (parent, None) => parent.to_owned(),
        };
        DecodeError::Invalid { field, reason }
    })
}

/// Decodes and validates an envelope, normalizing its thread hints.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let mut env: Envelope = decode(bytes, envelope::EnvelopeSchema::NAME)?;
    env.validate()?;
    env.normalize();
    Ok(env)
}

/// Decodes and validates an outbound request.
pub fn decode_outbound(bytes: &[u8]) -> Result<OutboundRequest, DecodeError> {
    let req: OutboundRequest = decode(bytes, records::OutboundSchema::NAME)?;
    req.validate()?;
    Ok(req)
}

/// Decodes a command.
pub fn decode_command(bytes: &[u8]) -> Result<Command, DecodeError> {
    let cmd: Command = decode(bytes, records::CommandSchema::NAME)?;
    if let CommandKind::MessageStatus { status, .. } | CommandKind::ProviderStatus { status, .. } =
        &cmd.kind
        && matches!(status, DeliveryState::Queued | DeliveryState::Sent)
    {
        return Err(DecodeError::Invalid {
            field: "status".into(),
            reason: "a reported status is delivered, read or failed".into(),
        });
    }
    if let CommandKind::ProviderStatus {
        provider_message_ids,
        recipient,
        read_up_to,
        status,
        ..
    } = &cmd.kind
    {
        let watermark = recipient.is_some() && read_up_to.is_some();
        if provider_message_ids.is_empty() && !watermark {
            return Err(DecodeError::Invalid {
                field: "provider_message_ids".into(),
                reason: "name the messages, or give recipient and read_up_to".into(),
            });
        }
        if read_up_to.is_some() && *status != DeliveryState::Read {
            return Err(DecodeError::Invalid {
                field: "read_up_to".into(),
                reason: "a watermark reports `read`".into(),
            });
        }
    }
    Ok(cmd)
}

/// Whether an error is worth retrying. Every boundary error in Switchboard
/// answers this, so callers decide by type, not by message.
pub trait Retryable {
    /// True when the same operation, tried again later, may succeed.
    fn retryable(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "schema": "switchboard.envelope.v1",
        "idempotency_key": "api:crm:1",
        "channel": "api", "provider": "api", "account": "crm", "direction": "inbound",
        "from": {"kind": "email", "value": " A@B.io "},
        "to": {"kind": "external", "value": "support"},
        "text": "hi",
        "thread_hints": {"message_id": "<x@y>", "in_reply_to": [" <p@y> "]}
    }"#;

    #[test]
    fn decodes_and_normalizes_an_envelope() {
        let env = decode_envelope(GOOD.as_bytes()).unwrap();
        assert_eq!(env.from.value, "a@b.io");
        assert_eq!(env.thread_hints.message_id.as_deref(), Some("x@y"));
        assert_eq!(env.thread_hints.in_reply_to, vec!["p@y".to_owned()]);
        assert_eq!(env.id.get_version_num(), 7);
    }

    #[test]
    fn names_the_field_at_fault() {
        let cases = [
            (GOOD.replace("envelope.v1", "envelope.v9"), "schema"),
            (
                GOOD.replace(r#""channel": "api""#, r#""channel": "fax""#),
                "channel",
            ),
            (
                GOOD.replace(r#""kind": "email""#, r#""kind": "phone""#),
                "from",
            ),
            (
                GOOD.replace(r#""account": "crm""#, r#""account": "  ""#),
                "account",
            ),
            (
                GOOD.replace(r#""text": "hi""#, r#""text": "hi", "colour": 1"#),
                "colour",
            ),
            (GOOD.replace(r#""provider": "api","#, ""), "provider"),
            (
                GOOD.replace(r#""value": "support""#, r#""valu": "support""#),
                "to.valu",
            ),
        ];
        for (json, field) in cases {
            let err = decode_envelope(json.as_bytes()).unwrap_err();
            assert_eq!(err.field(), Some(field), "{err}");
        }
        let err = decode_envelope(b"{not json").unwrap_err();
        assert!(matches!(err, DecodeError::Syntax { line: 1, .. }), "{err}");
        let err = decode_envelope(b"[1]").unwrap_err();
        assert!(err.to_string().contains("expected a json object"), "{err}");
    }

    #[test]
    fn outbound_needs_exactly_one_recipient() {
        let base = r#"{"schema":"switchboard.outbound.v1","idempotency_key":"k","text":"hello"}"#;
        assert!(decode_outbound(base.as_bytes()).is_err());
        let one = base.replace(
            r#""text""#,
            r#""customer_id":"0190a0a0-0000-7000-8000-000000000000","text""#,
        );
        decode_outbound(one.as_bytes()).unwrap();
        let two = one.replace(
            r#""text""#,
            r#""to":{"kind":"phone","value":"+14155550100"},"text""#,
        );
        assert_eq!(
            decode_outbound(two.as_bytes()).unwrap_err().field(),
            Some("conversation_id")
        );
    }

    #[test]
    fn commands_round_trip() {
        let json = r#"{"schema":"switchboard.command.v1","type":"identity.link",
            "a":{"kind":"email","value":"x@y.z"},"b":{"kind":"phone","value":"+14155550100"},
            "evidence":"crm record 7"}"#;
        let cmd = decode_command(json.as_bytes()).unwrap();
        assert!(matches!(cmd.kind, CommandKind::IdentityLink { .. }));
        let back: Command = serde_json::from_slice(&serde_json::to_vec(&cmd).unwrap()).unwrap();
        assert_eq!(back, cmd);
    }

    #[test]
    fn provider_statuses_name_messages_or_a_watermark() {
        // The example in docs/integration.md.
        let ids = br#"{"schema": "switchboard.command.v1", "type": "message.provider_status",
            "channel": "messenger", "account": "1717527131834678", "status": "delivered",
            "provider_message_ids": ["m_1a2b3c"]}"#;
        let cmd = decode_command(ids).unwrap();
        assert_eq!(cmd.partition_key(), "messenger:1717527131834678:m_1a2b3c");
        let read = br#"{"schema": "switchboard.command.v1", "type": "message.provider_status",
            "channel": "messenger", "account": "1717527131834678", "status": "read",
            "recipient": {"kind": "messenger_psid", "value": "1256217357730577"},
            "read_up_to": "2026-11-23T18:00:00Z"}"#;
        let cmd = decode_command(read).unwrap();
        assert_eq!(cmd.partition_key(), "messenger_psid:1256217357730577");
        let neither = br#"{"schema": "switchboard.command.v1", "type": "message.provider_status",
            "channel": "messenger", "account": "p", "status": "read"}"#;
        let e = decode_command(neither).unwrap_err();
        assert!(e.to_string().contains("provider_message_ids"), "{e}");
        let delivered_watermark = br#"{"schema": "switchboard.command.v1",
            "type": "message.provider_status", "channel": "messenger", "account": "p",
            "status": "delivered", "recipient": {"kind": "messenger_psid", "value": "1"},
            "read_up_to": "2026-11-23T18:00:00Z"}"#;
        let e = decode_command(delivered_watermark).unwrap_err();
        assert!(e.to_string().contains("read_up_to"), "{e}");
        let sent = br#"{"schema": "switchboard.command.v1", "type": "message.provider_status",
            "channel": "messenger", "account": "p", "status": "sent",
            "provider_message_ids": ["m"]}"#;
        assert!(decode_command(sent).is_err());
    }
}
