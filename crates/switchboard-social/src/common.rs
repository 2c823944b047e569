//! What the platforms share: the "malformed" error that names the field,
//! the stamp a parse uses, what a parse yields, and small helpers.

use chrono::{DateTime, Utc};
use serde::Serialize;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::records::CommandSchema;
use switchboard_core::{
    Channel, Command, CommandKind, DeliveryError, DeliveryState, Direction, Envelope, Identity,
    IdentityKind, MessageChange, MessageChangeKind, ProviderRaw, ThreadHints, Trace,
};
use uuid::Uuid;

/// A payload that cannot be what the platform sends: answered 400 with the
/// field at fault (the same bytes fail the same way again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct Malformed {
    /// The JSON path at fault (`.` for the whole body).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Malformed {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Malformed {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What a parse needs besides the payload, passed in so that golden tests
/// are deterministic: the first envelope id (the next ones count up from
/// it) and the receipt time.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// The first envelope id of the request.
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
            request_id: Some(Uuid::now_v7().to_string()),
        }
    }

    /// The id of the `n`th envelope of the request (0-based): the first id
    /// plus `n`, so that ids stay time-ordered and distinct within a batch.
    pub fn id(&self, n: usize) -> Uuid {
        Uuid::from_u128(self.id.as_u128().wrapping_add(n as u128))
    }
}

/// Which kind of change a platform reported about a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The text was edited.
    Edit,
    /// A reaction was set (or removed: `emoji` empty).
    Reaction,
    /// The message was deleted (unsent, revoked).
    Delete,
}

/// A change to a message that was sent earlier: it must change the stored
/// message, never add one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// Edit, reaction or deletion.
    pub kind: ChangeKind,
    /// Stable across redelivery of the same report.
    pub idempotency_key: String,
    /// The channel.
    pub channel: Channel,
    /// Our account.
    pub account: String,
    /// The provider's id of the message changed.
    pub target: String,
    /// Who made the change.
    pub by: Identity,
    /// When, by the platform's clock.
    pub at: DateTime<Utc>,
    /// The new text, for an edit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The reaction, for a reaction; empty when it was removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emoji: Option<String>,
}

impl Change {
    /// The envelope that carries the change to the router: it changes the
    /// stored message `target` names (keeping its earlier versions) and adds
    /// none. The new text of an edit is its `text`; who changed it, `from`.
    pub fn into_envelope(
        self,
        id: Uuid,
        received_at: DateTime<Utc>,
        request_id: Option<String>,
    ) -> Envelope {
        let kind = match self.kind {
            ChangeKind::Edit => MessageChangeKind::Edit,
            ChangeKind::Reaction if self.emoji.as_deref().unwrap_or("").is_empty() => {
                MessageChangeKind::ReactionRemoved
            }
            ChangeKind::Reaction => MessageChangeKind::Reaction,
            ChangeKind::Delete => MessageChangeKind::Delete,
        };
        Envelope {
            schema: EnvelopeSchema::V1,
            id,
            idempotency_key: self.idempotency_key,
            channel: self.channel,
            provider: if self.channel == Channel::Telegram {
                "telegram"
            } else {
                "meta"
            }
            .into(),
            to: Identity {
                kind: IdentityKind::External,
                value: format!("{}:{}", self.channel, self.account),
            },
            account: self.account,
            direction: Direction::Inbound,
            from: self.by,
            sent_at: Some(self.at),
            received_at,
            subject: None,
            text: self.text.unwrap_or_default(),
            attachments: Vec::new(),
            thread_hints: ThreadHints::default(),
            provider_raw: None,
            trace: Trace {
                request_id,
                correlation_id: None,
            },
            automated: None,
            change: Some(MessageChange {
                kind,
                target: self.target,
                emoji: self.emoji.filter(|e| !e.is_empty()),
            }),
        }
    }
}

/// A delivery status a platform reported, before it is matched to
/// Switchboard's message id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// The channel.
    pub channel: Channel,
    /// Our account.
    pub account: String,
    /// The provider's id of our message; `None` for a watermark report.
    pub provider_message_id: Option<String>,
    /// Every message to `recipient` sent at or before this time (Messenger
    /// `read`, `delivery` without mids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<DateTime<Utc>>,
    /// The customer the message went to.
    pub recipient: String,
    /// Switchboard's id, when the report carries it
    /// (`biz_opaque_callback_data`).
    pub message_id: Option<Uuid>,
    /// The state.
    pub status: DeliveryState,
    /// Why, for `failed`.
    pub error: Option<DeliveryError>,
    /// When, by the platform's clock.
    pub at: DateTime<Utc>,
}

