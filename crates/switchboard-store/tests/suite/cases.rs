//! The cases: each takes any store and checks one part of the contract.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::{
    Channel, Direction, Envelope, Identity, Retryable, ThreadHints, ThreadRule, Trace,
};
use switchboard_store::{
    Conversation, ConversationStatus, Cursor, Erased, LastInbound, MailboxCheckpoint, Millis,
    NewMessage, OutboundRecord, OutboundState, Store, StoreError, Tx, from_millis,
};
use uuid::Uuid;

const T0: Millis = 1_790_000_000_000;
const SUPPORT: &str = "support@example.com";
const SMS_NUMBER: &str = "+15550001111";

pub(crate) fn ident(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

fn account(channel: Channel) -> &'static str {
    if channel == Channel::Email {
        SUPPORT
    } else {
        SMS_NUMBER
    }
}

/// An envelope from (inbound) or to (outbound) `customer` at `T0 + at`.
pub(crate) fn envelope(
    key: &str,
    customer: &str,
    channel: Channel,
    direction: Direction,
    at: Millis,
) -> Envelope {
    let ours = match channel {
        Channel::Email => ident(&format!("email:{SUPPORT}")),
        _ => ident(&format!("phone:{SMS_NUMBER}")),
    };
    let customer = ident(customer);
    let (from, to) = match direction {
        Direction::Inbound => (customer, ours),
        Direction::Outbound => (ours, customer),
    };
    Envelope {
        schema: EnvelopeSchema::V1,
        id: Uuid::now_v7(),
        idempotency_key: format!("{channel}:{}:{key}", account(channel)),
        channel,
        provider: "test".into(),
        account: account(channel).into(),
        direction,
        from,
        to,
        sent_at: None,
        received_at: from_millis(T0 + at),
        subject: None,
        text: format!("message {key}"),
        attachments: vec![],
        thread_hints: ThreadHints::default(),
        provider_raw: None,
        trace: Trace::default(),
        automated: None,
        change: None,
    }
}

pub(crate) fn inbound(key: &str, customer: &str, channel: Channel, at: Millis) -> Envelope {
    envelope(key, customer, channel, Direction::Inbound, at)
}

pub(crate) fn new_conv(customer: Uuid, channel: Channel, at: Millis) -> Conversation {
    Conversation {
        id: Uuid::now_v7(),
        customer_id: customer,
        channel,
        account: account(channel).into(),
        status: ConversationStatus::Open,
        opened_at: T0 + at,
        last_message_at: T0 + at,
        last_inbound_channel: None,
        last_inbound_account: None,
        resolved_at: None,
        subject_key: None,
    }
}

/// Creates a customer owning `identities`.
pub(crate) fn customer(tx: &mut dyn Tx, identities: &[&str]) -> Uuid {
    let id = Uuid::now_v7();
    tx.create_customer(id, T0).unwrap();
    for i in identities {
        tx.attach_identity(&ident(i), id, "first seen", T0).unwrap();
    }
    id
}

/// Stores a conversation.
pub(crate) fn conversation(tx: &mut dyn Tx, customer: Uuid, channel: Channel, at: Millis) -> Uuid {
    let c = new_conv(customer, channel, at);
    tx.insert_conversation(&c).unwrap();
    c.id
}

/// Stores a message; returns its seq.
pub(crate) fn store(tx: &mut dyn Tx, env: &Envelope, customer: Uuid, conversation: Uuid) -> i64 {
    tx.insert_message(&NewMessage {
        envelope: env,
        customer_id: customer,
        conversation_id: conversation,
        rule: ThreadRule::New,
        status: None,
    })
    .unwrap()
}

fn rejected<T: std::fmt::Debug>(r: Result<T, StoreError>) {
    match r {
        Err(e @ StoreError::Rejected(_)) => assert!(!e.retryable()),
        other => panic!("expected Rejected, got {other:?}"),
    }
}

pub(crate) fn customers_and_identities(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let ada = Uuid::now_v7();
    tx.create_customer(ada, T0 + 5).unwrap();
    // Values whose byte order differs from a natural-language collation's.
    for i in [
        "external:alpha",
        "phone:+14155550100",
        "external:Zeta",
        "email:ada@example.org",
        "external:_x",
    ] {
        tx.attach_identity(&ident(i), ada, "first seen", T0)
            .unwrap();
    }
    let sorted: Vec<Identity> = [
        "email:ada@example.org",
        "external:Zeta",
        "external:_x",
        "external:alpha",
        "phone:+14155550100",
    ]
    .iter()
    .map(|s| ident(s))
    .collect();
    assert_eq!(tx.identities_of(ada).unwrap(), sorted);
    assert_eq!(
        tx.owner_of(&ident("email:ada@example.org")).unwrap(),
        Some(ada)
    );
    assert_eq!(tx.owner_of(&ident("email:bob@example.org")).unwrap(), None);
    assert_eq!(tx.resolve_customer(ada).unwrap(), Some(ada));
    assert!(!tx.is_erased(ada).unwrap());
    tx.commit().unwrap();

    let c = s.customer(ada).unwrap().unwrap();
    assert_eq!(c.id, ada);
    assert_eq!(c.created_at, T0 + 5);
    assert_eq!(c.identities, sorted);
    assert!(c.merged_from.is_empty());
    assert_eq!(c.erased_at, None);
    assert_eq!(
        s.customer_by_identity(&ident("phone:+14155550100"))
            .unwrap(),
        Some(c)
    );
    assert_eq!(
        s.customer_by_identity(&ident("email:bob@example.org"))
            .unwrap(),
        None
    );
}

pub(crate) fn attach_identity_moves_an_identity(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &["email:ada@example.org", "external:crm-1"]);
    let b = customer(&mut *tx, &["email:bob@example.org"]);
    tx.attach_identity(&ident("external:crm-1"), b, "crm says so", T0 + 1)
        .unwrap();
    assert_eq!(tx.owner_of(&ident("external:crm-1")).unwrap(), Some(b));
    assert_eq!(
        tx.identities_of(a).unwrap(),
        vec![ident("email:ada@example.org")]
    );
    tx.commit().unwrap();
    let b = s.customer(b).unwrap().unwrap();
    assert_eq!(
        b.identities,
        vec![ident("email:bob@example.org"), ident("external:crm-1")]
    );
}

pub(crate) fn duplicates_are_rejected_and_the_transaction_goes_on(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &["email:ada@example.org"]);
    tx.savepoint().unwrap();
    rejected(tx.create_customer(a, T0));
    tx.rollback_to_savepoint().unwrap();

    let conv = new_conv(a, Channel::Email, 0);
    tx.insert_conversation(&conv).unwrap();
    tx.savepoint().unwrap();
    rejected(tx.insert_conversation(&conv));
    tx.rollback_to_savepoint().unwrap();

    let first = inbound("m1", "email:ada@example.org", Channel::Email, 0);
    store(&mut *tx, &first, a, conv.id);
    // The same idempotency key under a new id: a redelivery.
    let mut again = first.clone();
    again.id = Uuid::now_v7();
    tx.savepoint().unwrap();
    rejected(tx.insert_message(&NewMessage {
        envelope: &again,
        customer_id: a,
        conversation_id: conv.id,
        rule: ThreadRule::New,
        status: None,
    }));
    tx.rollback_to_savepoint().unwrap();
    // The same id under a new key.
    let mut same_id = inbound("m2", "email:ada@example.org", Channel::Email, 1);
    same_id.id = first.id;
    tx.savepoint().unwrap();
    rejected(tx.insert_message(&NewMessage {
        envelope: &same_id,
        customer_id: a,
        conversation_id: conv.id,
        rule: ThreadRule::New,
        status: None,
    }));
    tx.rollback_to_savepoint().unwrap();

    let b = customer(&mut *tx, &["email:bob@example.org"]);
    tx.commit().unwrap();
    assert!(s.customer(a).unwrap().is_some());
    assert!(s.customer(b).unwrap().is_some());
    let (_, messages) = s.conversation(conv.id).unwrap().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].id, first.id);
}

