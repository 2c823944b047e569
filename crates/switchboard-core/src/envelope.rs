//! The message envelope (`switchboard.envelope.v1`): one normalized message,
//! inbound or outbound, of any channel.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::Identity;
use crate::schema_tag;

schema_tag!(
    /// The envelope's `schema` field: `switchboard.envelope.v1`.
    EnvelopeSchema,
    "switchboard.envelope.v1"
);

/// A channel: how a message travels.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Email (IMAP in, SMTP out).
    Email,
    /// SMS and MMS.
    Sms,
    /// WhatsApp.
    Whatsapp,
    /// Facebook Messenger.
    Messenger,
    /// Instagram direct messages.
    Instagram,
    /// Telegram.
    Telegram,
    /// Another system, through the HTTP API or the topics.
    Api,
}

impl Channel {
    /// Every channel, in a stable order.
    pub const ALL: [Channel; 7] = [
        Channel::Email,
        Channel::Sms,
        Channel::Whatsapp,
        Channel::Messenger,
        Channel::Instagram,
        Channel::Telegram,
        Channel::Api,
    ];

    /// The channel's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
            Channel::Messenger => "messenger",
            Channel::Instagram => "instagram",
            Channel::Telegram => "telegram",
            Channel::Api => "api",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Channel::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown channel {s:?}"))
    }
}

/// Which way a message travels, seen from the business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From a customer to us.
    Inbound,
    /// From us to a customer.
    Outbound,
}

impl Direction {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// An attachment: metadata and where the bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// File name as the sender gave it.
    #[serde(default)]
    pub name: Option<String>,
    /// MIME type.
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
    /// A URL the bytes can be fetched from (provider media URL).
    #[serde(default)]
    pub url: Option<String>,
    /// A reference into Switchboard's attachment store (content address).
    #[serde(default)]
    pub storage_ref: Option<String>,
    /// SHA-256 of the bytes, hex, when known.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// What the provider said about threads. Email ids are kept without angle
/// brackets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ThreadHints {
    /// The message's own id (email Message-ID, provider message id).
    #[serde(default)]
    pub message_id: Option<String>,
    /// Email `In-Reply-To`, in header order.
    #[serde(default)]
    pub in_reply_to: Vec<String>,
    /// Email `References`, oldest first as in the header.
    #[serde(default)]
    pub references: Vec<String>,
    /// A provider thread id: Gmail `X-GM-THRID`, Outlook `Thread-Index`,
    /// Telegram `chat_id`, Meta thread or context id.
    #[serde(default)]
    pub provider_thread_id: Option<String>,
}

impl ThreadHints {
    /// Strips angle brackets and white space from every id, and drops empty
    /// ones, so ids compare equal however a header wrote them.
    pub fn normalize(&mut self) {
        fn clean(id: &str) -> Option<String> {
            let id = id
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .trim();
            (!id.is_empty()).then(|| id.to_owned())
        }
        self.message_id = self.message_id.as_deref().and_then(clean);
        self.in_reply_to = self.in_reply_to.iter().filter_map(|s| clean(s)).collect();
        self.references = self.references.iter().filter_map(|s| clean(s)).collect();
        self.provider_thread_id = self.provider_thread_id.as_deref().and_then(clean);
    }
}

/// The original payload, so nothing is lost in normalization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderRaw {
    /// MIME type of the original (`message/rfc822`, `application/json`, …).
    pub content_type: String,
    /// The original bytes, when small enough to carry (UTF-8 text or base64,
    /// see `encoding`).
    #[serde(default)]
    pub body: Option<String>,
    /// `utf8` or `base64`.
    #[serde(default)]
    pub encoding: Option<String>,
    /// A reference into the attachment store, when the original is large.
    #[serde(default)]
    pub storage_ref: Option<String>,
    /// Why the original could not be normalized, when it could not: the
    /// envelope then carries only what could be read, and the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<String>,
}

/// Ids that connect log lines and metrics across the pipeline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    /// The id of the request (webhook, API call, IMAP fetch) that brought the
    /// message in.
    #[serde(default)]
    pub request_id: Option<String>,
    /// A caller-supplied correlation id.
    #[serde(default)]
    pub correlation_id: Option<String>,
}

/// A message sent by a machine (an auto-reply, a bounce): stored and
/// threaded like any other, but never to be answered automatically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Automated {
    /// Which kind.
    pub kind: AutomatedKind,
    /// What decided it (`auto-submitted: auto-replied`).
    pub reason: String,
}

