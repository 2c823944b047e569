//! Rows of the history, as the router and the API see them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

use switchboard_core::{Channel, Direction, Identity, MessageChangeKind, ThreadRule};
use uuid::Uuid;

/// Milliseconds since the Unix epoch: how the store keeps time.
pub type Millis = i64;

/// Converts a timestamp to store time.
pub fn millis(t: DateTime<Utc>) -> Millis {
    t.timestamp_millis()
}

/// Converts store time back to a timestamp.
pub fn from_millis(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A conversation's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationStatus {
    /// Taking messages.
    Open,
    /// Resolved; a later message may reopen it.
    Resolved,
}

impl ConversationStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConversationStatus::Open => "open",
            ConversationStatus::Resolved => "resolved",
        }
    }

    pub(crate) fn parse(s: &str) -> Self {
        if s == "resolved" {
            ConversationStatus::Resolved
        } else {
            ConversationStatus::Open
        }
    }
}

/// A conversation row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conversation {
    /// Its id.
    pub id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// The channel of its first message.
    pub channel: Channel,
    /// Our account on that channel.
    pub account: String,
    /// Open or resolved.
    pub status: ConversationStatus,
    /// Time of its first message.
    #[serde(serialize_with = "ser_millis")]
    pub opened_at: Millis,
    /// Time of its latest message (message time, not wall clock).
    #[serde(serialize_with = "ser_millis")]
    pub last_message_at: Millis,
    /// The channel the customer last wrote on.
    pub last_inbound_channel: Option<Channel>,
    /// Our account on that channel.
    pub last_inbound_account: Option<String>,
    /// When it was resolved.
    #[serde(serialize_with = "ser_opt_millis")]
    pub resolved_at: Option<Millis>,
    /// The normalized subject of its first email, for subject threading.
    pub subject_key: Option<String>,
}

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    /// The envelope.
    pub envelope: &'a switchboard_core::Envelope,
    /// Its customer, after identity resolution.
    pub customer_id: Uuid,
    /// Its conversation, after threading.
    pub conversation_id: Uuid,
    /// The rule that decided the conversation.
    pub rule: ThreadRule,
    /// Delivery status (outbound), if any.
    pub status: Option<&'a str>,
}

/// A stored message, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredMessage {
    /// Switchboard's id.
    pub id: Uuid,
    /// Position in the store; orders messages with equal times.
    pub seq: i64,
    /// The envelope's idempotency key.
    pub idempotency_key: String,
    /// Its customer.
    pub customer_id: Uuid,
    /// Its conversation.
    pub conversation_id: Uuid,
    /// Inbound or outbound.
    pub direction: Direction,
    /// The channel.
    pub channel: Channel,
    /// Our account.
    pub account: String,
    /// The sender.
    pub from: Identity,
    /// The recipient.
    pub to: Identity,
    /// When Switchboard received it.
    #[serde(serialize_with = "ser_millis")]
    pub received_at: Millis,
    /// The subject (email).
    pub subject: Option<String>,
    /// The text.
    pub text: String,
    /// The rule that threaded it.
    pub rule: ThreadRule,
    /// Delivery status, for outbound messages.
    pub status: Option<String>,
    /// The message's own id (email Message-ID).
    pub message_id: Option<String>,
    /// How many changes (edits, reactions, deletion) it had; each is kept
    /// as a version with the text it replaced.
    pub versions: i64,
    /// The current reactions: who (`kind:value`) reacted with what.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, String>,
    /// When its sender deleted it (its text is then empty; the versions
    /// keep it).
    #[serde(
        serialize_with = "ser_opt_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub deleted_at: Option<Millis>,
}

/// A change to record against a stored message.
#[derive(Debug, Clone)]
pub struct NewVersion<'a> {
    /// The message changed.
    pub message_id: Uuid,
    /// The change envelope's idempotency key: a change is applied once.
    pub idempotency_key: &'a str,
    /// Which change.
    pub kind: MessageChangeKind,
    /// Who made it.
    pub by: &'a Identity,
    /// The new text, for an edit.
    pub text: Option<&'a str>,
    /// The reaction, for a reaction.
    pub emoji: Option<&'a str>,
    /// When.
    pub at: Millis,
    /// The change envelope, JSON.
    pub envelope: &'a str,
}

/// One recorded change of a stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageVersion {
    /// 1 for the first change, counting up.
    pub version: i64,
    /// Which change.
    pub kind: MessageChangeKind,
    /// Who made it.
    pub by: Identity,
    /// The text the message had before the change.
    pub previous_text: String,
    /// The new text, for an edit.
    pub text: Option<String>,
    /// The reaction, for a reaction.
    pub emoji: Option<String>,
    /// When.
    #[serde(serialize_with = "ser_millis")]
    pub at: Millis,
}

