//! One routing step: identity resolution, threading, storage and events for
//! one envelope or one command, inside a store transaction.

use std::time::Duration;

use switchboard_core::records::EventSchema;
use switchboard_core::{
    Command, CommandKind, Direction, Envelope, Event, EventKind, Identity, IdentityKind,
    MessageChange, MessageChangeKind, Retryable, ThreadRule,
};
use switchboard_store::{
    Conversation, ConversationStatus, Millis, NewMessage, NewVersion, StoreError, Tx, millis,
    subject_key,
};
use uuid::Uuid;

use std::sync::{Arc, PoisonError, RwLock};

use crate::policy::Policy;

/// Why a routing step failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The store failed; the step can be retried.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record asks for something impossible; retrying cannot help.
    #[error("{0}")]
    Rejected(String),
}

impl Retryable for RouteError {
    fn retryable(&self) -> bool {
        match self {
            RouteError::Store(e) => e.retryable(),
            RouteError::Rejected(_) => false,
        }
    }
}

/// Runs one record's step inside a savepoint of `tx`: kept on success,
/// rolled back when the record is refused (`Err(reason)` for the dead-letter
/// topic). A retryable store error ends the whole batch, which is retried.
pub fn in_savepoint<T>(
    tx: &mut dyn Tx,
    step: impl FnOnce(&mut dyn Tx) -> Result<T, RouteError>,
) -> Result<Result<T, String>, StoreError> {
    tx.savepoint()?;
    match step(&mut *tx) {
        Ok(v) => {
            tx.release_savepoint()?;
            Ok(Ok(v))
        }
        Err(RouteError::Store(e)) if e.retryable() => Err(e),
        Err(e) => {
            tx.rollback_to_savepoint()?;
            Ok(Err(e.to_string()))
        }
    }
}

/// What routing an envelope did.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// The message was stored.
    Stored {
        /// Its id.
        message_id: Uuid,
        /// Its customer.
        customer_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// The rule that decided.
        rule: ThreadRule,
        /// The message's channel.
        channel: switchboard_core::Channel,
        /// Events written to the outbox.
        events: Vec<Event>,
    },
    /// The envelope changed a stored message (edit, reaction, deletion),
    /// recorded as the message's next version.
    Changed {
        /// The message changed.
        message_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// The version recorded (1 for the first change).
        version: i64,
        /// The message's channel.
        channel: switchboard_core::Channel,
        /// Events written to the outbox.
        events: Vec<Event>,
    },
    /// A message (or a change) with the same idempotency key was stored
    /// before; nothing changed.
    Duplicate {
        /// The stored message's id.
        message_id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
    },
}

/// Identity resolution and threading. Holds no state besides its policy:
/// everything it decides is read from and written to the transaction.
#[derive(Debug, Clone)]
pub struct Router {
    /// Shared by every clone, so a reload reaches every loop.
    policy: Arc<RwLock<Policy>>,
    events_topic: String,
    delivery_topic: String,
    sla: Option<crate::sla::SlaMetrics>,
}

fn window_ms(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The other phone-number kind: a WhatsApp id is a phone number.
fn phone_twin(identity: &Identity) -> Option<Identity> {
    let kind = match identity.kind {
        IdentityKind::Phone => IdentityKind::Whatsapp,
        IdentityKind::Whatsapp => IdentityKind::Phone,
        _ => return None,
    };
    Some(Identity {
        kind,
        value: identity.value.clone(),
    })
}

/// `reply+<conversation id>@…` addressing.
fn reply_token(to: &Identity) -> Option<Uuid> {
    if to.kind != IdentityKind::Email {
        return None;
    }
    let local = to.value.split('@').next()?;
    let token = local.strip_prefix("reply+")?;
    Uuid::parse_str(token).ok()
}

struct Events<'a> {
    topic: &'a str,
    out: Vec<Event>,
}