/// The kind of machine-sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutomatedKind {
    /// An auto-reply or other machine-generated or bulk message.
    AutoReply,
    /// A bounce: a delivery failure report.
    Bounce,
}

/// A change to a message stored earlier (an edit, a reaction, a deletion):
/// routing an envelope that carries one changes that message, keeping its
/// earlier versions, and stores no new message. The new text of an edit is
/// the envelope's `text`; who reacted is its `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageChange {
    /// Which change.
    pub kind: MessageChangeKind,
    /// The provider's id of the message changed, as the channel's envelopes
    /// carry it in `thread_hints.message_id` (or as the provider answered a
    /// send of ours).
    pub target: String,
    /// The reaction, for `reaction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emoji: Option<String>,
}

/// The kind of change to a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageChangeKind {
    /// The text was edited; the new text is the envelope's.
    Edit,
    /// A reaction was set (replacing the sender's earlier one).
    Reaction,
    /// The sender's reaction was removed.
    ReactionRemoved,
    /// The message was deleted (unsent, revoked).
    Delete,
}

impl MessageChangeKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageChangeKind::Edit => "edit",
            MessageChangeKind::Reaction => "reaction",
            MessageChangeKind::ReactionRemoved => "reaction_removed",
            MessageChangeKind::Delete => "delete",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            MessageChangeKind::Edit,
            MessageChangeKind::Reaction,
            MessageChangeKind::ReactionRemoved,
            MessageChangeKind::Delete,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

fn new_id() -> Uuid {
    Uuid::now_v7()
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

/// One normalized message: `switchboard.envelope.v1`.
///
/// `id` and `received_at` are filled in when absent, so another system may
/// leave them out; everything else that is required must be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Always `switchboard.envelope.v1`.
    pub schema: EnvelopeSchema,
    /// Switchboard's id (UUIDv7, time-ordered).
    #[serde(default = "new_id")]
    pub id: Uuid,
    /// Stable across redelivery of the same provider message:
    /// `channel:account:provider_message_id`.
    pub idempotency_key: String,
    /// The channel.
    pub channel: Channel,
    /// The provider (`imap`, `twilio`, `vonage`, `meta`, `telegram`, `api`, …).
    pub provider: String,
    /// Our side of the channel: mailbox address, phone number, page id, bot id.
    pub account: String,
    /// Inbound or outbound.
    pub direction: Direction,
    /// The sender.
    pub from: Identity,
    /// The recipient.
    pub to: Identity,
    /// Provider time, when it gave one.
    #[serde(default)]
    pub sent_at: Option<DateTime<Utc>>,
    /// Switchboard's time of receipt. Threading windows are measured on it.
    #[serde(default = "now")]
    pub received_at: DateTime<Utc>,
    /// Subject (email).
    #[serde(default)]
    pub subject: Option<String>,
    /// Plain text body (HTML reduced to text).
    #[serde(default)]
    pub text: String,
    /// Attachments.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Threading hints.
    #[serde(default)]
    pub thread_hints: ThreadHints,
    /// The original payload.
    #[serde(default)]
    pub provider_raw: Option<ProviderRaw>,
    /// Log and metric correlation.
    #[serde(default)]
    pub trace: Trace,
    /// Set when a machine sent it (auto-reply, bounce): never answer it
    /// automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automated: Option<Automated>,
    /// Set when the envelope changes a stored message (edit, reaction,
    /// deletion) instead of being a message of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<MessageChange>,
}

impl Envelope {
    /// The identity on the customer's side: `from` for inbound, `to` for
    /// outbound.
    pub fn customer_identity(&self) -> &Identity {
        match self.direction {
            Direction::Inbound => &self.from,
            Direction::Outbound => &self.to,
        }
    }

    /// Checks what serde cannot: non-empty keys and accounts. Returns the
    /// field at fault.
    pub fn validate(&self) -> Result<(), crate::DecodeError> {
        let empty = |field: &str| crate::DecodeError::Invalid {
            field: field.to_owned(),
            reason: "must not be empty".to_owned(),
        };
        if self.idempotency_key.trim().is_empty() {
            return Err(empty("idempotency_key"));
        }
        if self.provider.trim().is_empty() {
            return Err(empty("provider"));
        }
        if self.account.trim().is_empty() {
            return Err(empty("account"));
        }
        Ok(())
    }

    /// Normalizes what the envelope carries beyond identities (which are
    /// normalized on construction): thread ids lose their angle brackets.
    pub fn normalize(&mut self) {
        self.thread_hints.normalize();
    }
}
