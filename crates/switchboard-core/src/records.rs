//! The records on Switchboard's topics besides the envelope: outbound
//! requests, events, delivery statuses, commands and dead letters.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::{Attachment, Channel};
use crate::identity::Identity;
use crate::schema_tag;

schema_tag!(
    /// `switchboard.outbound.v1`.
    OutboundSchema,
    "switchboard.outbound.v1"
);
schema_tag!(
    /// `switchboard.event.v1`.
    EventSchema,
    "switchboard.event.v1"
);
schema_tag!(
    /// `switchboard.delivery.v1`.
    DeliverySchema,
    "switchboard.delivery.v1"
);
schema_tag!(
    /// `switchboard.command.v1`.
    CommandSchema,
    "switchboard.command.v1"
);
schema_tag!(
    /// `switchboard.dlq.v1`.
    DeadLetterSchema,
    "switchboard.dlq.v1"
);

/// A provider template, for channels that require one outside their
/// customer-service window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The template's name at the provider.
    pub name: String,
    /// Its language code.
    #[serde(default)]
    pub language: Option<String>,
    /// Positional parameters.
    #[serde(default)]
    pub params: Vec<String>,
}

/// A request to send a message: `switchboard.outbound.v1`. Exactly one of
/// `conversation_id`, `customer_id` and `to` names the recipient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboundRequest {
    /// Always `switchboard.outbound.v1`.
    pub schema: OutboundSchema,
    /// The caller's key: a request redelivered with a known key is not sent
    /// again.
    pub idempotency_key: String,
    /// Switchboard's id for the message to send. When absent it is derived
    /// from the idempotency key (UUIDv5), so every copy of a request names
    /// the same message; `POST /v1/messages` answers with it.
    #[serde(default)]
    pub message_id: Option<Uuid>,
    /// Reply in this conversation.
    #[serde(default)]
    pub conversation_id: Option<Uuid>,
    /// Write to this customer.
    #[serde(default)]
    pub customer_id: Option<Uuid>,
    /// Write to this identity.
    #[serde(default)]
    pub to: Option<Identity>,
    /// The channel; by default the one the customer last wrote on in the
    /// conversation.
    #[serde(default)]
    pub channel: Option<Channel>,
    /// Our account to send from; by default the conversation's.
    #[serde(default)]
    pub account: Option<String>,
    /// Subject (email).
    #[serde(default)]
    pub subject: Option<String>,
    /// The text.
    #[serde(default)]
    pub text: String,
    /// Attachments.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// A template, where the channel needs one.
    #[serde(default)]
    pub template: Option<Template>,
}

impl OutboundRequest {
    /// Checks what serde cannot: the key, and exactly one recipient.
    pub fn validate(&self) -> Result<(), crate::DecodeError> {
        if self.idempotency_key.trim().is_empty() {
            return Err(crate::DecodeError::Invalid {
                field: "idempotency_key".into(),
                reason: "must not be empty".into(),
            });
        }
        let named = [
            self.conversation_id.is_some(),
            self.customer_id.is_some(),
            self.to.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count();
        if named != 1 {
            return Err(crate::DecodeError::Invalid {
                field: "conversation_id".into(),
                reason: "exactly one of conversation_id, customer_id and to must be given".into(),
            });
        }
        if self.text.is_empty() && self.template.is_none() && self.attachments.is_empty() {
            return Err(crate::DecodeError::Invalid {
                field: "text".into(),
                reason: "a message needs text, a template or an attachment".into(),
            });
        }
        Ok(())
    }
}

/// The rule that decided a message's conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThreadRule {
    /// Rule 1: `In-Reply-To`.
    InReplyTo,
    /// Rule 1: `References`, newest first.
    References,
    /// Rule 1, out of order: a stored message names this one as its parent.
    ReferencedBy,
    /// Rule 1: a provider thread id.
    ProviderThread,
    /// Rule 2: `reply+<conversation>@` addressing.
    ReplyAddress,
    /// Rule 3: same customer, channel account, within the inactivity window.
    Window,
    /// Rule 4: cross-channel continuation.
    Continuation,
    /// Rule 5 opened a new conversation.
    New,
    /// Named explicitly (an outbound reply to a conversation).
    Explicit,
}