pub(crate) fn message_rows_round_trip(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &["email:ada@example.org"]);
    let conv = conversation(&mut *tx, a, Channel::Email, 0);
    let mut e1 = inbound("m1", "email:ada@example.org", Channel::Email, 10);
    e1.subject = Some("Order 1042".into());
    e1.text = "Where is it? ünïcødé ✓".into();
    e1.thread_hints = ThreadHints {
        message_id: Some("m1@ada".into()),
        in_reply_to: vec!["p@x".into()],
        references: vec!["o@x".into(), "p@x".into()],
        provider_thread_id: Some("T-1".into()),
    };
    let mut e2 = envelope(
        "o1",
        "email:ada@example.org",
        Channel::Email,
        Direction::Outbound,
        20,
    );
    e2.subject = None;
    let seq1 = store(&mut *tx, &e1, a, conv);
    let seq2 = tx
        .insert_message(&NewMessage {
            envelope: &e2,
            customer_id: a,
            conversation_id: conv,
            rule: ThreadRule::Explicit,
            status: Some("queued"),
        })
        .unwrap();
    assert!(seq2 > seq1);
    let found = tx.message_by_key(&e1.idempotency_key).unwrap().unwrap();
    assert_eq!(
        (found.id, found.conversation_id, found.customer_id),
        (e1.id, conv, a)
    );
    assert_eq!(tx.message_by_key("no such key").unwrap(), None);
    tx.commit().unwrap();

    let (_, messages) = s.conversation(conv).unwrap().unwrap();
    assert_eq!(messages.len(), 2);
    let m = &messages[0];
    assert_eq!(m.id, e1.id);
    assert_eq!(m.seq, seq1);
    assert_eq!(m.idempotency_key, e1.idempotency_key);
    assert_eq!(m.customer_id, a);
    assert_eq!(m.conversation_id, conv);
    assert_eq!(m.direction, Direction::Inbound);
    assert_eq!(m.channel, Channel::Email);
    assert_eq!(m.account, SUPPORT);
    assert_eq!(m.from, e1.from);
    assert_eq!(m.to, e1.to);
    assert_eq!(m.received_at, T0 + 10);
    assert_eq!(m.subject.as_deref(), Some("Order 1042"));
    assert_eq!(m.text, "Where is it? ünïcødé ✓");
    assert_eq!(m.rule, ThreadRule::New);
    assert_eq!(m.status, None);
    assert_eq!(m.message_id.as_deref(), Some("m1@ada"));
    let o = &messages[1];
    assert_eq!(o.seq, seq2);
    assert_eq!(o.direction, Direction::Outbound);
    assert_eq!(o.subject, None);
    assert_eq!(o.rule, ThreadRule::Explicit);
    assert_eq!(o.status.as_deref(), Some("queued"));
    assert_eq!(o.message_id, None);
}

pub(crate) fn conversations_round_trip_and_update(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &["email:ada@example.org"]);
    let b = customer(&mut *tx, &["email:bob@example.org"]);
    let mut c = new_conv(a, Channel::Email, 0);
    c.subject_key = Some("order 1042".into());
    tx.insert_conversation(&c).unwrap();
    assert_eq!(tx.conversation(c.id).unwrap(), Some(c.clone()));

    let mut updated = c.clone();
    updated.status = ConversationStatus::Resolved;
    updated.resolved_at = Some(T0 + 50);
    updated.last_message_at = T0 + 40;
    updated.opened_at = T0 - 1;
    updated.last_inbound_channel = Some(Channel::Sms);
    updated.last_inbound_account = Some(SMS_NUMBER.into());
    updated.customer_id = b;
    // Channel, account and subject key are fixed at insert.
    updated.channel = Channel::Whatsapp;
    updated.account = "other".into();
    updated.subject_key = Some("changed".into());
    tx.update_conversation(&updated).unwrap();
    let expected = Conversation {
        channel: c.channel,
        account: c.account.clone(),
        subject_key: c.subject_key.clone(),
        ..updated.clone()
    };
    assert_eq!(tx.conversation(c.id).unwrap(), Some(expected.clone()));
    assert_eq!(tx.conversation(Uuid::now_v7()).unwrap(), None);
    tx.commit().unwrap();
    let (stored, messages) = s.conversation(c.id).unwrap().unwrap();
    assert_eq!(stored, expected);
    assert!(messages.is_empty());
}

pub(crate) fn latest_conversation_filters_and_ties(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let x = customer(&mut *tx, &["email:ada@example.org"]);
    let other = customer(&mut *tx, &["email:bob@example.org"]);
    let mut insert = |channel: Channel, subject: Option<&str>, at: Millis| {
        let mut c = new_conv(x, channel, at);
        c.subject_key = subject.map(str::to_owned);
        tx.insert_conversation(&c).unwrap();
        c.id
    };
    let _c1 = insert(Channel::Email, Some("order"), 100);
    let c2 = insert(Channel::Sms, None, 300);
    let c3 = insert(Channel::Email, Some("other"), 200);
    // Same time as c3, stored later: ties go to the later one.
    let c4 = insert(Channel::Email, Some("order"), 200);
    let latest = |tx: &mut dyn Tx, ca: Option<(Channel, &str)>, sk: Option<&str>| {
        tx.latest_conversation(x, ca, sk).unwrap().map(|c| c.id)
    };
    assert_eq!(latest(&mut *tx, None, None), Some(c2));
    assert_eq!(latest(&mut *tx, None, Some("order")), Some(c2));
    assert_eq!(
        latest(&mut *tx, Some((Channel::Email, SUPPORT)), None),
        Some(c4)
    );
    assert_eq!(
        latest(&mut *tx, Some((Channel::Email, SUPPORT)), Some("order")),
        Some(c4)
    );
    assert_eq!(
        latest(&mut *tx, Some((Channel::Email, SUPPORT)), Some("other")),
        Some(c3)
    );
    assert_eq!(
        latest(&mut *tx, Some((Channel::Email, SUPPORT)), Some("nothing")),
        None
    );
    assert_eq!(
        latest(&mut *tx, Some((Channel::Email, "someone@else")), None),
        None
    );
    let c5 = {
        let c = new_conv(x, Channel::Whatsapp, 300);
        tx.insert_conversation(&c).unwrap();
        c.id
    };
    assert_eq!(latest(&mut *tx, None, None), Some(c5));
    assert_eq!(tx.latest_conversation(other, None, None).unwrap(), None);
    tx.commit().unwrap();
}

pub(crate) fn header_and_thread_lookups(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let x = customer(&mut *tx, &["email:ada@example.org"]);
    let y = customer(&mut *tx, &["email:bob@example.org"]);
    let a = conversation(&mut *tx, x, Channel::Email, 0);
    let b = conversation(&mut *tx, x, Channel::Email, 0);
    let yc = conversation(&mut *tx, y, Channel::Email, 0);

    let mut a1 = inbound("a1", "email:ada@example.org", Channel::Email, 0);
    a1.thread_hints.message_id = Some("dup@x".into());
    a1.thread_hints.in_reply_to = vec!["p@x".into()];
    a1.thread_hints.references = vec!["p@x".into(), "q@x".into()];
    store(&mut *tx, &a1, x, a);
    let mut b1 = inbound("b1", "email:ada@example.org", Channel::Email, 1);
    b1.thread_hints.message_id = Some("dup@x".into());
    b1.thread_hints.references = vec!["p@x".into()];
    store(&mut *tx, &b1, x, b);
    let mut y1 = inbound("y1", "email:bob@example.org", Channel::Email, 2);
    y1.thread_hints.message_id = Some("y@x".into());
    y1.thread_hints.references = vec!["yref@x".into()];
    store(&mut *tx, &y1, y, yc);

    let mut w1 = inbound("w1", "whatsapp:+14155550100", Channel::Whatsapp, 3);
    w1.thread_hints.provider_thread_id = Some("T1".into());
    store(&mut *tx, &w1, x, a);
    let mut w2 = inbound("w2", "whatsapp:+14155550100", Channel::Whatsapp, 4);
    w2.thread_hints.provider_thread_id = Some("T1".into());
    store(&mut *tx, &w2, x, b);

    // The latest message with the id wins; the earliest referencing one.
    assert_eq!(tx.conversation_by_message_id(x, "dup@x").unwrap(), Some(b));
    assert_eq!(tx.conversation_by_message_id(x, "y@x").unwrap(), None);
    assert_eq!(tx.conversation_by_message_id(y, "y@x").unwrap(), Some(yc));
    assert_eq!(tx.conversation_referencing(x, "p@x").unwrap(), Some(a));
    assert_eq!(tx.conversation_referencing(x, "q@x").unwrap(), Some(a));
    assert_eq!(tx.conversation_referencing(x, "yref@x").unwrap(), None);
    assert_eq!(tx.conversation_referencing(y, "yref@x").unwrap(), Some(yc));
    assert_eq!(tx.conversation_referencing(y, "p@x").unwrap(), None);
    assert_eq!(
        tx.conversation_by_provider_thread(x, Channel::Whatsapp, "T1")
            .unwrap(),
        Some(b)
    );
    assert_eq!(
        tx.conversation_by_provider_thread(x, Channel::Sms, "T1")
            .unwrap(),
        None
    );
    assert_eq!(
        tx.conversation_by_provider_thread(y, Channel::Whatsapp, "T1")
            .unwrap(),
        None
    );
    tx.commit().unwrap();
}