impl Events<'_> {
    fn emit(
        &mut self,
        tx: &mut dyn Tx,
        customer_id: Uuid,
        at: Millis,
        kind: EventKind,
    ) -> Result<(), StoreError> {
        let event = Event {
            schema: EventSchema::V1,
            id: Uuid::now_v7(),
            customer_id,
            at: switchboard_store::from_millis(at),
            kind,
        };
        let payload =
            serde_json::to_vec(&event).map_err(|e| StoreError::Rejected(e.to_string()))?;
        tx.push_outbox(self.topic, customer_id.to_string().as_bytes(), &payload)?;
        self.out.push(event);
        Ok(())
    }
}

impl Router {
    /// A router with this policy, writing events for `events_topic`.
    pub fn new(policy: Policy, events_topic: impl Into<String>) -> Self {
        Router {
            policy: Arc::new(RwLock::new(policy)),
            events_topic: events_topic.into(),
            delivery_topic: switchboard_core::Topics::default().delivery,
            sla: None,
        }
    }

    /// Records service levels (first response, resolution) in these
    /// histograms. Observed inside the routing transaction: a transaction
    /// retried after a store failure may count one twice.
    pub fn with_sla_metrics(mut self, metrics: crate::sla::SlaMetrics) -> Self {
        self.sla = Some(metrics);
        self
    }

    /// Notes that `message_id`, a reply in `conversation_id`, went out at
    /// `sent_at` (its status already `sent`): when it is the conversation's
    /// first reply, its wait since the customer's first message is the
    /// first-response time.
    pub fn note_sent(
        &self,
        tx: &mut dyn Tx,
        conversation_id: Uuid,
        channel: switchboard_core::Channel,
        message_id: Uuid,
        sent_at: Millis,
    ) -> Result<(), RouteError> {
        let Some(m) = &self.sla else {
            return Ok(());
        };
        if let (Some(first), Some(asked)) = tx.first_reply(conversation_id)?
            && first == message_id
            && sent_at >= asked
        {
            m.first_response(channel, sent_at - asked);
        }
        Ok(())
    }

    /// Sets the topic delivery statuses are written for (default
    /// `switchboard.delivery.v1`).
    pub fn with_delivery_topic(mut self, topic: impl Into<String>) -> Self {
        self.delivery_topic = topic.into();
        self
    }

