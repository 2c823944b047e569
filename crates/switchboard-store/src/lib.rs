//! The per-customer conversation history.
//!
//! Contract: every routing step runs in one transaction ([`Store::begin`] …
//! [`Tx::commit`]), so a crash leaves either all of a step's rows or none.
//! Messages are unique on their envelope's idempotency key: the router asks
//! [`Tx::message_by_key`] first, and the unique index refuses a second copy
//! even if it did not, so a redelivered message changes nothing. Events are
//! written to an outbox in the same transaction as the effect they describe
//! and published after commit, so none is lost and none describes an effect
//! that was rolled back. Migrations are versioned and applied at open.
//!
//! The router owns the rules (identity, threading); this crate only answers
//! the questions the rules ask and stores the answers.

pub mod model;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use switchboard_core::{Channel, Direction, Identity, Retryable};
use uuid::Uuid;

pub use model::{
    Conversation, ConversationStatus, Cursor, Customer, Erased, LastInbound, MessageRef,
    MessageVersion, Millis, NewMessage, NewVersion, OutboundRecord, OutboundState, StoredMessage,
    Timeline, from_millis, millis,
};
#[cfg(feature = "postgres")]
pub use postgres::{DEFAULT_OUTBOX_LEASE, PgStore, PgTestSchema, TEST_DATABASE_ENV};
pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is busy, locked or the disk failed; trying again may help.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A constraint or data error: the same write will fail again.
    #[error("store rejected the write: {0}")]
    Rejected(String),
    /// The database is of a newer schema than this build knows.
    #[error("store schema version {found} is newer than this build's {supported}")]
    TooNew {
        /// Version found in the database.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
}

impl Retryable for StoreError {
    fn retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// An event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Outbox position.
    pub seq: i64,
    /// Topic to publish to.
    pub topic: String,
    /// Partition key.
    pub key: Vec<u8>,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Where an IMAP poller stands in one mailbox: the mailbox's UIDVALIDITY and
/// the highest UID whose message (and every one below it) was durably
/// accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxCheckpoint {
    /// The mailbox's UIDVALIDITY when `last_uid` was recorded.
    pub uidvalidity: u32,
    /// The highest UID processed.
    pub last_uid: u32,
}

/// The history store.
pub trait Store: Send + Sync + 'static {
    /// Starts a write transaction. Only one runs at a time.
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError>;

    /// A customer by id, following merges to the survivor.
    fn customer(&self, id: Uuid) -> Result<Option<Customer>, StoreError>;

    /// The customer owning an identity.
    fn customer_by_identity(&self, identity: &Identity) -> Result<Option<Customer>, StoreError>;

    /// A page of a customer's timeline: messages after the cursor, oldest
    /// first, at most `limit`.
    fn timeline(
        &self,
        customer: Uuid,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Option<Timeline>, StoreError>;

    /// A conversation with all its messages, oldest first.
    fn conversation(
        &self,
        id: Uuid,
    ) -> Result<Option<(Conversation, Vec<StoredMessage>)>, StoreError>;

    /// The dispatcher's record of a request, by idempotency key.
    fn outbound_by_key(&self, key: &str) -> Result<Option<OutboundRecord>, StoreError>;

    /// Events committed but not yet published, oldest first.
    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError>;

    /// Forgets published outbox records up to and including `seq`.
    fn outbox_done(&self, seq: i64) -> Result<(), StoreError>;

    /// Whether the store answers (for `/readyz`).
    fn ping(&self) -> Result<(), StoreError>;

    /// Whether the history holds nothing (no customer, no message); replay
    /// rebuilds only into an empty store.
    fn is_empty(&self) -> Result<bool, StoreError> {
        Err(StoreError::Rejected(
            "this store cannot tell whether it is empty".into(),
        ))
    }

    /// The recorded changes of a message, oldest first.
    fn message_versions(&self, message_id: Uuid) -> Result<Vec<MessageVersion>, StoreError> {
        let _ = message_id;
        Err(StoreError::Rejected(
            "this store keeps no message versions".into(),
        ))
    }

    /// The IMAP checkpoint of `mailbox` of email `account`, if one was set.
    fn mailbox_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<MailboxCheckpoint>, StoreError> {
        let _ = (account, mailbox);
        Err(StoreError::Rejected(
            "this store keeps no mailbox checkpoints".into(),
        ))
    }

    /// Records the IMAP checkpoint of `mailbox` of email `account`,
    /// replacing the previous one, durably.
    fn set_mailbox_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
        checkpoint: MailboxCheckpoint,
    ) -> Result<(), StoreError> {
        let _ = (account, mailbox, checkpoint);
        Err(StoreError::Rejected(
            "this store keeps no mailbox checkpoints".into(),
        ))
    }
}