pub(crate) fn timeline_pages_by_time_then_seq(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let x = customer(&mut *tx, &["email:ada@example.org"]);
    let other = customer(&mut *tx, &["email:bob@example.org"]);
    // Two conversations with equal times are ordered by id.
    let mut c_low = new_conv(x, Channel::Email, 100);
    c_low.id = Uuid::parse_str("0190f000-0000-7000-8000-00000000000a").unwrap();
    let mut c_high = new_conv(x, Channel::Sms, 100);
    c_high.id = Uuid::parse_str("0190f000-0000-7000-8000-0000000000f0").unwrap();
    let mut c_new = new_conv(x, Channel::Email, 200);
    c_new.id = Uuid::parse_str("0190e000-0000-7000-8000-000000000000").unwrap();
    for c in [&c_high, &c_new, &c_low] {
        tx.insert_conversation(c).unwrap();
    }
    let oc = conversation(&mut *tx, other, Channel::Email, 0);
    let mut put = |key: &str, at: Millis, conv: Uuid| {
        let e = inbound(key, "email:ada@example.org", Channel::Email, at);
        (key.to_owned(), store(&mut *tx, &e, x, conv))
    };
    let m1 = put("m1", 100, c_low.id);
    let m2 = put("m2", 100, c_low.id);
    let m3 = put("m3", 50, c_high.id);
    let m4 = put("m4", 200, c_new.id);
    let m5 = put("m5", 100, c_high.id);
    let e = inbound("o1", "email:bob@example.org", Channel::Email, 0);
    store(&mut *tx, &e, other, oc);
    tx.commit().unwrap();

    let keys = |t: &switchboard_store::Timeline| {
        t.messages
            .iter()
            .map(|m| {
                m.idempotency_key
                    .rsplit(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect::<Vec<_>>()
    };
    let all = s.timeline(x, None, 100).unwrap().unwrap();
    assert_eq!(all.customer_id, x);
    assert_eq!(keys(&all), ["m3", "m1", "m2", "m5", "m4"]);
    assert_eq!(all.next_cursor, None);
    let convs: Vec<Uuid> = all.conversations.iter().map(|c| c.id).collect();
    assert_eq!(convs, [c_new.id, c_low.id, c_high.id]);

    let p1 = s.timeline(x, None, 2).unwrap().unwrap();
    assert_eq!(keys(&p1), ["m3", "m1"]);
    assert_eq!(
        p1.next_cursor,
        Some(Cursor {
            received_at: T0 + 100,
            seq: m1.1
        })
    );
    assert_eq!(p1.conversations, all.conversations);
    let p2 = s.timeline(x, p1.next_cursor, 2).unwrap().unwrap();
    assert_eq!(keys(&p2), ["m2", "m5"]);
    assert_eq!(
        p2.next_cursor,
        Some(Cursor {
            received_at: T0 + 100,
            seq: m5.1
        })
    );
    let p3 = s.timeline(x, p2.next_cursor, 2).unwrap().unwrap();
    assert_eq!(keys(&p3), ["m4"]);
    assert_eq!(p3.next_cursor, None);

    // A page that ends exactly at the last message has no cursor.
    let exact = s.timeline(x, None, 5).unwrap().unwrap();
    assert_eq!(exact.messages.len(), 5);
    assert_eq!(exact.next_cursor, None);
    let four = s.timeline(x, None, 4).unwrap().unwrap();
    assert_eq!(
        four.next_cursor,
        Some(Cursor {
            received_at: T0 + 100,
            seq: m5.1
        })
    );
    let none = s.timeline(x, None, 0).unwrap().unwrap();
    assert!(none.messages.is_empty());
    assert_eq!(none.next_cursor, None);
    // A cursor past everything, and one from before everything.
    let past = Cursor {
        received_at: T0 + 200,
        seq: m4.1,
    };
    assert!(
        s.timeline(x, Some(past), 10)
            .unwrap()
            .unwrap()
            .messages
            .is_empty()
    );
    let early = Cursor {
        received_at: T0 + 50,
        seq: m3.1 - 1,
    };
    assert_eq!(
        keys(&s.timeline(x, Some(early), 10).unwrap().unwrap()),
        ["m3", "m1", "m2", "m5", "m4"]
    );
    assert!(m2.1 > m1.1);
    assert_eq!(s.timeline(Uuid::now_v7(), None, 10).unwrap(), None);
}

fn outbound_record(key: &str, message: Uuid, conv: Uuid, customer: Uuid) -> OutboundRecord {
    OutboundRecord {
        idempotency_key: key.into(),
        message_id: message,
        conversation_id: conv,
        customer_id: customer,
        channel: Channel::Sms,
        account: SMS_NUMBER.into(),
        to: ident("phone:+14155550100"),
        state: OutboundState::Sending,
        attempts: 0,
        provider_message_id: None,
        error: None,
        created_at: T0,
        updated_at: T0,
    }
}

pub(crate) fn outbound_records(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &["phone:+14155550100"]);
    let conv = conversation(&mut *tx, a, Channel::Sms, 0);
    let msg = Uuid::now_v7();
    let first = outbound_record("req-1", msg, conv, a);
    tx.put_outbound(&first, r#"{"text":"hi"}"#).unwrap();
    assert_eq!(tx.outbound("req-1").unwrap(), Some(first.clone()));
    assert_eq!(tx.outbound_by_message(msg).unwrap(), Some(first.clone()));
    assert_eq!(
        tx.outbound_request("req-1").unwrap().as_deref(),
        Some(r#"{"text":"hi"}"#)
    );

    // An update keeps what was recorded first, but for the state.
    let update = OutboundRecord {
        state: OutboundState::Sent,
        attempts: u32::MAX,
        provider_message_id: Some("SM123".into()),
        error: Some("first try timed out".into()),
        updated_at: T0 + 9,
        created_at: T0 + 8,
        account: "other account".into(),
        channel: Channel::Whatsapp,
        message_id: Uuid::now_v7(),
        ..first.clone()
    };
    tx.put_outbound(&update, "").unwrap();
    let expected = OutboundRecord {
        state: OutboundState::Sent,
        attempts: u32::MAX,
        provider_message_id: Some("SM123".into()),
        error: Some("first try timed out".into()),
        updated_at: T0 + 9,
        ..first.clone()
    };
    assert_eq!(tx.outbound("req-1").unwrap(), Some(expected.clone()));
    assert_eq!(
        tx.outbound_request("req-1").unwrap().as_deref(),
        Some(r#"{"text":"hi"}"#)
    );
    let failed = OutboundRecord {
        state: OutboundState::Failed,
        provider_message_id: None,
        ..expected.clone()
    };
    tx.put_outbound(&failed, "").unwrap();
    assert_eq!(
        tx.outbound("req-1").unwrap().map(|r| r.state),
        Some(OutboundState::Failed)
    );
    tx.put_outbound(&expected, "").unwrap();
    assert_eq!(tx.outbound("nope").unwrap(), None);
    assert_eq!(tx.outbound_request("nope").unwrap(), None);
    assert_eq!(tx.outbound_by_message(Uuid::now_v7()).unwrap(), None);
    tx.commit().unwrap();
    assert_eq!(s.outbound_by_key("req-1").unwrap(), Some(expected));
    assert_eq!(s.outbound_by_key("nope").unwrap(), None);
}

pub(crate) fn message_status_and_last_inbound(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let c = customer(&mut *tx, &["email:ada@example.org", "phone:+14155550100"]);
    let a = conversation(&mut *tx, c, Channel::Email, 0);
    let b = conversation(&mut *tx, c, Channel::Sms, 0);
    let a1 = inbound("a1", "email:ada@example.org", Channel::Email, 100);
    store(&mut *tx, &a1, c, a);
    let o1 = envelope(
        "o1",
        "email:ada@example.org",
        Channel::Email,
        Direction::Outbound,
        150,
    );
    tx.insert_message(&NewMessage {
        envelope: &o1,
        customer_id: c,
        conversation_id: a,
        rule: ThreadRule::Explicit,
        status: Some("queued"),
    })
    .unwrap();
    let a2 = inbound("a2", "email:ada@example.org", Channel::Email, 120);
    store(&mut *tx, &a2, c, a);
    let b1 = inbound("b1", "phone:+14155550100", Channel::Sms, 130);
    store(&mut *tx, &b1, c, b);
    let b2 = inbound("b2", "phone:+14155550100", Channel::Sms, 130);
    store(&mut *tx, &b2, c, b);

    let last = tx.last_inbound(c, None, None).unwrap().unwrap();
    assert_eq!(
        last,
        LastInbound {
            conversation_id: b,
            channel: Channel::Sms,
            account: SMS_NUMBER.into(),
            from: ident("phone:+14155550100"),
            at: T0 + 130,
        }
    );
    let in_a = tx.last_inbound(c, Some(a), None).unwrap().unwrap();
    assert_eq!((in_a.conversation_id, in_a.at), (a, T0 + 120));
    assert_eq!(
        tx.last_inbound(c, Some(a), Some(Channel::Sms)).unwrap(),
        None
    );
    let email = tx
        .last_inbound(c, None, Some(Channel::Email))
        .unwrap()
        .unwrap();
    assert_eq!(email.at, T0 + 120);
    assert_eq!(email.from, ident("email:ada@example.org"));
    let sms_in_b = tx
        .last_inbound(c, Some(b), Some(Channel::Sms))
        .unwrap()
        .unwrap();
    assert_eq!(sms_in_b.at, T0 + 130);
    assert_eq!(tx.last_inbound(Uuid::now_v7(), None, None).unwrap(), None);

    assert_eq!(tx.message_status(o1.id).unwrap().as_deref(), Some("queued"));
    tx.set_message_status(o1.id, "delivered").unwrap();
    assert_eq!(
        tx.message_status(o1.id).unwrap().as_deref(),
        Some("delivered")
    );
    assert_eq!(tx.message_status(a1.id).unwrap(), None);
    assert_eq!(tx.message_status(Uuid::now_v7()).unwrap(), None);
    tx.set_message_status(Uuid::now_v7(), "sent").unwrap();
    tx.commit().unwrap();
    let (_, messages) = s.conversation(a).unwrap().unwrap();
    let o = messages.iter().find(|m| m.id == o1.id).unwrap();
    assert_eq!(o.status.as_deref(), Some("delivered"));
}

pub(crate) fn merge_moves_everything_and_redirects(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let survivor = customer(&mut *tx, &["email:ada@example.org"]);
    let merged = customer(&mut *tx, &["phone:+14155550100"]);
    let earlier = customer(&mut *tx, &["external:crm-7"]);
    let cs = conversation(&mut *tx, survivor, Channel::Email, 0);
    let cm = conversation(&mut *tx, merged, Channel::Sms, 10);
    let ce = conversation(&mut *tx, earlier, Channel::Api, 5);
    let ms = inbound("ms", "email:ada@example.org", Channel::Email, 0);
    store(&mut *tx, &ms, survivor, cs);
    let mut mm = inbound("mm", "phone:+14155550100", Channel::Sms, 10);
    mm.thread_hints.references = vec!["zz@x".into()];
    store(&mut *tx, &mm, merged, cm);
    let me = inbound("me", "external:crm-7", Channel::Api, 5);
    store(&mut *tx, &me, earlier, ce);
    // `earlier` was merged into `merged` before; it must follow along.
    tx.merge_customers(merged, earlier, "same crm record", T0 + 20)
        .unwrap();
    assert_eq!(tx.resolve_customer(earlier).unwrap(), Some(merged));
    tx.merge_customers(survivor, merged, "crm says so", T0 + 30)
        .unwrap();

    assert_eq!(
        tx.owner_of(&ident("phone:+14155550100")).unwrap(),
        Some(survivor)
    );
    assert_eq!(
        tx.identities_of(survivor).unwrap(),
        vec![
            ident("email:ada@example.org"),
            ident("external:crm-7"),
            ident("phone:+14155550100"),
        ]
    );
    assert!(tx.identities_of(merged).unwrap().is_empty());
    assert_eq!(tx.conversation(cm).unwrap().unwrap().customer_id, survivor);
    assert_eq!(tx.conversation(ce).unwrap().unwrap().customer_id, survivor);
    assert_eq!(
        tx.message_by_key(&mm.idempotency_key)
            .unwrap()
            .unwrap()
            .customer_id,
        survivor
    );
    assert_eq!(
        tx.conversation_referencing(survivor, "zz@x").unwrap(),
        Some(cm)
    );
    assert_eq!(tx.conversation_referencing(merged, "zz@x").unwrap(), None);
    assert_eq!(tx.resolve_customer(merged).unwrap(), Some(survivor));
    assert_eq!(tx.resolve_customer(earlier).unwrap(), Some(survivor));
    assert!(!tx.is_erased(merged).unwrap());
    tx.commit().unwrap();

    let c = s.customer(merged).unwrap().unwrap();
    assert_eq!(c.id, survivor);
    assert_eq!(c.merged_from, vec![merged]);
    assert_eq!(c.identities.len(), 3);
    assert_eq!(s.customer(earlier).unwrap().unwrap().id, survivor);
    assert_eq!(
        s.customer(merged).unwrap().unwrap().merged_from,
        vec![merged]
    );
    let m = s.customer(survivor).unwrap().unwrap();
    assert_eq!(m, c);
    assert_eq!(
        s.customer_by_identity(&ident("external:crm-7"))
            .unwrap()
            .map(|c| c.id),
        Some(survivor)
    );
    let t = s.timeline(earlier, None, 10).unwrap().unwrap();
    assert_eq!(t.customer_id, survivor);
    assert_eq!(t.messages.len(), 3);
    assert_eq!(t.conversations.len(), 3);
    let merged_customer = s.customer(merged).unwrap().unwrap();
    assert_eq!(merged_customer.created_at, T0);
}

pub(crate) fn split_moves_the_identity_and_its_conversations(s: &dyn Store) {
    let email = "email:ada@example.org";
    let phone = "phone:+14155550100";
    let mut tx = s.begin().unwrap();
    let c = customer(&mut *tx, &[email, phone]);
    let only_email = conversation(&mut *tx, c, Channel::Email, 0);
    let only_phone = conversation(&mut *tx, c, Channel::Sms, 0);
    let mixed = conversation(&mut *tx, c, Channel::Sms, 0);
    let empty = conversation(&mut *tx, c, Channel::Sms, 0);
    store(
        &mut *tx,
        &inbound("e1", email, Channel::Email, 0),
        c,
        only_email,
    );
    let mut p1 = inbound("p1", phone, Channel::Sms, 1);
    p1.thread_hints.references = vec!["r@x".into()];
    store(&mut *tx, &p1, c, only_phone);
    let to_phone = envelope("p2", phone, Channel::Sms, Direction::Outbound, 2);
    store(&mut *tx, &to_phone, c, only_phone);
    store(&mut *tx, &inbound("x1", phone, Channel::Sms, 3), c, mixed);
    let mut x2 = inbound("x2", email, Channel::Email, 4);
    x2.thread_hints.references = vec!["m@x".into()];
    store(&mut *tx, &x2, c, mixed);

    let n = Uuid::now_v7();
    tx.create_customer(n, T0 + 10).unwrap();
    tx.split_identity(&ident(phone), n, "unlink command", T0 + 10)
        .unwrap();
    assert_eq!(tx.owner_of(&ident(phone)).unwrap(), Some(n));
    assert_eq!(tx.identities_of(c).unwrap(), vec![ident(email)]);
    assert_eq!(tx.identities_of(n).unwrap(), vec![ident(phone)]);
    assert_eq!(tx.conversation(only_phone).unwrap().unwrap().customer_id, n);
    for stay in [only_email, mixed, empty] {
        assert_eq!(tx.conversation(stay).unwrap().unwrap().customer_id, c);
    }
    assert_eq!(
        tx.message_by_key(&p1.idempotency_key)
            .unwrap()
            .unwrap()
            .customer_id,
        n
    );
    assert_eq!(
        tx.message_by_key(&to_phone.idempotency_key)
            .unwrap()
            .unwrap()
            .customer_id,
        n
    );
    assert_eq!(
        tx.conversation_referencing(n, "r@x").unwrap(),
        Some(only_phone)
    );
    assert_eq!(tx.conversation_referencing(c, "r@x").unwrap(), None);
    assert_eq!(tx.conversation_referencing(c, "m@x").unwrap(), Some(mixed));
    // Splitting an identity nobody owns changes nothing.
    tx.split_identity(&ident("phone:+14155550199"), n, "nothing", T0 + 11)
        .unwrap();
    assert_eq!(tx.owner_of(&ident("phone:+14155550199")).unwrap(), None);
    tx.commit().unwrap();
    assert_eq!(s.timeline(n, None, 10).unwrap().unwrap().messages.len(), 2);
    assert_eq!(s.timeline(c, None, 10).unwrap().unwrap().messages.len(), 3);
}

pub(crate) fn erase_leaves_a_tombstone(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &["email:ada@example.org"]);
    let b = customer(&mut *tx, &["phone:+14155550100"]);
    let bob = customer(&mut *tx, &["email:bob@example.org"]);
    let ca = conversation(&mut *tx, a, Channel::Email, 0);
    let cb = conversation(&mut *tx, b, Channel::Sms, 0);
    let cbob = conversation(&mut *tx, bob, Channel::Email, 0);
    let mut a1 = inbound("a1", "email:ada@example.org", Channel::Email, 0);
    a1.thread_hints.references = vec!["r@x".into()];
    store(&mut *tx, &a1, a, ca);
    let a2 = inbound("a2", "email:ada@example.org", Channel::Email, 1);
    store(&mut *tx, &a2, a, ca);
    let b1 = inbound("b1", "phone:+14155550100", Channel::Sms, 2);
    store(&mut *tx, &b1, b, cb);
    let bob1 = inbound("bob1", "email:bob@example.org", Channel::Email, 3);
    store(&mut *tx, &bob1, bob, cbob);
    tx.merge_customers(a, b, "same person", T0 + 5).unwrap();
    tx.commit().unwrap();

    let mut tx = s.begin().unwrap();
    let erased = tx.erase_customer(a, T0 + 10).unwrap();
    assert_eq!(
        erased,
        Erased {
            messages: 3,
            identities: 2,
            conversations: 2,
        }
    );
    assert!(tx.is_erased(a).unwrap());
    assert!(tx.is_erased(b).unwrap());
    assert!(!tx.is_erased(bob).unwrap());
    assert_eq!(tx.owner_of(&ident("email:ada@example.org")).unwrap(), None);
    assert_eq!(tx.message_by_key(&a1.idempotency_key).unwrap(), None);
    assert_eq!(tx.message_by_key(&b1.idempotency_key).unwrap(), None);
    assert_eq!(tx.conversation(ca).unwrap(), None);
    assert_eq!(tx.conversation_referencing(a, "r@x").unwrap(), None);
    assert_eq!(tx.resolve_customer(b).unwrap(), Some(a));
    tx.commit().unwrap();

    let c = s.customer(b).unwrap().unwrap();
    assert_eq!(c.id, a);
    assert_eq!(c.erased_at, Some(T0 + 10));
    assert!(c.identities.is_empty());
    assert_eq!(c.merged_from, vec![b]);
    assert_eq!(
        s.customer_by_identity(&ident("phone:+14155550100"))
            .unwrap(),
        None
    );
    let t = s.timeline(a, None, 10).unwrap().unwrap();
    assert!(t.messages.is_empty() && t.conversations.is_empty());
    assert_eq!(
        s.timeline(bob, None, 10).unwrap().unwrap().messages.len(),
        1
    );

    // Erasing again finds nothing more and keeps the tombstone.
    let mut tx = s.begin().unwrap();
    assert_eq!(
        tx.erase_customer(a, T0 + 20).unwrap(),
        Erased {
            messages: 0,
            identities: 0,
            conversations: 0,
        }
    );
    tx.commit().unwrap();
    assert_eq!(s.customer(a).unwrap().unwrap().erased_at, Some(T0 + 20));
}

pub(crate) fn commands_apply_once(s: &dyn Store) {
    let cmd = Uuid::now_v7();
    let mut tx = s.begin().unwrap();
    assert!(tx.first_application(cmd, T0).unwrap());
    assert!(!tx.first_application(cmd, T0 + 1).unwrap());
    tx.commit().unwrap();
    let mut tx = s.begin().unwrap();
    assert!(!tx.first_application(cmd, T0 + 2).unwrap());
    let rolled_back = Uuid::now_v7();
    assert!(tx.first_application(rolled_back, T0).unwrap());
    drop(tx);
    let mut tx = s.begin().unwrap();
    assert!(tx.first_application(rolled_back, T0).unwrap());
    tx.commit().unwrap();
}

fn push(s: &dyn Store, items: &[&str]) {
    let mut tx = s.begin().unwrap();
    for i in items {
        tx.push_outbox("events", i.as_bytes(), format!("payload {i}").as_bytes())
            .unwrap();
    }
    tx.commit().unwrap();
}

fn keys(records: &[switchboard_store::OutboxRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.key.clone()).unwrap())
        .collect()
}

pub(crate) fn outbox_in_order_and_done(s: &dyn Store) {
    assert!(s.outbox(10).unwrap().is_empty());
    push(s, &["a", "b"]);
    push(s, &["c"]);
    let first = s.outbox(2).unwrap();
    assert_eq!(keys(&first), ["a", "b"]);
    assert_eq!(first[0].topic, "events");
    assert_eq!(first[0].payload, b"payload a");
    assert!(first[0].seq < first[1].seq);
    // Not forgotten until done: asking again gives the same records.
    assert_eq!(s.outbox(2).unwrap(), first);
    let all = s.outbox(10).unwrap();
    assert_eq!(keys(&all), ["a", "b", "c"]);
    s.outbox_done(first[1].seq).unwrap();
    assert_eq!(keys(&s.outbox(10).unwrap()), ["c"]);
    push(s, &["d"]);
    let rest = s.outbox(10).unwrap();
    assert_eq!(keys(&rest), ["c", "d"]);
    assert!(rest[0].seq > first[1].seq && rest[1].seq > rest[0].seq);
    s.outbox_done(rest[1].seq).unwrap();
    assert!(s.outbox(10).unwrap().is_empty());
    // Binary keys and payloads survive.
    let mut tx = s.begin().unwrap();
    tx.push_outbox("dlq", &[0, 159, 255], &[0, 1, 2, 0])
        .unwrap();
    tx.commit().unwrap();
    let bin = s.outbox(10).unwrap();
    assert_eq!(bin[0].key, [0, 159, 255]);
    assert_eq!(bin[0].payload, [0, 1, 2, 0]);
    assert_eq!(bin[0].topic, "dlq");
}

pub(crate) fn outbox_sees_only_committed_rows(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    tx.push_outbox("events", b"rolled back", b"x").unwrap();
    assert!(s.outbox(10).unwrap().is_empty());
    drop(tx);
    assert!(s.outbox(10).unwrap().is_empty());
    let mut tx = s.begin().unwrap();
    tx.push_outbox("events", b"kept", b"x").unwrap();
    assert!(s.outbox(10).unwrap().is_empty());
    tx.commit().unwrap();
    assert_eq!(keys(&s.outbox(10).unwrap()), ["kept"]);
}

pub(crate) fn savepoints_nest_and_roll_back(s: &dyn Store) {
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let mut tx = s.begin().unwrap();
    tx.create_customer(ids[0], T0).unwrap();
    tx.savepoint().unwrap();
    tx.create_customer(ids[1], T0).unwrap();
    tx.savepoint().unwrap();
    tx.create_customer(ids[2], T0).unwrap();
    tx.push_outbox("events", b"undone", b"").unwrap();
    tx.rollback_to_savepoint().unwrap();
    assert_eq!(tx.resolve_customer(ids[2]).unwrap(), None);
    tx.create_customer(ids[3], T0).unwrap();
    tx.release_savepoint().unwrap();
    tx.savepoint().unwrap();
    tx.create_customer(ids[4], T0).unwrap();
    tx.rollback_to_savepoint().unwrap();
    tx.push_outbox("events", b"kept", b"").unwrap();
    tx.commit().unwrap();
    let exists: Vec<bool> = ids
        .iter()
        .map(|id| s.customer(*id).unwrap().is_some())
        .collect();
    assert_eq!(exists, [true, true, false, true, false]);
    assert_eq!(keys(&s.outbox(10).unwrap()), ["kept"]);
}

pub(crate) fn dropped_transaction_rolls_back(s: &dyn Store) {
    let id = Uuid::now_v7();
    let mut tx = s.begin().unwrap();
    tx.create_customer(id, T0).unwrap();
    tx.attach_identity(&ident("email:ada@example.org"), id, "first seen", T0)
        .unwrap();
    tx.first_application(id, T0).unwrap();
    drop(tx);
    assert_eq!(s.customer(id).unwrap(), None);
    let mut tx = s.begin().unwrap();
    assert_eq!(tx.owner_of(&ident("email:ada@example.org")).unwrap(), None);
    assert!(tx.first_application(id, T0).unwrap());
}

pub(crate) fn reads_see_only_committed_state(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &["email:ada@example.org"]);
    let conv = conversation(&mut *tx, a, Channel::Email, 0);
    store(
        &mut *tx,
        &inbound("m1", "email:ada@example.org", Channel::Email, 0),
        a,
        conv,
    );
    tx.put_outbound(&outbound_record("req", Uuid::now_v7(), conv, a), "{}")
        .unwrap();
    assert_eq!(s.customer(a).unwrap(), None);
    assert_eq!(
        s.customer_by_identity(&ident("email:ada@example.org"))
            .unwrap(),
        None
    );
    assert_eq!(s.timeline(a, None, 10).unwrap(), None);
    assert_eq!(s.conversation(conv).unwrap(), None);
    assert_eq!(s.outbound_by_key("req").unwrap(), None);
    tx.commit().unwrap();
    assert!(s.customer(a).unwrap().is_some());
    assert_eq!(s.timeline(a, None, 10).unwrap().unwrap().messages.len(), 1);
    assert_eq!(s.conversation(conv).unwrap().unwrap().1.len(), 1);
    assert!(s.outbound_by_key("req").unwrap().is_some());
}

/// A writer commits conversations with a message each while a reader pages
/// the timeline: every message a page lists belongs to a conversation the
/// same page lists (both were read from one committed state).
pub(crate) fn timeline_reads_one_snapshot(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let x = customer(&mut *tx, &["email:ada@example.org"]);
    tx.commit().unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..80 {
                let mut tx = s.begin().unwrap();
                let conv = conversation(&mut *tx, x, Channel::Email, i);
                let e = inbound(&format!("m{i}"), "email:ada@example.org", Channel::Email, i);
                store(&mut *tx, &e, x, conv);
                tx.commit().unwrap();
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut reads = 0;
        while !done.load(Ordering::SeqCst) || reads == 0 {
            let t = s.timeline(x, None, 10_000).unwrap().unwrap();
            let convs: HashSet<Uuid> = t.conversations.iter().map(|c| c.id).collect();
            assert_eq!(t.messages.len(), t.conversations.len());
            for m in &t.messages {
                assert!(convs.contains(&m.conversation_id), "torn read");
            }
            let (conv, messages) = match t.conversations.first() {
                Some(c) => s.conversation(c.id).unwrap().unwrap(),
                None => continue,
            };
            assert_eq!(messages.len(), 1, "{conv:?}");
            reads += 1;
        }
    });
    assert_eq!(
        s.timeline(x, None, 1000).unwrap().unwrap().messages.len(),
        80
    );
}

pub(crate) fn unknown_ids_answer_nothing(s: &dyn Store) {
    let nobody = Uuid::now_v7();
    assert_eq!(s.customer(nobody).unwrap(), None);
    assert_eq!(s.timeline(nobody, None, 10).unwrap(), None);
    assert_eq!(s.conversation(nobody).unwrap(), None);
    assert_eq!(s.outbound_by_key("nothing").unwrap(), None);
    let mut tx = s.begin().unwrap();
    assert_eq!(tx.resolve_customer(nobody).unwrap(), None);
    assert!(!tx.is_erased(nobody).unwrap());
    assert!(tx.identities_of(nobody).unwrap().is_empty());
    assert_eq!(tx.conversation(nobody).unwrap(), None);
    assert_eq!(tx.latest_conversation(nobody, None, None).unwrap(), None);
    assert_eq!(tx.last_inbound(nobody, None, None).unwrap(), None);
    assert_eq!(tx.message_status(nobody).unwrap(), None);
    assert_eq!(tx.outbound_by_message(nobody).unwrap(), None);
    // Updates of nothing are no errors.
    tx.set_message_status(nobody, "sent").unwrap();
    let ghost = new_conv(nobody, Channel::Sms, 0);
    tx.update_conversation(&ghost).unwrap();
    assert_eq!(tx.conversation(ghost.id).unwrap(), None);
    tx.commit().unwrap();
}

pub(crate) fn ping_answers(s: &dyn Store) {
    s.ping().unwrap();
}

pub(crate) fn is_empty_until_a_customer_is_stored(s: &dyn Store) {
    assert!(s.is_empty().unwrap());
    let mut tx = s.begin().unwrap();
    tx.push_outbox("events", b"k", b"p").unwrap();
    tx.first_application(Uuid::now_v7(), T0).unwrap();
    tx.commit().unwrap();
    assert!(s.is_empty().unwrap(), "outbox and commands are no history");
    let mut tx = s.begin().unwrap();
    customer(&mut *tx, &["email:ada@example.org"]);
    assert!(s.is_empty().unwrap(), "not committed yet");
    tx.commit().unwrap();
    assert!(!s.is_empty().unwrap());
}

/// The daemon calls the store from tokio's blocking pool and may drop it on
/// a runtime thread; both must work.
pub(crate) fn store_works_from_the_blocking_pool(store: Arc<dyn Store>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let s = Arc::clone(&store);
        let id = tokio::task::spawn_blocking(move || {
            let mut tx = s.begin()?;
            let id = customer(&mut *tx, &["email:ada@example.org"]);
            tx.commit()?;
            Ok::<_, StoreError>(id)
        })
        .await
        .unwrap()
        .unwrap();
        let s = Arc::clone(&store);
        let found = tokio::task::spawn_blocking(move || s.customer(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.map(|c| c.id), Some(id));
        // The last reference goes away on a runtime thread.
        drop(store);
    });
}