    /// The threading policy.
    pub fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the threading policy (windows per channel) for this router
    /// and every clone of it: messages routed from now on use it.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = policy;
    }

    fn channel_policy(&self, channel: switchboard_core::Channel) -> crate::ChannelPolicy {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .channel(channel)
    }

    /// Stores an outbound message with a delivery status, in `conversation`
    /// or, when `None`, in a new conversation of `customer_id` (announced
    /// with `conversation.opened`). Returns the conversation id.
    pub fn record_outbound(
        &self,
        tx: &mut dyn Tx,
        env: &Envelope,
        customer_id: Uuid,
        conversation: Option<Conversation>,
        status: &str,
    ) -> Result<Uuid, RouteError> {
        let at = millis(env.received_at);
        let (mut conv, opened) = match conversation {
            Some(c) => (c, false),
            None => (self.new_conversation(env, customer_id, at), true),
        };
        conv.last_message_at = conv.last_message_at.max(at);
        if opened {
            tx.insert_conversation(&conv)?;
        } else {
            tx.update_conversation(&conv)?;
        }
        tx.insert_message(&NewMessage {
            envelope: env,
            customer_id,
            conversation_id: conv.id,
            rule: ThreadRule::Explicit,
            status: Some(status),
        })?;
        if opened {
            self.emit_event(
                tx,
                customer_id,
                at,
                EventKind::ConversationOpened {
                    conversation_id: conv.id,
                    channel: env.channel,
                },
            )?;
        }
        Ok(conv.id)
    }

    /// Writes an event for `events.v1` to the outbox.
    pub fn emit_event(
        &self,
        tx: &mut dyn Tx,
        customer_id: Uuid,
        at: Millis,
        kind: EventKind,
    ) -> Result<(), RouteError> {
        let mut events = Events {
            topic: &self.events_topic,
            out: Vec::new(),
        };
        events.emit(tx, customer_id, at, kind)?;
        Ok(())
    }

    /// Writes a delivery status for `delivery.v1` (keyed by conversation) to
    /// the outbox, and sets the message's status in the history.
    pub fn emit_delivery(
        &self,
        tx: &mut dyn Tx,
        delivery: &switchboard_core::Delivery,
    ) -> Result<(), RouteError> {
        // The stored status only moves forward: a provider's early
        // "delivered" is not undone when the send's own result is recorded.
        let status = status_name(delivery.status);
        let current = tx.message_status(delivery.message_id)?;
        if status_rank(current.as_deref()) < status_rank(Some(status)) {
            tx.set_message_status(delivery.message_id, status)?;
        }
        self.push_delivery(tx, delivery)
    }

    /// A status a provider reported for one of our sends: `delivery.v1` and
    /// the message's status.
    fn report_status(
        &self,
        tx: &mut dyn Tx,
        record: &switchboard_store::OutboundRecord,
        status: switchboard_core::DeliveryState,
        provider_message_id: &Option<String>,
        error: &Option<switchboard_core::DeliveryError>,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), RouteError> {
        let delivery = switchboard_core::Delivery {
            schema: switchboard_core::records::DeliverySchema::V1,
            id: Uuid::now_v7(),
            message_id: record.message_id,
            conversation_id: record.conversation_id,
            idempotency_key: record.idempotency_key.clone(),
            channel: record.channel,
            status,
            at,
            provider_message_id: provider_message_id
                .clone()
                .or(record.provider_message_id.clone()),
            attempt: None,
            error: error.clone(),
            segments: None,
        };
        // The event always goes out; the stored status only moves forward
        // (a late "delivered" does not undo "read").
        self.emit_delivery(tx, &delivery)
    }

    /// Writes a delivery status to the outbox without touching the message.
    fn push_delivery(
        &self,
        tx: &mut dyn Tx,
        delivery: &switchboard_core::Delivery,
    ) -> Result<(), RouteError> {
        let payload =
            serde_json::to_vec(delivery).map_err(|e| StoreError::Rejected(e.to_string()))?;
        tx.push_outbox(
            &self.delivery_topic,
            delivery.conversation_id.to_string().as_bytes(),
            &payload,
        )?;
        Ok(())
    }

    /// Tells the store which identities and idempotency keys these
    /// envelopes will look up, so it can read them in one go
    /// ([`Tx::prefetch`]). With `resolving` ([`Router::resolve`]) only
    /// outbound messages are looked up by key; routing looks up every one.
    /// Answers do not change; only round trips do.
    pub fn prefetch(
        &self,
        tx: &mut dyn Tx,
        envelopes: &[&Envelope],
        resolving: bool,
    ) -> Result<(), StoreError> {
        let keys: Vec<&str> = envelopes
            .iter()
            .filter(|e| !resolving || e.direction == Direction::Outbound)
            .map(|e| e.idempotency_key.as_str())
            .collect();
        let twins: Vec<Identity> = envelopes
            .iter()
            .filter_map(|e| phone_twin(e.customer_identity()))
            .collect();
        let identities: Vec<&Identity> = envelopes
            .iter()
            .map(|e| e.customer_identity())
            .chain(&twins)
            .collect();
        tx.prefetch(&keys, &identities)
    }

    /// Routes one envelope. Idempotent on its key.
    pub fn route(&self, tx: &mut dyn Tx, env: &Envelope) -> Result<Routed, RouteError> {
        if let Some(change) = &env.change {
            return self.route_change(tx, env, change);
        }
        if let Some(found) = tx.message_by_key(&env.idempotency_key)? {
            return Ok(Routed::Duplicate {
                message_id: found.id,
                conversation_id: found.conversation_id,
            });
        }
        // A platform's echo of a message we sent (Instagram echoes carry no
        // metadata of ours) names the provider id our send recorded.
        if env.direction == Direction::Outbound
            && env.provider != "switchboard"
            && let Some(mid) = &env.thread_hints.message_id
            && let Some(found) = tx.message_by_provider_id(env.channel, &env.account, mid)?
        {
            return Ok(Routed::Duplicate {
                message_id: found.id,
                conversation_id: found.conversation_id,
            });
        }
        let at = millis(env.received_at);
        let mut events = Events {
            topic: &self.events_topic,
            out: Vec::new(),
        };
        let customer_id = self.resolve_identity(tx, env.customer_identity(), at, &mut events)?;
        let (mut conv, rule, opened, reopened) = self.thread(tx, env, customer_id, at)?;

        conv.last_message_at = conv.last_message_at.max(at);
        if env.direction == Direction::Inbound {
            conv.last_inbound_channel = Some(env.channel);
            conv.last_inbound_account = Some(env.account.clone());
        }
        if opened {
            tx.insert_conversation(&conv)?;
        } else {
            tx.update_conversation(&conv)?;
        }
        let status = (env.direction == Direction::Outbound).then_some("sent");
        tx.insert_message(&NewMessage {
            envelope: env,
            customer_id,
            conversation_id: conv.id,
            rule,
            status,
        })?;
        if env.direction == Direction::Outbound {
            self.note_sent(tx, conv.id, env.channel, env.id, at)?;
        }

        if opened {
            events.emit(
                tx,
                customer_id,
                at,
                EventKind::ConversationOpened {
                    conversation_id: conv.id,
                    channel: env.channel,
                },
            )?;
        }
        if reopened {
            events.emit(
                tx,
                customer_id,
                at,
                EventKind::ConversationReopened {
                    conversation_id: conv.id,
                },
            )?;
        }
        let kind = match env.direction {
            Direction::Inbound => EventKind::MessageReceived {
                message_id: env.id,
                conversation_id: conv.id,
                channel: env.channel,
                rule,
                reopened,
                automated: env.automated.is_some(),
            },
            Direction::Outbound => EventKind::MessageSent {
                message_id: env.id,
                conversation_id: conv.id,
                channel: env.channel,
            },
        };
        events.emit(tx, customer_id, at, kind)?;
        tracing::debug!(
            message_id = %env.id, key = %env.idempotency_key,
            request_id = %env.trace.request_id.as_deref().unwrap_or(""),
            %customer_id, conversation_id = %conv.id, rule = %rule.as_str(),
            "message routed"
        );
        Ok(Routed::Stored {
            message_id: env.id,
            customer_id,
            conversation_id: conv.id,
            rule,
            channel: env.channel,
            events: events.out,
        })
    }

    /// Applies a change to the stored message it names: records the next
    /// version (keeping the text it replaces), updates the message and
    /// writes `message.edited`, `message.reacted` or `message.deleted`.
    /// Stores no message. Idempotent on the envelope's key.
    ///
    /// A change whose message is not stored is refused, so it is
    /// dead-lettered with the reason, rather than kept pending until the
    /// message arrives: a platform reports a change only of a message it
    /// delivered earlier, and the change is routed in the same customer
    /// partition after it (the customer made both, or reacted to our
    /// reply), so a missing target means a message this instance never
    /// received (sent before the channel was connected, or refused), which
    /// pending would wait for forever. The dead letter keeps the change for
    /// a replay.
    fn route_change(
        &self,
        tx: &mut dyn Tx,
        env: &Envelope,
        change: &MessageChange,
    ) -> Result<Routed, RouteError> {
        let Some(target) = tx.message_by_provider_id(env.channel, &env.account, &change.target)?
        else {
            return Err(RouteError::Rejected(format!(
                "change for unknown message {} on {} account {}",
                change.target, env.channel, env.account
            )));
        };
        let at = millis(env.sent_at.unwrap_or(env.received_at));
        let envelope =
            serde_json::to_string(env).map_err(|e| RouteError::Rejected(e.to_string()))?;
        let version = tx.apply_change(&NewVersion {
            message_id: target.id,
            idempotency_key: &env.idempotency_key,
            kind: change.kind,
            by: &env.from,
            text: (change.kind == MessageChangeKind::Edit).then_some(env.text.as_str()),
            emoji: change.emoji.as_deref(),
            at,
            envelope: &envelope,
        })?;
        let Some(version) = version else {
            return Ok(Routed::Duplicate {
                message_id: target.id,
                conversation_id: target.conversation_id,
            });
        };
        let (message_id, conversation_id) = (target.id, target.conversation_id);
        let kind = match change.kind {
            MessageChangeKind::Edit => EventKind::MessageEdited {
                message_id,
                conversation_id,
                change: change.clone(),
            },
            MessageChangeKind::Reaction | MessageChangeKind::ReactionRemoved => {
                EventKind::MessageReacted {
                    message_id,
                    conversation_id,
                    by: env.from.clone(),
                    change: change.clone(),
                }
            }
            MessageChangeKind::Delete => EventKind::MessageDeleted {
                message_id,
                conversation_id,
                change: change.clone(),
            },
        };
        let mut events = Events {
            topic: &self.events_topic,
            out: Vec::new(),
        };
        events.emit(tx, target.customer_id, at, kind)?;
        tracing::debug!(
            %message_id, key = %env.idempotency_key, kind = change.kind.as_str(), version,
            "message changed"
        );
        Ok(Routed::Changed {
            message_id,
            conversation_id,
            version,
            channel: env.channel,
            events: events.out,
        })
    }

    /// Identity resolution alone (the first stage when work is re-keyed by
    /// customer): the customer the envelope belongs to, created if new.
    /// Idempotent: the identity's owner is found again (a redelivered
    /// message goes to its identity's current customer, where threading
    /// finds it stored by its key and skips it). A change answers with its
    /// message's customer, so it is routed after it; an outbound message
    /// stored already (a platform's echo of our send, which carries our
    /// key) answers with the customer it was sent to, whose identity on
    /// the platform may be unknown yet, so no customer is created for it.
    ///
    /// An inbound message is not looked up by key, on purpose: on
    /// PostgreSQL that read made every identity transaction depend on the
    /// threading transactions storing messages at the same time, and with
    /// the threading stage's reads of identities this closed a cycle that
    /// failed a long threading batch to serialize again and again for as
    /// long as messages kept arriving (docs/benchmarks.md).
    pub fn resolve(&self, tx: &mut dyn Tx, env: &Envelope) -> Result<Uuid, RouteError> {
        if let Some(change) = &env.change
            && let Some(target) =
                tx.message_by_provider_id(env.channel, &env.account, &change.target)?
        {
            return Ok(target.customer_id);
        }
        if env.direction == Direction::Outbound
            && let Some(found) = tx.message_by_key(&env.idempotency_key)?
        {
            return Ok(found.customer_id);
        }
        let mut events = Events {
            topic: &self.events_topic,
            out: Vec::new(),
        };
        self.resolve_identity(
            tx,
            env.customer_identity(),
            millis(env.received_at),
            &mut events,
        )
    }

    /// Finds or creates the customer owning `identity`, linking a phone
    /// number and a WhatsApp id of the same number.
    fn resolve_identity(
        &self,
        tx: &mut dyn Tx,
        identity: &Identity,
        at: Millis,
        events: &mut Events<'_>,
    ) -> Result<Uuid, RouteError> {
        if let Some(owner) = tx.owner_of(identity)? {
            return Ok(owner);
        }
        if let Some(twin) = phone_twin(identity)
            && let Some(owner) = tx.owner_of(&twin)?
        {
            let evidence = format!("{} and {} are the same phone number", identity, twin);
            tx.attach_identity(identity, owner, &evidence, at)?;
            events.emit(
                tx,
                owner,
                at,
                EventKind::IdentityLinked {
                    identity: identity.clone(),
                    evidence,
                },
            )?;
            return Ok(owner);
        }
        let customer = Uuid::now_v7();
        tx.create_customer(customer, at)?;
        tx.attach_identity(identity, customer, "first seen", at)?;
        events.emit(
            tx,
            customer,
            at,
            EventKind::CustomerCreated {
                identity: identity.clone(),
            },
        )?;
        Ok(customer)
    }

    /// Decides the conversation: returns it (new or loaded), the rule, and
    /// whether it was opened or reopened by this message.
    fn thread(
        &self,
        tx: &mut dyn Tx,
        env: &Envelope,
        customer: Uuid,
        at: Millis,
    ) -> Result<(Conversation, ThreadRule, bool, bool), RouteError> {
        let policy = self.channel_policy(env.channel);
        let reopen = window_ms(policy.reopen);
        let hints = &env.thread_hints;

        // A conversation matched by headers or addressing (rules 1 and 2).
        // An open one is joined; a resolved one reopens within the reopen
        // window; past it, the message opens a new conversation (rule 5).
        let try_join = |conv: Conversation| -> Option<(Conversation, bool)> {
            match conv.status {
                ConversationStatus::Open => Some((conv, false)),
                ConversationStatus::Resolved => {
                    let since = at - conv.resolved_at.unwrap_or(conv.last_message_at);
                    (since <= reopen).then(|| (reopen_conv(conv), true))
                }
            }
        };

        let mut candidates: Vec<(ThreadRule, Uuid)> = Vec::new();
        for id in &hints.in_reply_to {
            if let Some(c) = tx.conversation_by_message_id(customer, id)? {
                candidates.push((ThreadRule::InReplyTo, c));
            }
        }
        for id in hints.references.iter().rev() {
            if let Some(c) = tx.conversation_by_message_id(customer, id)? {
                candidates.push((ThreadRule::References, c));
            }
        }
        if let Some(thread) = &hints.provider_thread_id
            && let Some(c) = tx.conversation_by_provider_thread(customer, env.channel, thread)?
        {
            candidates.push((ThreadRule::ProviderThread, c));
        }
        if let Some(own) = &hints.message_id
            && let Some(c) = tx.conversation_referencing(customer, own)?
        {
            candidates.push((ThreadRule::ReferencedBy, c));
        }
        if let Some(c) = reply_token(&env.to) {
            candidates.push((ThreadRule::ReplyAddress, c));
        }
        let mut header_matched = false;
        for (rule, id) in candidates {
            let Some(conv) = tx.conversation(id)? else {
                continue;
            };
            if conv.customer_id != customer {
                continue;
            }
            header_matched = true;
            if let Some((conv, reopened)) = try_join(conv) {
                return Ok((conv, rule, false, reopened));
            }
            // Matched, but resolved too long ago: rule 5 opens a new one.
            break;
        }

        // Rule 3: same channel account, within the inactivity window. Email
        // whose headers matched nothing (none, or a parent we never saw)
        // must also match the normalized subject.
        let subject = env.subject.as_deref().map(subject_key);
        let subject_filter = policy
            .match_subject
            .then(|| subject.clone().unwrap_or_default());
        if !header_matched
            && let Some(conv) = tx.latest_conversation(
                customer,
                Some((env.channel, &env.account)),
                subject_filter.as_deref(),
            )?
        {
            match conv.status {
                ConversationStatus::Open
                    if at - conv.last_message_at <= window_ms(policy.inactivity) =>
                {
                    return Ok((conv, ThreadRule::Window, false, false));
                }
                ConversationStatus::Resolved => {
                    if let Some((conv, reopened)) = try_join(conv) {
                        return Ok((conv, ThreadRule::Window, false, reopened));
                    }
                }
                ConversationStatus::Open => {}
            }
        }

        // Rule 4: cross-channel continuation.
        if !header_matched
            && let Some(window) = policy.continuation
            && let Some(conv) = tx.latest_conversation(customer, None, None)?
            && conv.status == ConversationStatus::Open
            && (conv.channel != env.channel || conv.account != env.account)
            && at - conv.last_message_at <= window_ms(window)
        {
            return Ok((conv, ThreadRule::Continuation, false, false));
        }

        let conv = self.new_conversation(env, customer, at);
        Ok((conv, ThreadRule::New, true, false))
    }

    /// A new open conversation for the envelope's channel account, keyed by
    /// its subject where the channel matches subjects.
    fn new_conversation(&self, env: &Envelope, customer_id: Uuid, at: Millis) -> Conversation {
        Conversation {
            id: Uuid::now_v7(),
            customer_id,
            channel: env.channel,
            account: env.account.clone(),
            status: ConversationStatus::Open,
            opened_at: at,
            last_message_at: at,
            last_inbound_channel: None,
            last_inbound_account: None,
            resolved_at: None,
            subject_key: self
                .channel_policy(env.channel)
                .match_subject
                .then(|| env.subject.as_deref().map(subject_key).unwrap_or_default()),
        }
    }

    /// Applies one command. Idempotent on the command's id.
    pub fn apply(&self, tx: &mut dyn Tx, cmd: &Command) -> Result<Vec<Event>, RouteError> {
        let at = millis(cmd.at);
        if !tx.first_application(cmd.id, at)? {
            return Ok(Vec::new());
        }
        let mut events = Events {
            topic: &self.events_topic,
            out: Vec::new(),
        };
        match &cmd.kind {
            CommandKind::IdentityLink { a, b, evidence } => {
                self.link(tx, a, b, evidence, at, &mut events)?;
            }
            CommandKind::IdentityUnlink { identity, evidence } => {
                let Some(old) = tx.owner_of(identity)? else {
                    return Err(RouteError::Rejected(format!("unknown identity {identity}")));
                };
                if tx.identities_of(old)?.len() < 2 {
                    return Err(RouteError::Rejected(format!(
                        "identity {identity} is its customer's only identity; nothing to unlink"
                    )));
                }
                let new_customer = Uuid::now_v7();
                tx.create_customer(new_customer, at)?;
                let evidence = evidence.as_deref().unwrap_or("unlink command");
                tx.split_identity(identity, new_customer, evidence, at)?;
                events.emit(
                    tx,
                    old,
                    at,
                    EventKind::IdentityUnlinked {
                        identity: identity.clone(),
                        new_customer,
                    },
                )?;
            }
            CommandKind::CustomerMerge {
                survivor,
                merged,
                evidence,
            } => {
                let s = self.live_customer(tx, *survivor)?;
                let m = self.live_customer(tx, *merged)?;
                if s == m {
                    return Ok(events.out);
                }
                tx.merge_customers(s, m, evidence, at)?;
                events.emit(
                    tx,
                    s,
                    at,
                    EventKind::CustomerMerged {
                        survivor: s,
                        merged: m,
                        evidence: evidence.clone(),
                    },
                )?;
            }
            CommandKind::ConversationResolve { conversation_id } => {
                let mut conv = self.conversation(tx, *conversation_id)?;
                if conv.status == ConversationStatus::Open {
                    conv.status = ConversationStatus::Resolved;
                    conv.resolved_at = Some(at);
                    tx.update_conversation(&conv)?;
                    if let Some(m) = &self.sla {
                        m.resolution(conv.channel, at - conv.opened_at);
                    }
                    events.emit(
                        tx,
                        conv.customer_id,
                        at,
                        EventKind::ConversationResolved {
                            conversation_id: conv.id,
                        },
                    )?;
                }
            }
            CommandKind::ConversationReopen { conversation_id } => {
                let conv = self.conversation(tx, *conversation_id)?;
                if conv.status == ConversationStatus::Resolved {
                    let conv = reopen_conv(conv);
                    tx.update_conversation(&conv)?;
                    events.emit(
                        tx,
                        conv.customer_id,
                        at,
                        EventKind::ConversationReopened {
                            conversation_id: conv.id,
                        },
                    )?;
                }
            }
            CommandKind::MessageStatus {
                message_id,
                status,
                provider_message_id,
                error,
            } => {
                let record = tx.outbound_by_message(*message_id)?.ok_or_else(|| {
                    RouteError::Rejected(format!("no outbound message {message_id}"))
                })?;
                self.report_status(tx, &record, *status, provider_message_id, error, cmd.at)?;
            }
            CommandKind::ProviderStatus {
                channel,
                account,
                status,
                provider_message_ids,
                recipient,
                read_up_to,
                error,
            } => {
                // Resolved against the shared history, so whichever
                // instance sent the message, any instance can take its
                // status. Ids naming no send of ours (a message sent from
                // the platform's own inbox) are skipped.
                let mut ids = Vec::new();
                for pid in provider_message_ids {
                    match tx.message_by_provider_id(*channel, account, pid)? {
                        Some(found) => ids.push((found.id, Some(pid.clone()))),
                        None => tracing::debug!(
                            %channel, %account, provider_message_id = %pid,
                            "status of a message we did not send; skipped"
                        ),
                    }
                }
                if let (Some(to), Some(up_to)) = (recipient, read_up_to) {
                    let up_to = millis(*up_to);
                    for id in tx.sent_unread_up_to(*channel, account, to, up_to, 1000)? {
                        ids.push((id, None));
                    }
                }
                for (id, pid) in ids {
                    if let Some(record) = tx.outbound_by_message(id)? {
                        self.report_status(tx, &record, *status, &pid, error, cmd.at)?;
                    }
                }
            }
            CommandKind::CustomerErase { customer_id } => {
                let Some(id) = tx.resolve_customer(*customer_id)? else {
                    return Err(RouteError::Rejected(format!(
                        "unknown customer {customer_id}"
                    )));
                };
                if !tx.is_erased(id)? {
                    tx.erase_customer(id, at)?;
                    events.emit(tx, id, at, EventKind::CustomerErased {})?;
                }
            }
        }
        Ok(events.out)
    }

    fn live_customer(&self, tx: &mut dyn Tx, id: Uuid) -> Result<Uuid, RouteError> {
        let resolved = tx
            .resolve_customer(id)?
            .ok_or_else(|| RouteError::Rejected(format!("unknown customer {id}")))?;
        if tx.is_erased(resolved)? {
            return Err(RouteError::Rejected(format!("customer {id} was erased")));
        }
        Ok(resolved)
    }

    fn conversation(&self, tx: &mut dyn Tx, id: Uuid) -> Result<Conversation, RouteError> {
        tx.conversation(id)?
            .ok_or_else(|| RouteError::Rejected(format!("unknown conversation {id}")))
    }

    /// Links two identities: an unknown one joins the other's customer; two
    /// customers merge, the older surviving.
    fn link(
        &self,
        tx: &mut dyn Tx,
        a: &Identity,
        b: &Identity,
        evidence: &str,
        at: Millis,
        events: &mut Events<'_>,
    ) -> Result<(), RouteError> {
        let owner_a = tx.owner_of(a)?;
        let owner_b = tx.owner_of(b)?;
        match (owner_a, owner_b) {
            (None, None) => {
                let customer = Uuid::now_v7();
                tx.create_customer(customer, at)?;
                for id in [a, b] {
                    tx.attach_identity(id, customer, evidence, at)?;
                    events.emit(
                        tx,
                        customer,
                        at,
                        EventKind::IdentityLinked {
                            identity: id.clone(),
                            evidence: evidence.to_owned(),
                        },
                    )?;
                }
            }
            (Some(owner), None) | (None, Some(owner)) => {
                let new = if owner_a.is_none() { a } else { b };
                tx.attach_identity(new, owner, evidence, at)?;
                events.emit(
                    tx,
                    owner,
                    at,
                    EventKind::IdentityLinked {
                        identity: new.clone(),
                        evidence: evidence.to_owned(),
                    },
                )?;
            }
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                // UUIDv7 ids order by creation: the older customer survives.
                let (survivor, merged) = if x < y { (x, y) } else { (y, x) };
                tx.merge_customers(survivor, merged, evidence, at)?;
                events.emit(
                    tx,
                    survivor,
                    at,
                    EventKind::CustomerMerged {
                        survivor,
                        merged,
                        evidence: evidence.to_owned(),
                    },
                )?;
            }
        }
        Ok(())
    }
}

fn status_name(s: switchboard_core::DeliveryState) -> &'static str {
    use switchboard_core::DeliveryState::*;
    match s {
        Queued => "queued",
        Sent => "sent",
        Delivered => "delivered",
        Read => "read",
        Failed => "failed",
    }
}

/// How far along a status is; `failed` after `sent` is news, after `read`
/// it is not.
fn status_rank(s: Option<&str>) -> u8 {
    match s {
        None => 0,
        Some("queued") => 1,
        Some("sent") => 2,
        Some("failed") => 3,
        Some("delivered") => 4,
        Some("read") => 5,
        Some(_) => 0,
    }
}

fn reopen_conv(mut conv: Conversation) -> Conversation {
    conv.status = ConversationStatus::Open;
    conv.resolved_at = None;
    conv
}