/// A message's state after a change: its text, reactions (JSON) and
/// whether it is deleted. Shared by the backends so both apply a change
/// alike.
pub(crate) fn apply_version(
    text: &str,
    reactions: Option<&str>,
    v: &NewVersion<'_>,
) -> (String, Option<String>, bool) {
    let mut map: BTreeMap<String, String> = reactions
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default();
    let mut text = text.to_owned();
    let mut deleted = false;
    match v.kind {
        MessageChangeKind::Edit => text = v.text.unwrap_or_default().to_owned(),
        MessageChangeKind::Reaction => {
            map.insert(v.by.to_string(), v.emoji.unwrap_or_default().to_owned());
        }
        MessageChangeKind::ReactionRemoved => {
            map.remove(&v.by.to_string());
        }
        MessageChangeKind::Delete => {
            text.clear();
            deleted = true;
        }
    }
    let reactions = (!map.is_empty()).then(|| serde_json::to_string(&map).unwrap_or_default());
    (text, reactions, deleted)
}

/// Reactions as stored (JSON), read back.
pub(crate) fn parse_reactions(json: Option<&str>) -> BTreeMap<String, String> {
    json.and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default()
}

/// Where a message id was found: the message's conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef {
    /// The message.
    pub id: Uuid,
    /// Its conversation.
    pub conversation_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
}

/// A customer, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Customer {
    /// Its id.
    pub id: Uuid,
    /// When it was created.
    #[serde(serialize_with = "ser_millis")]
    pub created_at: Millis,
    /// Its identities.
    pub identities: Vec<Identity>,
    /// Customers merged into this one.
    pub merged_from: Vec<Uuid>,
    /// Set when the customer was erased; only the tombstone remains.
    #[serde(serialize_with = "ser_opt_millis")]
    pub erased_at: Option<Millis>,
}

/// A page of a customer's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// The customer (after following merges).
    pub customer_id: Uuid,
    /// Every conversation of the customer, newest activity first.
    pub conversations: Vec<Conversation>,
    /// A page of messages across those conversations, oldest first.
    pub messages: Vec<StoredMessage>,
    /// Pass as `after` to read the next page; absent on the last page.
    pub next_cursor: Option<Cursor>,
}

/// A position in a timeline: after the message with this time and `seq`.
/// Written as `TIME.SEQ` in URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The message's time.
    pub received_at: Millis,
    /// The message's `seq`.
    pub seq: i64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.received_at, self.seq)
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("cursor {s:?} is not of the form TIME.SEQ");
        let (t, q) = s.split_once('.').ok_or_else(bad)?;
        Ok(Cursor {
            received_at: t.parse().map_err(|_| bad())?,
            seq: q.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What an erase removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Erased {
    /// Messages removed.
    pub messages: u64,
    /// Identities removed.
    pub identities: u64,
    /// Conversations removed.
    pub conversations: u64,
}

fn ser_millis<S: serde::Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
    from_millis(*ms).serialize(s)
}

fn ser_opt_millis<S: serde::Serializer>(ms: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
    ms.map(from_millis).serialize(s)
}

/// Where a request to send stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundState {
    /// Recorded; about to be sent (or being sent: a crash here means the
    /// provider may or may not have it).
    Sending,
    /// The provider accepted it.
    Sent,
    /// It failed for good.
    Failed,
}

impl OutboundState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundState::Sending => "sending",
            OutboundState::Sent => "sent",
            OutboundState::Failed => "failed",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sending" => Some(OutboundState::Sending),
            "sent" => Some(OutboundState::Sent),
            "failed" => Some(OutboundState::Failed),
            _ => None,
        }
    }
}

/// A request to send, as the dispatcher recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundRecord {
    /// The request's idempotency key.
    pub idempotency_key: String,
    /// The message in the history.
    pub message_id: Uuid,
    /// Its conversation.
    pub conversation_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// The channel.
    pub channel: Channel,
    /// Our account.
    pub account: String,
    /// The recipient.
    pub to: Identity,
    /// Where it stands.
    pub state: OutboundState,
    /// Attempts made.
    pub attempts: u32,
    /// The provider's id, once sent.
    pub provider_message_id: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was first recorded.
    pub created_at: Millis,
    /// When it last changed.
    pub updated_at: Millis,
}

/// The latest message a customer sent, in some scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastInbound {
    /// Its conversation.
    pub conversation_id: Uuid,
    /// Its channel.
    pub channel: Channel,
    /// Our account it was sent to.
    pub account: String,
    /// The customer's identity it came from.
    pub from: Identity,
    /// Its time.
    pub at: Millis,
}