pub(crate) fn mailbox_checkpoints_per_account_and_mailbox(s: &dyn Store) {
    assert_eq!(s.mailbox_checkpoint(SUPPORT, "INBOX").unwrap(), None);
    let cp = |uidvalidity, last_uid| MailboxCheckpoint {
        uidvalidity,
        last_uid,
    };
    s.set_mailbox_checkpoint(SUPPORT, "INBOX", cp(7, 12))
        .unwrap();
    s.set_mailbox_checkpoint(SUPPORT, "Sales", cp(9, 3))
        .unwrap();
    s.set_mailbox_checkpoint("sales@example.com", "INBOX", cp(1, 1))
        .unwrap();
    assert_eq!(
        s.mailbox_checkpoint(SUPPORT, "INBOX").unwrap(),
        Some(cp(7, 12))
    );
    assert_eq!(
        s.mailbox_checkpoint(SUPPORT, "Sales").unwrap(),
        Some(cp(9, 3))
    );
    // Replaced, also backwards (a new UIDVALIDITY starts over), and the
    // largest values IMAP allows round-trip.
    s.set_mailbox_checkpoint(SUPPORT, "INBOX", cp(u32::MAX, u32::MAX))
        .unwrap();
    assert_eq!(
        s.mailbox_checkpoint(SUPPORT, "INBOX").unwrap(),
        Some(cp(u32::MAX, u32::MAX))
    );
    s.set_mailbox_checkpoint(SUPPORT, "INBOX", cp(8, 0))
        .unwrap();
    assert_eq!(
        s.mailbox_checkpoint(SUPPORT, "INBOX").unwrap(),
        Some(cp(8, 0))
    );
    assert_eq!(
        s.mailbox_checkpoint("sales@example.com", "INBOX").unwrap(),
        Some(cp(1, 1))
    );
    assert_eq!(
        s.mailbox_checkpoint("nobody@example.com", "INBOX").unwrap(),
        None
    );
}