impl ThreadRule {
    /// The wire name, as stored and used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadRule::InReplyTo => "in_reply_to",
            ThreadRule::References => "references",
            ThreadRule::ReferencedBy => "referenced_by",
            ThreadRule::ProviderThread => "provider_thread",
            ThreadRule::ReplyAddress => "reply_address",
            ThreadRule::Window => "window",
            ThreadRule::Continuation => "continuation",
            ThreadRule::New => "new",
            ThreadRule::Explicit => "explicit",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            ThreadRule::InReplyTo,
            ThreadRule::References,
            ThreadRule::ReferencedBy,
            ThreadRule::ProviderThread,
            ThreadRule::ReplyAddress,
            ThreadRule::Window,
            ThreadRule::Continuation,
            ThreadRule::New,
            ThreadRule::Explicit,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// What happened, on `events.v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A customer's message was stored.
    #[serde(rename = "message.received")]
    MessageReceived {
        /// The message.
        message_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// Its channel.
        channel: Channel,
        /// The rule that threaded it.
        rule: ThreadRule,
        /// The conversation was reopened by this message.
        reopened: bool,
        /// A machine sent it (an auto-reply, a bounce): do not answer it
        /// automatically. Absent means false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        automated: bool,
    },
    /// One of our messages was stored as sent.
    #[serde(rename = "message.sent")]
    MessageSent {
        /// The message.
        message_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// Its channel.
        channel: Channel,
    },
    /// A stored message's text was edited; the earlier text is kept as a
    /// version.
    #[serde(rename = "message.edited")]
    MessageEdited {
        /// The message.
        message_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// The change.
        change: crate::MessageChange,
    },
    /// A reaction to a stored message was set or removed.
    #[serde(rename = "message.reacted")]
    MessageReacted {
        /// The message.
        message_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// Who reacted.
        by: Identity,
        /// The change.
        change: crate::MessageChange,
    },
    /// A stored message was deleted by its sender; its text is kept as a
    /// version.
    #[serde(rename = "message.deleted")]
    MessageDeleted {
        /// The message.
        message_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// The change.
        change: crate::MessageChange,
    },
    /// A conversation was opened.
    #[serde(rename = "conversation.opened")]
    ConversationOpened {
        /// The conversation.
        conversation_id: Uuid,
        /// The channel of its first message.
        channel: Channel,
    },
    /// A resolved conversation was reopened.
    #[serde(rename = "conversation.reopened")]
    ConversationReopened {
        /// The conversation.
        conversation_id: Uuid,
    },
    /// A conversation was resolved.
    #[serde(rename = "conversation.resolved")]
    ConversationResolved {
        /// The conversation.
        conversation_id: Uuid,
    },
    /// A customer was created for a new identity.
    #[serde(rename = "customer.created")]
    CustomerCreated {
        /// The identity that created it.
        identity: Identity,
    },
    /// Two customers became one.
    #[serde(rename = "customer.merged")]
    CustomerMerged {
        /// The customer kept.
        survivor: Uuid,
        /// The customer merged into it (its id now redirects).
        merged: Uuid,
        /// Why: the evidence.
        evidence: String,
    },
    /// An identity was linked to a customer.
    #[serde(rename = "identity.linked")]
    IdentityLinked {
        /// The identity.
        identity: Identity,
        /// Why.
        evidence: String,
    },
    /// An identity was split off into a customer of its own.
    #[serde(rename = "identity.unlinked")]
    IdentityUnlinked {
        /// The identity.
        identity: Identity,
        /// The customer it now belongs to.
        new_customer: Uuid,
    },
    /// A customer was erased; a tombstone remains.
    #[serde(rename = "customer.erased")]
    CustomerErased {},
}

impl EventKind {
    /// The wire name of the event type.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::MessageReceived { .. } => "message.received",
            EventKind::MessageSent { .. } => "message.sent",
            EventKind::MessageEdited { .. } => "message.edited",
            EventKind::MessageReacted { .. } => "message.reacted",
            EventKind::MessageDeleted { .. } => "message.deleted",
            EventKind::ConversationOpened { .. } => "conversation.opened",
            EventKind::ConversationReopened { .. } => "conversation.reopened",
            EventKind::ConversationResolved { .. } => "conversation.resolved",
            EventKind::CustomerCreated { .. } => "customer.created",
            EventKind::CustomerMerged { .. } => "customer.merged",
            EventKind::IdentityLinked { .. } => "identity.linked",
            EventKind::IdentityUnlinked { .. } => "identity.unlinked",
            EventKind::CustomerErased {} => "customer.erased",
        }
    }
}

/// An event on `events.v1`, keyed by customer id. Delivered at least once:
/// consumers deduplicate on `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// Always `switchboard.event.v1`.
    pub schema: EventSchema,
    /// The event's id, stable across redelivery.
    pub id: Uuid,
    /// The customer the event is about.
    pub customer_id: Uuid,
    /// When it happened (the message's time for message events).
    pub at: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A delivery status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Accepted by Switchboard, not yet sent.
    Queued,
    /// Accepted by the provider.
    Sent,
    /// Delivered to the customer's device.
    Delivered,
    /// Read by the customer.
    Read,
    /// Failed; see the error.
    Failed,
}