/// One thing a webhook payload said.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Parsed {
    /// A message: a customer's, or an echo of one of ours
    /// (`direction: outbound`).
    Message {
        /// The envelope.
        envelope: Box<Envelope>,
    },
    /// A delivery status of one of our messages.
    Status {
        /// The report.
        report: StatusReport,
    },
    /// An edit, reaction or deletion of a message.
    Change {
        /// The change.
        change: Change,
    },
    /// A Telegram group became a supergroup with a new chat id.
    Migrated {
        /// Our bot.
        account: String,
        /// The old chat id.
        from_chat: i64,
        /// The new chat id.
        to_chat: i64,
    },
    /// Nothing to record, and why.
    Ignored {
        /// Why.
        reason: String,
    },
}

impl Parsed {
    pub(crate) fn ignored(reason: impl Into<String>) -> Self {
        Parsed::Ignored {
            reason: reason.into(),
        }
    }
}

/// The original item as JSON text.
pub fn raw_json(value: &serde_json::Value) -> ProviderRaw {
    ProviderRaw {
        content_type: "application/json".to_owned(),
        body: Some(value.to_string()),
        encoding: Some("utf8".to_owned()),
        storage_ref: None,
        parse_error: None,
    }
}

/// Seconds or milliseconds since the epoch as a time.
pub fn from_secs(secs: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(secs, 0)
}

/// Milliseconds since the epoch as a time.
pub fn from_ms(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// A JSON string or number as text (ids arrive as either).
pub fn id_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An identity of a platform-scoped id kind; a value the core refuses is
/// kept as an `external` identity `PREFIX:VALUE`, so nothing is dropped.
pub fn scoped_identity(kind: IdentityKind, value: &str, prefix: &str) -> Identity {
    Identity::new(kind, value).unwrap_or_else(|_| Identity {
        kind: IdentityKind::External,
        value: format!("{prefix}:{}", value.trim()),
    })
}

/// Namespace of the deterministic ids of status commands.
const STATUS_NAMESPACE: Uuid = Uuid::from_u128(0x7c1e_52a4_0b9d_4f3e_8a26_d41f_6e0b_93c5);

/// A `message.status` command whose id is derived from the report
/// (`channel:provider_message_id:status`), so the platform's redelivery of
/// one report is applied once.
pub fn status_command(
    channel: Channel,
    message_id: Uuid,
    provider_message_id: &str,
    status: DeliveryState,
    error: Option<DeliveryError>,
    at: DateTime<Utc>,
) -> Command {
    Command::reported_status(
        &STATUS_NAMESPACE,
        channel.as_str(),
        message_id,
        provider_message_id,
        status,
        error,
        at,
    )
}

/// A `message.provider_status` command for a report that names our
/// messages only by the platform's ids, or by recipient and read watermark:
/// the router resolves them against the shared history. Its id is derived
/// from the report, so a redelivery is applied once.
pub fn provider_status_command(r: &StatusReport) -> Option<Command> {
    let state = r.status.as_str();
    let (ids, recipient, read_up_to, what) = match (&r.provider_message_id, r.watermark) {
        (Some(pids), _) => (
            pids.split(',').map(str::to_owned).collect(),
            None,
            None,
            pids.clone(),
        ),
        (None, Some(w)) if r.status == DeliveryState::Read => {
            let kind = match r.channel {
                Channel::Instagram => IdentityKind::InstagramIgsid,
                _ => IdentityKind::MessengerPsid,
            };
            (
                Vec::new(),
                Some(scoped_identity(kind, &r.recipient, r.channel.as_str())),
                Some(w),
                format!("{}:{}:{}", r.account, r.recipient, w.timestamp_millis()),
            )
        }
        _ => return None,
    };
    Some(Command {
        schema: CommandSchema::V1,
        id: Uuid::new_v5(
            &STATUS_NAMESPACE,
            format!("{}:{what}:{state}", r.channel).as_bytes(),
        ),
        at: r.at,
        kind: CommandKind::ProviderStatus {
            channel: r.channel,
            account: r.account.clone(),
            status: r.status,
            provider_message_ids: ids,
            recipient,
            read_up_to,
            error: r.error.clone(),
        },
    })
}

pub use switchboard_core::constant_time_eq;

/// A WhatsApp id (or any international number, with or without `+`) in
/// E.164, read with libphonenumber's metadata.
pub fn e164(raw: &str) -> Option<String> {
    let digits = raw.trim().trim_start_matches('+');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let parsed = phonenumber::parse(None, format!("+{digits}")).ok()?;
    let s = parsed.format().mode(phonenumber::Mode::E164).to_string();
    Identity::new(IdentityKind::Phone, &s).ok().map(|i| i.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_count_up_from_the_first() {
        let s = Stamp {
            id: Uuid::from_u128(10),
            received_at: Utc::now(),
            request_id: None,
        };
        assert_eq!(s.id(0), Uuid::from_u128(10));
        assert_eq!(s.id(3), Uuid::from_u128(13));
    }

    #[test]
    fn wa_ids_are_e164_numbers() {
        assert_eq!(e164("972544401243").as_deref(), Some("+972544401243"));
        assert_eq!(e164("+14155550100").as_deref(), Some("+14155550100"));
        assert_eq!(e164("abc"), None);
        assert_eq!(e164(""), None);
    }
}