pub(crate) fn thread_message_ids_newest_first(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let x = customer(&mut *tx, &["email:ada@example.org"]);
    let a = conversation(&mut *tx, x, Channel::Email, 0);
    let other = conversation(&mut *tx, x, Channel::Email, 0);
    let mut m1 = inbound("m1", "email:ada@example.org", Channel::Email, 10);
    m1.thread_hints.message_id = Some("m1@ada".into());
    store(&mut *tx, &m1, x, a);
    let mut r1 = envelope(
        "r1",
        "email:ada@example.org",
        Channel::Email,
        Direction::Outbound,
        20,
    );
    r1.thread_hints.message_id = Some("r1@us".into());
    store(&mut *tx, &r1, x, a);
    // No Message-ID: not listed.
    store(
        &mut *tx,
        &inbound("m2", "email:ada@example.org", Channel::Email, 30),
        x,
        a,
    );
    let mut m3 = inbound("m3", "email:ada@example.org", Channel::Email, 40);
    m3.thread_hints.message_id = Some("m3@ada".into());
    store(&mut *tx, &m3, x, a);
    let mut elsewhere = inbound("o1", "email:ada@example.org", Channel::Email, 50);
    elsewhere.thread_hints.message_id = Some("o1@ada".into());
    store(&mut *tx, &elsewhere, x, other);

    assert_eq!(
        tx.thread_message_ids(a, 10).unwrap(),
        vec![
            (Direction::Inbound, "m3@ada".to_owned()),
            (Direction::Outbound, "r1@us".to_owned()),
            (Direction::Inbound, "m1@ada".to_owned()),
        ]
    );
    assert_eq!(
        tx.thread_message_ids(a, 1).unwrap(),
        vec![(Direction::Inbound, "m3@ada".to_owned())]
    );
    assert!(
        tx.thread_message_ids(Uuid::now_v7(), 10)
            .unwrap()
            .is_empty()
    );
    tx.commit().unwrap();
}