impl DeliveryState {
    /// The name it has on the wire (`delivered`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Sent => "sent",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Read => "read",
            DeliveryState::Failed => "failed",
        }
    }
}

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryError {
    /// What went wrong, in words.
    pub reason: String,
    /// A provider error code, when it gave one.
    #[serde(default)]
    pub code: Option<String>,
    /// Whether trying again could help.
    pub retryable: bool,
}

/// A delivery status on `delivery.v1`, keyed by conversation id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// Always `switchboard.delivery.v1`.
    pub schema: DeliverySchema,
    /// The status event's id.
    pub id: Uuid,
    /// The message the status is about.
    pub message_id: Uuid,
    /// Its conversation.
    pub conversation_id: Uuid,
    /// The outbound request's idempotency key.
    pub idempotency_key: String,
    /// The channel.
    pub channel: Channel,
    /// The state.
    pub status: DeliveryState,
    /// When.
    pub at: DateTime<Utc>,
    /// The provider's id for the message, once sent.
    #[serde(default)]
    pub provider_message_id: Option<String>,
    /// Attempt number (1-based) for `sent` and `failed`.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Why, for `failed`.
    #[serde(default)]
    pub error: Option<DeliveryError>,
    /// How many parts the provider split the message into (SMS segments),
    /// for `sent`, where the provider says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<u32>,
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type")]
pub enum CommandKind {
    /// Two identities belong to one person; their customers merge if they
    /// differ.
    #[serde(rename = "identity.link")]
    IdentityLink {
        /// One identity.
        a: Identity,
        /// The other.
        b: Identity,
        /// Why the caller knows (stored with the merge).
        evidence: String,
    },
    /// Split an identity off into a customer of its own, undoing a merge.
    #[serde(rename = "identity.unlink")]
    IdentityUnlink {
        /// The identity.
        identity: Identity,
        /// Why.
        #[serde(default)]
        evidence: Option<String>,
    },
    /// Merge one customer into another.
    #[serde(rename = "customer.merge")]
    CustomerMerge {
        /// The customer kept.
        survivor: Uuid,
        /// The customer merged into it.
        merged: Uuid,
        /// Why.
        evidence: String,
    },
    /// Resolve a conversation.
    #[serde(rename = "conversation.resolve")]
    ConversationResolve {
        /// The conversation.
        conversation_id: Uuid,
    },
    /// Reopen a resolved conversation.
    #[serde(rename = "conversation.reopen")]
    ConversationReopen {
        /// The conversation.
        conversation_id: Uuid,
    },
    /// A later status of one of our messages, reported by the receiving
    /// side (the api channel's receiver, a provider callback).
    #[serde(rename = "message.status")]
    MessageStatus {
        /// Switchboard's id of the outbound message.
        message_id: Uuid,
        /// `delivered`, `read` or `failed`.
        status: DeliveryState,
        /// The provider's id for the message, if it gave one.
        #[serde(default)]
        provider_message_id: Option<String>,
        /// Why, for `failed`.
        #[serde(default)]
        error: Option<DeliveryError>,
    },
    /// A later status of messages we sent, named by the provider's ids (or,
    /// for a read receipt, by its recipient and a time), as platforms report
    /// them without our id (Messenger and Instagram `delivery`/`read`).
    /// Resolved against the shared history, so any instance can take it;
    /// ids that name no message of ours are skipped.
    #[serde(rename = "message.provider_status")]
    ProviderStatus {
        /// The channel.
        channel: Channel,
        /// Our account on it (page id, Instagram account id).
        account: String,
        /// `delivered`, `read` or `failed`.
        status: DeliveryState,
        /// The provider's ids of the messages.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        provider_message_ids: Vec<String>,
        /// With `read_up_to`: every message we sent to this recipient on
        /// the account up to that time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recipient: Option<Identity>,
        /// A read watermark.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read_up_to: Option<DateTime<Utc>>,
        /// Why, for `failed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<DeliveryError>,
    },
    /// Erase a customer's messages and identities, leaving a tombstone.
    #[serde(rename = "customer.erase")]
    CustomerErase {
        /// The customer.
        customer_id: Uuid,
    },
}

/// A command on `commands.v1`, keyed by customer id (or identity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Command {
    /// Always `switchboard.command.v1`.
    pub schema: CommandSchema,
    /// The command's id; a command redelivered with a known id is applied
    /// once.
    #[serde(default = "Uuid::now_v7")]
    pub id: Uuid,
    /// When the caller issued it; time-dependent effects use it.
    #[serde(default = "Utc::now")]
    pub at: DateTime<Utc>,
    /// What to do.
    #[serde(flatten)]
    pub kind: CommandKind,
}