/// One write transaction. Dropped without [`Tx::commit`], it rolls back.
pub trait Tx {
    /// Says which idempotency keys and identities this transaction is about
    /// to look up ([`Tx::message_by_key`], [`Tx::owner_of`]), so a store
    /// that pays a round trip per statement can read them all at once. The
    /// answers of those lookups stay exactly what they would be without
    /// it, this transaction's own writes included. The default does nothing.
    fn prefetch(&mut self, keys: &[&str], identities: &[&Identity]) -> Result<(), StoreError> {
        let _ = (keys, identities);
        Ok(())
    }
    /// The stored message with this idempotency key, if any.
    fn message_by_key(&mut self, key: &str) -> Result<Option<MessageRef>, StoreError>;
    /// The customer owning an identity.
    fn owner_of(&mut self, identity: &Identity) -> Result<Option<Uuid>, StoreError>;
    /// Follows merges from a customer id to its survivor; `None` if unknown.
    fn resolve_customer(&mut self, id: Uuid) -> Result<Option<Uuid>, StoreError>;
    /// Whether the customer was erased.
    fn is_erased(&mut self, id: Uuid) -> Result<bool, StoreError>;
    /// Creates a customer.
    fn create_customer(&mut self, id: Uuid, at: Millis) -> Result<(), StoreError>;
    /// Gives an identity to a customer (creating or moving it), recording why.
    fn attach_identity(
        &mut self,
        identity: &Identity,
        customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError>;
    /// A customer's identities.
    fn identities_of(&mut self, customer: Uuid) -> Result<Vec<Identity>, StoreError>;
    /// A conversation by id.
    fn conversation(&mut self, id: Uuid) -> Result<Option<Conversation>, StoreError>;
    /// The conversation of the customer's message with this Message-ID.
    fn conversation_by_message_id(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError>;
    /// The conversation of a customer's message whose In-Reply-To or
    /// References names `message_id` (a reply that arrived before its parent).
    fn conversation_referencing(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError>;
    /// The conversation of the customer's latest message with this provider
    /// thread id on this channel.
    fn conversation_by_provider_thread(
        &mut self,
        customer: Uuid,
        channel: Channel,
        thread_id: &str,
    ) -> Result<Option<Uuid>, StoreError>;
    /// The customer's conversation with the latest message, optionally only
    /// on one channel account and with one subject key.
    fn latest_conversation(
        &mut self,
        customer: Uuid,
        channel_account: Option<(Channel, &str)>,
        subject_key: Option<&str>,
    ) -> Result<Option<Conversation>, StoreError>;
    /// Stores a new conversation.
    fn insert_conversation(&mut self, c: &Conversation) -> Result<(), StoreError>;
    /// Updates a conversation's status and times.
    fn update_conversation(&mut self, c: &Conversation) -> Result<(), StoreError>;
    /// Stores a message; returns its `seq`.
    fn insert_message(&mut self, m: &NewMessage<'_>) -> Result<i64, StoreError>;
    /// The dispatcher's record of a request, by idempotency key.
    fn outbound(&mut self, key: &str) -> Result<Option<OutboundRecord>, StoreError>;
    /// Stores or updates the record of a request; `request` (the request as
    /// received, JSON) is kept from the first write.
    fn put_outbound(&mut self, record: &OutboundRecord, request: &str) -> Result<(), StoreError>;
    /// The dispatcher's record of the request that sent a message.
    fn outbound_by_message(
        &mut self,
        message_id: Uuid,
    ) -> Result<Option<OutboundRecord>, StoreError>;
    /// A message's delivery status.
    fn message_status(&mut self, message_id: Uuid) -> Result<Option<String>, StoreError>;
    /// The request as received, for a record.
    fn outbound_request(&mut self, key: &str) -> Result<Option<String>, StoreError>;
    /// The customer's latest inbound message, optionally within one
    /// conversation and on one channel.
    fn last_inbound(
        &mut self,
        customer: Uuid,
        conversation: Option<Uuid>,
        channel: Option<Channel>,
    ) -> Result<Option<LastInbound>, StoreError>;
    /// Updates an outbound message's delivery status.
    fn set_message_status(&mut self, id: Uuid, status: &str) -> Result<(), StoreError>;
    /// Merges `merged` into `survivor`: identities, conversations and messages
    /// move; `merged` redirects; the merge is recorded with its evidence.
    fn merge_customers(
        &mut self,
        survivor: Uuid,
        merged: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError>;
    /// Moves an identity to `new_customer` with the conversations in which
    /// every customer-side message is that identity's.
    fn split_identity(
        &mut self,
        identity: &Identity,
        new_customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError>;
    /// Removes a customer's messages, conversations and identities, leaving
    /// a tombstone.
    fn erase_customer(&mut self, id: Uuid, at: Millis) -> Result<Erased, StoreError>;
    /// Whether a command id was applied already; marks it applied if not.
    fn first_application(&mut self, command_id: Uuid, at: Millis) -> Result<bool, StoreError>;
    /// Queues a record for publication after commit.
    fn push_outbox(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), StoreError>;
    /// Marks a point to return to with [`Tx::rollback_to_savepoint`].
    fn savepoint(&mut self) -> Result<(), StoreError>;
    /// Keeps everything since the last savepoint.
    fn release_savepoint(&mut self) -> Result<(), StoreError>;
    /// Undoes everything since the last savepoint.
    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError>;
    /// The email Message-IDs (header ids) of a conversation's messages,
    /// newest first, at most `limit`, each with its direction: what a reply
    /// names in In-Reply-To and References.
    fn thread_message_ids(
        &mut self,
        conversation: Uuid,
        limit: usize,
    ) -> Result<Vec<(Direction, String)>, StoreError> {
        let _ = (conversation, limit);
        Ok(Vec::new())
    }
    /// A conversation's first reply that went out (an outbound message
    /// whose status is `sent`, `delivered` or `read`: its id), and the time
    /// of its first inbound message, for the first-response time.
    fn first_reply(
        &mut self,
        conversation: Uuid,
    ) -> Result<(Option<Uuid>, Option<Millis>), StoreError> {
        let _ = conversation;
        Ok((None, None))
    }
    /// Our messages to `to` on one channel account that were sent (the
    /// provider took them) up to `up_to` and are not yet read or failed,
    /// oldest first, at most `limit`: what a read watermark covers.
    fn sent_unread_up_to(
        &mut self,
        channel: Channel,
        account: &str,
        to: &Identity,
        up_to: Millis,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let _ = (channel, account, to, up_to, limit);
        Ok(Vec::new())
    }
    /// The provider thread (`thread_hints.provider_thread_id`) of the
    /// customer's newest message on `channel` in the conversation, if that
    /// message had one: where a reply to a group conversation goes.
    fn latest_provider_thread(
        &mut self,
        conversation: Uuid,
        channel: Channel,
    ) -> Result<Option<String>, StoreError> {
        let _ = (conversation, channel);
        Ok(None)
    }
    /// The stored message a provider id names on one channel account: a
    /// message whose own id (`thread_hints.message_id`) it is, or one of
    /// ours the provider answered with it.
    fn message_by_provider_id(
        &mut self,
        channel: Channel,
        account: &str,
        provider_id: &str,
    ) -> Result<Option<MessageRef>, StoreError> {
        let _ = (channel, account, provider_id);
        Err(StoreError::Rejected(
            "this store keeps no message versions".into(),
        ))
    }
    /// Records a change of a stored message as its next version and applies
    /// it: an edit replaces the text, a reaction sets (or removes) the
    /// sender's reaction, a deletion empties the text and marks the message
    /// deleted; the text replaced is kept in the version. Returns the
    /// version, or `None` when a change with this idempotency key was
    /// recorded already (nothing changes).
    fn apply_change(&mut self, v: &NewVersion<'_>) -> Result<Option<i64>, StoreError> {
        let _ = v;
        Err(StoreError::Rejected(
            "this store keeps no message versions".into(),
        ))
    }
    /// Commits, durably.
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// The subject key of an email: the subject with reply and forward prefixes
/// (`Re:`, `Fwd:`, `AW:`, `SV:`, `Réf:` …, repeated, any case, with
/// `[n]` counters) and surrounding white space removed, lowercased.
pub fn subject_key(subject: &str) -> String {
    const PREFIXES: [&str; 14] = [
        "re", "fw", "fwd", "aw", "wg", "sv", "vs", "réf", "ref", "tr", "rv", "antw", "odp", "r",
    ];
    let lower = subject.trim().to_lowercase();
    let mut s = lower.as_str();
    'strip: loop {
        for p in PREFIXES {
            if let Some(rest) = s.strip_prefix(p) {
                let rest = rest.trim_start();
                // Optional counter: "Re[2]:" or "Re(2):".
                let rest = match rest.chars().next() {
                    Some('[' | '(') => match rest.find([']', ')']) {
                        Some(end) => rest[end + 1..].trim_start(),
                        None => rest,
                    },
                    _ => rest,
                };
                if let Some(after) = rest.strip_prefix(':').or_else(|| rest.strip_prefix('：')) {
                    s = after.trim_start();
                    continue 'strip;
                }
            }
        }
        break;
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::subject_key;

    #[test]
    fn subject_keys_strip_reply_prefixes() {
        let same = [
            "Order 1042",
            "Re: Order 1042",
            "RE: re: Order 1042",
            "AW: Order  1042",
            "SV: Fwd: order 1042",
            "Réf : Order 1042",
            "Re[2]: Order 1042",
            "  Fw: Order 1042 ",
        ];
        for s in same {
            assert_eq!(subject_key(s), "order 1042", "{s}");
        }
        assert_eq!(subject_key("Reorder 1042"), "reorder 1042");
        assert_eq!(subject_key("Re:"), "");
    }
}