/// A change: finds its message by provider id (its own, or the provider's
/// answer to our send), records a version keeping the replaced text,
/// applies once per key, and goes with the customer on erase.
pub(crate) fn message_changes_keep_versions(s: &dyn Store) {
    use switchboard_core::MessageChangeKind;
    use switchboard_store::NewVersion;
    let ada = "phone:+14155550100";
    let mut tx = s.begin().unwrap();
    let a = customer(&mut *tx, &[ada]);
    let conv = conversation(&mut *tx, a, Channel::Sms, 0);
    let mut m1 = inbound("m1", ada, Channel::Sms, 0);
    m1.thread_hints.message_id = Some("SM1".into());
    store(&mut *tx, &m1, a, conv);
    let ours = envelope("ours", ada, Channel::Sms, Direction::Outbound, 1);
    store(&mut *tx, &ours, a, conv);
    let mut rec = outbound_record("req-1", ours.id, conv, a);
    rec.provider_message_id = Some("SM-OURS".into());
    tx.put_outbound(&rec, "{}").unwrap();

    let found = tx
        .message_by_provider_id(Channel::Sms, SMS_NUMBER, "SM1")
        .unwrap()
        .unwrap();
    assert_eq!((found.id, found.conversation_id), (m1.id, conv));
    let found = tx
        .message_by_provider_id(Channel::Sms, SMS_NUMBER, "SM-OURS")
        .unwrap()
        .unwrap();
    assert_eq!(found.id, ours.id, "our send, by the provider's id");
    for (channel, account, id) in [
        (Channel::Whatsapp, SMS_NUMBER, "SM1"),
        (Channel::Sms, "+15559999999", "SM1"),
        (Channel::Sms, SMS_NUMBER, "SM-NONE"),
    ] {
        assert_eq!(
            tx.message_by_provider_id(channel, account, id).unwrap(),
            None,
            "{channel} {account} {id}"
        );
    }

    let who = ident(ada);
    let change = |key: &'static str, kind, text, emoji, at| NewVersion {
        message_id: m1.id,
        idempotency_key: key,
        kind,
        by: &who,
        text,
        emoji,
        at: T0 + at,
        envelope: "{}",
    };
    let edit = change("c1", MessageChangeKind::Edit, Some("fixed"), None, 10);
    assert_eq!(tx.apply_change(&edit).unwrap(), Some(1));
    assert_eq!(tx.apply_change(&edit).unwrap(), None, "applied once");
    let react = change("c2", MessageChangeKind::Reaction, None, Some("👍"), 11);
    assert_eq!(tx.apply_change(&react).unwrap(), Some(2));
    tx.commit().unwrap();

    let (_, msgs) = s.conversation(conv).unwrap().unwrap();
    assert_eq!(msgs.len(), 2);
    let m = &msgs[0];
    assert_eq!(m.text, "fixed");
    assert_eq!(m.versions, 2);
    assert_eq!(m.reactions.get(ada).map(String::as_str), Some("👍"));
    assert_eq!(m.deleted_at, None);

    let mut tx = s.begin().unwrap();
    let delete = change("c3", MessageChangeKind::Delete, None, None, 12);
    assert_eq!(tx.apply_change(&delete).unwrap(), Some(3));
    let unreact = change("c4", MessageChangeKind::ReactionRemoved, None, None, 13);
    assert_eq!(tx.apply_change(&unreact).unwrap(), Some(4));
    let mut orphan = change("c5", MessageChangeKind::Edit, Some("x"), None, 14);
    orphan.message_id = Uuid::now_v7();
    rejected(tx.apply_change(&orphan));
    tx.commit().unwrap();

    let (_, msgs) = s.conversation(conv).unwrap().unwrap();
    let m = &msgs[0];
    assert_eq!((m.text.as_str(), m.versions), ("", 4));
    assert!(m.reactions.is_empty());
    assert_eq!(m.deleted_at, Some(T0 + 12));
    let versions = s.message_versions(m1.id).unwrap();
    let kept: Vec<(i64, MessageChangeKind, &str)> = versions
        .iter()
        .map(|v| (v.version, v.kind, v.previous_text.as_str()))
        .collect();
    assert_eq!(
        kept,
        [
            (1, MessageChangeKind::Edit, "message m1"),
            (2, MessageChangeKind::Reaction, "fixed"),
            (3, MessageChangeKind::Delete, "fixed"),
            (4, MessageChangeKind::ReactionRemoved, ""),
        ]
    );
    assert_eq!(versions[0].text.as_deref(), Some("fixed"));
    assert_eq!(versions[1].emoji.as_deref(), Some("👍"));
    assert_eq!(versions[0].by, who);
    assert_eq!(versions[0].at, T0 + 10);

    // The versions are personal data: erasure removes them.
    let mut tx = s.begin().unwrap();
    tx.erase_customer(a, T0 + 20).unwrap();
    tx.commit().unwrap();
    assert!(s.message_versions(m1.id).unwrap().is_empty());
}