impl Command {
    /// A `message.status` command for what a provider reported about one of
    /// our messages. Its id is derived from `namespace` (the adapter's own)
    /// and `source:provider_message_id:status`, so a report the provider
    /// delivers twice is applied once.
    pub fn reported_status(
        namespace: &Uuid,
        source: &str,
        message_id: Uuid,
        provider_message_id: &str,
        status: DeliveryState,
        error: Option<DeliveryError>,
        at: DateTime<Utc>,
    ) -> Command {
        let name = format!("{source}:{provider_message_id}:{}", status.as_str());
        Command {
            schema: CommandSchema::V1,
            id: Uuid::new_v5(namespace, name.as_bytes()),
            at,
            kind: CommandKind::MessageStatus {
                message_id,
                status,
                provider_message_id: Some(provider_message_id.to_owned()),
                error,
            },
        }
    }

    /// The key it travels under on `commands.v1`: the customer where the
    /// command names one (or the identity, conversation or message it is
    /// about), so one customer's commands stay in order.
    pub fn partition_key(&self) -> String {
        match &self.kind {
            CommandKind::IdentityLink { a, .. } => a.key(),
            CommandKind::IdentityUnlink { identity, .. } => identity.key(),
            CommandKind::CustomerMerge { survivor, .. } => survivor.to_string(),
            CommandKind::ConversationResolve { conversation_id }
            | CommandKind::ConversationReopen { conversation_id } => conversation_id.to_string(),
            CommandKind::CustomerErase { customer_id } => customer_id.to_string(),
            CommandKind::MessageStatus { message_id, .. } => message_id.to_string(),
            CommandKind::ProviderStatus {
                recipient: Some(r), ..
            } => r.key(),
            CommandKind::ProviderStatus {
                channel,
                account,
                provider_message_ids,
                ..
            } => format!(
                "{channel}:{account}:{}",
                provider_message_ids.first().map_or("", String::as_str)
            ),
        }
    }
}

/// A record that could not be processed, on `dlq.v1`, keyed by its original
/// key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// Always `switchboard.dlq.v1`.
    pub schema: DeadLetterSchema,
    /// The dead letter's id.
    pub id: Uuid,
    /// Where the record came from.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset.
    pub offset: u64,
    /// The consumer group that gave up on it.
    pub group: String,
    /// Its key, base64.
    pub key_base64: String,
    /// Its payload, base64 (exact bytes, for redrive).
    pub payload_base64: String,
    /// Why it could not be processed.
    pub error: String,
    /// Whether processing it again, unchanged, could succeed.
    pub retryable: bool,
    /// When it was dead-lettered.
    pub at: DateTime<Utc>,
}

impl DeadLetter {
    /// The dead letter for a record that `group` could not process.
    pub fn for_record(record: &crate::Record, group: &str, error: String, retryable: bool) -> Self {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        DeadLetter {
            schema: DeadLetterSchema::V1,
            id: Uuid::now_v7(),
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            group: group.to_owned(),
            key_base64: b64.encode(&record.key),
            payload_base64: b64.encode(&record.payload),
            error,
            retryable,
            at: Utc::now(),
        }
    }

    /// The original key and payload, for redrive.
    pub fn original(&self) -> Result<(Vec<u8>, Vec<u8>), base64::DecodeError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok((
            b64.decode(&self.key_base64)?,
            b64.decode(&self.payload_base64)?,
        ))
    }
}

schema_tag!(
    /// `switchboard.api-message.v1`.
    ApiMessageSchema,
    "switchboard.api-message.v1"
);

/// What the api channel POSTs to another system's URL: one message for it to
/// deliver. Signed; see `docs/integration.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiMessage {
    /// Always `switchboard.api-message.v1`.
    pub schema: ApiMessageSchema,
    /// Switchboard's id for the message.
    pub message_id: Uuid,
    /// The request's idempotency key, also sent as the `Idempotency-Key`
    /// header: a receiver that sees a key twice must treat the second as the
    /// same message.
    pub idempotency_key: String,
    /// The conversation.
    pub conversation_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Our account name on the api channel.
    pub account: String,
    /// The recipient.
    pub to: Identity,
    /// Subject, if any.
    #[serde(default)]
    pub subject: Option<String>,
    /// The text.
    pub text: String,
    /// Attachments.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// A template, if the request named one.
    #[serde(default)]
    pub template: Option<Template>,
    /// Attempt number, from 1.
    pub attempt: u32,
}