pub(crate) fn read_watermarks_and_provider_threads(s: &dyn Store) {
    let customer_phone = "phone:+14155550100";
    let mut tx = s.begin().unwrap();
    let c = customer(&mut *tx, &[customer_phone, "phone:+14155550199"]);
    let conv = conversation(&mut *tx, c, Channel::Sms, 0);
    // Three sends to the customer (the second already read) and one to
    // another number, each recorded `sent` at T0 + 10, 20, 30, 15.
    let mut sent = Vec::new();
    for (i, (to, status, at)) in [
        (customer_phone, "sent", 10),
        (customer_phone, "read", 20),
        (customer_phone, "delivered", 30),
        ("phone:+14155550199", "sent", 15),
    ]
    .into_iter()
    .enumerate()
    {
        let env = envelope(&format!("w{i}"), to, Channel::Sms, Direction::Outbound, at);
        tx.insert_message(&NewMessage {
            envelope: &env,
            customer_id: c,
            conversation_id: conv,
            rule: ThreadRule::Explicit,
            status: Some(status),
        })
        .unwrap();
        let record = OutboundRecord {
            to: ident(to),
            state: OutboundState::Sent,
            updated_at: T0 + at,
            ..outbound_record(&format!("req-w{i}"), env.id, conv, c)
        };
        tx.put_outbound(&record, "{}").unwrap();
        sent.push(env.id);
    }
    let to = ident(customer_phone);
    assert_eq!(
        tx.sent_unread_up_to(Channel::Sms, SMS_NUMBER, &to, T0 + 25, 10)
            .unwrap(),
        [sent[0]],
        "read and later messages are not covered"
    );
    assert_eq!(
        tx.sent_unread_up_to(Channel::Sms, SMS_NUMBER, &to, T0 + 30, 10)
            .unwrap(),
        [sent[0], sent[2]]
    );
    assert_eq!(
        tx.sent_unread_up_to(Channel::Sms, SMS_NUMBER, &to, T0 + 30, 1)
            .unwrap(),
        [sent[0]]
    );
    assert!(
        tx.sent_unread_up_to(Channel::Sms, "another account", &to, T0 + 30, 10)
            .unwrap()
            .is_empty()
    );
    assert!(
        tx.sent_unread_up_to(Channel::Whatsapp, SMS_NUMBER, &to, T0 + 30, 10)
            .unwrap()
            .is_empty()
    );

    // The provider thread of the customer's newest message on the channel.
    assert_eq!(tx.latest_provider_thread(conv, Channel::Sms).unwrap(), None);
    let mut group = inbound("g1", customer_phone, Channel::Sms, 40);
    group.thread_hints.provider_thread_id = Some("-100123/7".into());
    store(&mut *tx, &group, c, conv);
    assert_eq!(
        tx.latest_provider_thread(conv, Channel::Sms)
            .unwrap()
            .as_deref(),
        Some("-100123/7")
    );
    assert_eq!(
        tx.latest_provider_thread(conv, Channel::Email).unwrap(),
        None
    );
    // A newer private message: the reply goes there.
    let private = inbound("g2", customer_phone, Channel::Sms, 50);
    store(&mut *tx, &private, c, conv);
    assert_eq!(tx.latest_provider_thread(conv, Channel::Sms).unwrap(), None);
    assert_eq!(
        tx.latest_provider_thread(Uuid::now_v7(), Channel::Sms)
            .unwrap(),
        None
    );
    tx.commit().unwrap();
}

/// Lookups announced with `prefetch` answer as they would without it,
/// through the transaction's own writes, a rolled-back savepoint, a merge
/// and an erasure.
pub(crate) fn prefetched_lookups_follow_the_transactions_writes(s: &dyn Store) {
    let mut tx = s.begin().unwrap();
    let ada = customer(&mut *tx, &["email:ada@example.org"]);
    let conv = conversation(&mut *tx, ada, Channel::Email, 0);
    let first = inbound("pf-1", "email:ada@example.org", Channel::Email, 0);
    store(&mut *tx, &first, ada, conv);
    tx.commit().unwrap();

    let (ada_mail, bob_mail, bob_phone) = (
        ident("email:ada@example.org"),
        ident("email:bob@example.org"),
        ident("phone:+14155550199"),
    );
    let second = inbound("pf-2", "email:bob@example.org", Channel::Email, 1);
    let third = inbound("pf-3", "email:bob@example.org", Channel::Email, 2);
    let (k1, k2, k3) = (
        first.idempotency_key.as_str(),
        second.idempotency_key.as_str(),
        third.idempotency_key.as_str(),
    );
    let mut tx = s.begin().unwrap();
    tx.prefetch(&[k1, k2, k3, k1], &[&ada_mail, &bob_mail, &bob_phone])
        .unwrap();
    let found = tx.message_by_key(k1).unwrap().unwrap();
    assert_eq!(
        (found.id, found.customer_id, found.conversation_id),
        (first.id, ada, conv)
    );
    assert_eq!(tx.message_by_key(k2).unwrap(), None);
    assert_eq!(tx.owner_of(&ada_mail).unwrap(), Some(ada));
    assert_eq!(tx.owner_of(&bob_mail).unwrap(), None);

    // Written in this transaction after the prefetch.
    let bob = customer(&mut *tx, &["email:bob@example.org"]);
    assert_eq!(tx.owner_of(&bob_mail).unwrap(), Some(bob));
    let bob_conv = conversation(&mut *tx, bob, Channel::Email, 1);
    store(&mut *tx, &second, bob, bob_conv);
    assert_eq!(tx.message_by_key(k2).unwrap().unwrap().id, second.id);

    // Undone by a savepoint.
    tx.savepoint().unwrap();
    tx.attach_identity(&bob_phone, bob, "first seen", T0)
        .unwrap();
    store(&mut *tx, &third, bob, bob_conv);
    assert!(tx.message_by_key(k3).unwrap().is_some());
    assert_eq!(tx.owner_of(&bob_phone).unwrap(), Some(bob));
    tx.rollback_to_savepoint().unwrap();
    assert_eq!(tx.message_by_key(k3).unwrap(), None);
    assert_eq!(tx.owner_of(&bob_phone).unwrap(), None);
    assert_eq!(tx.message_by_key(k2).unwrap().unwrap().id, second.id);

    // Moved by a merge, gone with an erasure.
    tx.prefetch(&[k1, k2], &[&ada_mail, &bob_mail]).unwrap();
    tx.merge_customers(ada, bob, "same person", T0 + 5).unwrap();
    assert_eq!(tx.owner_of(&bob_mail).unwrap(), Some(ada));
    assert_eq!(tx.message_by_key(k2).unwrap().unwrap().customer_id, ada);
    tx.prefetch(&[k1, k2], &[&ada_mail, &bob_mail]).unwrap();
    tx.erase_customer(ada, T0 + 6).unwrap();
    assert_eq!(tx.message_by_key(k1).unwrap(), None);
    assert_eq!(tx.message_by_key(k2).unwrap(), None);
    assert_eq!(tx.owner_of(&ada_mail).unwrap(), None);
    assert_eq!(tx.owner_of(&bob_mail).unwrap(), None);
    tx.commit().unwrap();
}
