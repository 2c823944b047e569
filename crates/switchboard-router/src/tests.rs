//! Table-driven tests of identity resolution and threading against the real
//! stores: SQLite always, PostgreSQL too when `SWITCHBOARD_TEST_POSTGRES`
//! names a database (each case in a fresh schema; without it the PostgreSQL
//! runs print a notice and pass, except under CI, where they fail).

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::records::CommandSchema;
use switchboard_core::{
    Channel, Command, CommandKind, DeliveryState, Direction, Envelope, Identity, ThreadHints,
    ThreadRule, Trace,
};
use switchboard_store::{PgTestSchema, SqliteStore, Store};
use uuid::Uuid;

use crate::{Policy, Routed, Router};

const SUPPORT: &str = "support@example.com";
const SMS_NUMBER: &str = "+15550001111";

/// A message in a scenario.
#[derive(Clone)]
struct M {
    label: &'static str,
    channel: Channel,
    customer: &'static str,
    hours: f64,
    direction: Direction,
    subject: Option<&'static str>,
    message_id: Option<&'static str>,
    in_reply_to: &'static [&'static str],
    references: &'static [&'static str],
}

fn m(label: &'static str, channel: Channel, customer: &'static str, hours: f64) -> M {
    M {
        label,
        channel,
        customer,
        hours,
        direction: Direction::Inbound,
        subject: None,
        message_id: None,
        in_reply_to: &[],
        references: &[],
    }
}

impl M {
    fn subject(mut self, s: &'static str) -> Self {
        self.subject = Some(s);
        self
    }
    fn mid(mut self, s: &'static str) -> Self {
        self.message_id = Some(s);
        self
    }
    fn irt(mut self, s: &'static [&'static str]) -> Self {
        self.in_reply_to = s;
        self
    }
    fn refs(mut self, s: &'static [&'static str]) -> Self {
        self.references = s;
        self
    }
    fn outbound(mut self) -> Self {
        self.direction = Direction::Outbound;
        self
    }
}

enum Step {
    Msg(M),
    /// Deliver the message with this label again.
    Redeliver(&'static str),
    /// Resolve the conversation of this message, at this hour.
    Resolve(&'static str, f64),
    /// Link two identities (`kind:value`).
    Link(&'static str, &'static str, f64),
    /// Unlink an identity.
    Unlink(&'static str, f64),
    /// Erase the customer owning this identity.
    Erase(&'static str, f64),
}

enum Expect {
    SameConversation(&'static str, &'static str),
    NewConversation(&'static str, &'static str),
    Rule(&'static str, ThreadRule),
    SameCustomer(&'static str, &'static str),
    OtherCustomer(&'static str, &'static str),
    /// The customer owning the identity has this many messages.
    Messages(&'static str, usize),
    /// The identity was erased: unknown now, its customer a tombstone.
    Erased(&'static str),
    /// The customer owning the identity has `n` identities.
    Identities(&'static str, usize),
}

/// The store a test runs on.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Harness {
    /// Dropped before what it lives in (`_keep`).
    store: Box<dyn Store>,
    _keep: Box<dyn std::any::Any>,
    router: Router,
    t0: DateTime<Utc>,
    sent: HashMap<&'static str, Envelope>,
    routed: HashMap<&'static str, (Uuid, Uuid, ThreadRule)>,
}

impl Harness {
    fn new() -> Self {
        Harness::on(Backend::Sqlite, "").expect("sqlite")
    }

    /// A harness on an empty store of `backend`, or `None` when PostgreSQL
    /// is not configured (after a notice naming `test`).
    fn on(backend: Backend, test: &str) -> Option<Self> {
        let (store, keep): (Box<dyn Store>, Box<dyn std::any::Any>) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = SqliteStore::open(&dir.path().join("history.sqlite3")).unwrap();
                (Box::new(store), Box::new(dir))
            }
            Backend::Postgres => {
                let schema = PgTestSchema::from_env(test)?;
                (Box::new(schema.open(2).unwrap()), Box::new(schema))
            }
        };
        Some(Harness {
            store,
            _keep: keep,
            router: Router::new(Policy::default(), "events"),
            t0: "2026-11-01T08:00:00Z".parse().unwrap(),
            sent: HashMap::new(),
            routed: HashMap::new(),
        })
    }

    fn at(&self, hours: f64) -> DateTime<Utc> {
        self.t0 + Duration::milliseconds((hours * 3_600_000.0) as i64)
    }

    fn envelope(&self, m: &M) -> Envelope {
        let customer = Identity::parse(m.customer).unwrap();
        let ours = match m.channel {
            Channel::Email => Identity::parse(&format!("email:{SUPPORT}")).unwrap(),
            _ => Identity::parse(&format!("phone:{SMS_NUMBER}")).unwrap(),
        };
        let account = if m.channel == Channel::Email {
            SUPPORT
        } else {
            SMS_NUMBER
        };
        let (from, to) = match m.direction {
            Direction::Inbound => (customer, ours),
            Direction::Outbound => (ours, customer),
        };
        let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Envelope {
            schema: EnvelopeSchema::V1,
            id: Uuid::now_v7(),
            idempotency_key: format!("{}:{}:{}", m.channel, account, m.label),
            channel: m.channel,
            provider: "test".into(),
            account: account.into(),
            direction: m.direction,
            from,
            to,
            sent_at: None,
            received_at: self.at(m.hours),
            subject: m.subject.map(str::to_owned),
            text: format!("message {}", m.label),
            attachments: vec![],
            thread_hints: ThreadHints {
                message_id: m.message_id.map(str::to_owned),
                in_reply_to: strs(m.in_reply_to),
                references: strs(m.references),
                provider_thread_id: None,
            },
            provider_raw: None,
            trace: Trace::default(),
            automated: None,
            change: None,
        }
    }

    fn deliver(&mut self, label: &'static str, env: &Envelope) -> Routed {
        let mut tx = self.store.begin().unwrap();
        let routed = self.router.route(&mut *tx, env).unwrap();
        tx.commit().unwrap();
        if let Routed::Stored {
            customer_id,
            conversation_id,
            rule,
            ..
        } = &routed
        {
            self.routed
                .insert(label, (*conversation_id, *customer_id, *rule));
        }
        routed
    }

    fn command(&mut self, kind: CommandKind, hours: f64) {
        let cmd = Command {
            schema: CommandSchema::V1,
            id: Uuid::now_v7(),
            at: self.at(hours),
            kind,
        };
        let mut tx = self.store.begin().unwrap();
        self.router.apply(&mut *tx, &cmd).unwrap();
        tx.commit().unwrap();
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Msg(m) => {
                let env = self.envelope(&m);
                let routed = self.deliver(m.label, &env);
                assert!(
                    matches!(routed, Routed::Stored { .. }),
                    "{}: {routed:?}",
                    m.label
                );
                self.sent.insert(m.label, env);
            }
            Step::Redeliver(label) => {
                let env = self.sent[label].clone();
                let routed = self.deliver(label, &env);
                assert!(
                    matches!(routed, Routed::Duplicate { .. }),
                    "{label}: {routed:?}"
                );
            }
            Step::Resolve(label, hours) => {
                let conversation_id = self.conv(label);
                self.command(CommandKind::ConversationResolve { conversation_id }, hours);
            }
            Step::Link(a, b, hours) => self.command(
                CommandKind::IdentityLink {
                    a: Identity::parse(a).unwrap(),
                    b: Identity::parse(b).unwrap(),
                    evidence: "crm says so".into(),
                },
                hours,
            ),
            Step::Unlink(identity, hours) => self.command(
                CommandKind::IdentityUnlink {
                    identity: Identity::parse(identity).unwrap(),
                    evidence: None,
                },
                hours,
            ),
            Step::Erase(identity, hours) => {
                let customer_id = self.customer_of(identity).unwrap();
                self.command(CommandKind::CustomerErase { customer_id }, hours);
            }
        }
    }

    /// The conversation a message is stored in now (merges move them).
    fn conv(&self, label: &str) -> Uuid {
        let env = &self.sent[label];
        let mut tx = self.store.begin().unwrap();
        tx.message_by_key(&env.idempotency_key)
            .unwrap()
            .unwrap()
            .conversation_id
    }

    fn customer(&self, label: &str) -> Uuid {
        let env = &self.sent[label];
        let mut tx = self.store.begin().unwrap();
        tx.message_by_key(&env.idempotency_key)
            .unwrap()
            .unwrap()
            .customer_id
    }

    fn customer_of(&self, identity: &str) -> Option<Uuid> {
        self.store
            .customer_by_identity(&Identity::parse(identity).unwrap())
            .unwrap()
            .map(|c| c.id)
    }

    fn check(&self, case: &str, e: &Expect) {
        match e {
            Expect::SameConversation(a, b) => {
                assert_eq!(
                    self.conv(a),
                    self.conv(b),
                    "{case}: {a} and {b} should share a conversation"
                )
            }
            Expect::NewConversation(a, b) => {
                assert_ne!(
                    self.conv(a),
                    self.conv(b),
                    "{case}: {a} and {b} should not share a conversation"
                )
            }
            Expect::Rule(a, rule) => assert_eq!(self.routed[a].2, *rule, "{case}: rule of {a}"),
            Expect::SameCustomer(a, b) => {
                assert_eq!(
                    self.customer(a),
                    self.customer(b),
                    "{case}: {a} and {b} same customer"
                )
            }
            Expect::OtherCustomer(a, b) => {
                assert_ne!(
                    self.customer(a),
                    self.customer(b),
                    "{case}: {a} and {b} other customers"
                )
            }
            Expect::Messages(identity, n) => {
                let id = self.customer_of(identity).expect("customer");
                let t = self.store.timeline(id, None, 1000).unwrap().unwrap();
                assert_eq!(t.messages.len(), *n, "{case}: messages of {identity}");
                let mut sorted = t.messages.clone();
                sorted.sort_by_key(|m| (m.received_at, m.seq));
                assert_eq!(sorted, t.messages, "{case}: timeline in order");
            }
            Expect::Erased(identity) => {
                assert_eq!(
                    self.customer_of(identity),
                    None,
                    "{case}: {identity} erased"
                );
                for env in self
                    .sent
                    .values()
                    .filter(|e| e.customer_identity().to_string() == *identity)
                {
                    let mut tx = self.store.begin().unwrap();
                    assert!(
                        tx.message_by_key(&env.idempotency_key).unwrap().is_none(),
                        "{case}: message kept"
                    );
                }
            }
            Expect::Identities(identity, n) => {
                let id = self.customer_of(identity).expect("customer");
                let c = self.store.customer(id).unwrap().unwrap();
                assert_eq!(
                    c.identities.len(),
                    *n,
                    "{case}: identities of {identity}: {:?}",
                    c.identities
                );
            }
        }
    }
}

const ADA: &str = "email:ada@example.org";
const ADA_PHONE: &str = "phone:+14155550100";
const ADA_WA: &str = "whatsapp:+14155550100";
const BOB: &str = "email:bob@example.org";

#[test]
fn threading_and_identity_table() {
    threading_and_identity_table_on(Backend::Sqlite);
}

#[test]
fn threading_and_identity_table_postgres() {
    threading_and_identity_table_on(Backend::Postgres);
}

fn threading_and_identity_table_on(backend: Backend) {
    use Channel::{Email, Sms, Whatsapp};
    use Expect::*;
    use Step::*;
    let cases: Vec<(&str, Vec<Step>, Vec<Expect>)> = vec![
        (
            "reply whose In-Reply-To names one of our outbound messages",
            vec![
                Msg(m("q", Email, ADA, 0.0).subject("Order 1042").mid("q@ada")),
                Msg(m("ours", Email, ADA, 1.0)
                    .outbound()
                    .subject("Re: Order 1042")
                    .mid("sb.1@switchboard")
                    .irt(&["q@ada"])),
                Msg(m("other", Email, ADA, 1.5)
                    .subject("Something else")
                    .mid("o@ada")),
                Msg(m("reply", Email, ADA, 30.0)
                    .subject("Totally new subject")
                    .mid("r@ada")
                    .irt(&["sb.1@switchboard"])),
            ],
            vec![
                SameConversation("q", "ours"),
                SameConversation("q", "reply"),
                Rule("reply", ThreadRule::InReplyTo),
                NewConversation("q", "other"),
            ],
        ),
        (
            "References are used newest first",
            vec![
                Msg(m("a", Email, ADA, 0.0).subject("A").mid("a@ada")),
                Msg(m("b", Email, ADA, 0.1).subject("B").mid("b@ada")),
                Msg(m("c", Email, ADA, 0.2)
                    .subject("Re: A")
                    .mid("c@ada")
                    .refs(&["a@ada", "b@ada"])),
            ],
            vec![
                NewConversation("a", "b"),
                SameConversation("b", "c"),
                Rule("c", ThreadRule::References),
            ],
        ),
        (
            "a parent that is missing opens a conversation unless the subject matches",
            vec![
                Msg(m("a", Email, ADA, 0.0).subject("Invoice").mid("a@ada")),
                Msg(m("b", Email, ADA, 1.0)
                    .subject("Re: Shipping")
                    .mid("b@ada")
                    .irt(&["never-seen@x"])),
                Msg(m("c", Email, ADA, 2.0)
                    .subject("Re: Invoice")
                    .mid("c@ada")
                    .irt(&["never-seen-2@x"])),
            ],
            vec![
                NewConversation("a", "b"),
                Rule("b", ThreadRule::New),
                SameConversation("a", "c"),
                Rule("c", ThreadRule::Window),
            ],
        ),
        (
            "no headers: Re: and AW: subjects thread by subject within the window",
            vec![
                Msg(m("a", Email, ADA, 0.0).subject("Broken charger")),
                Msg(m("b", Email, ADA, 1.0).subject("Re: Broken charger")),
                Msg(m("c", Email, ADA, 2.0).subject("AW: RE: broken charger")),
                Msg(m("d", Email, ADA, 3.0).subject("A different question")),
            ],
            vec![
                SameConversation("a", "b"),
                SameConversation("a", "c"),
                Rule("c", ThreadRule::Window),
                NewConversation("a", "d"),
            ],
        ),
        (
            "an SMS 25 h after the last one opens a new conversation",
            vec![
                Msg(m("a", Sms, ADA_PHONE, 0.0)),
                Msg(m("b", Sms, ADA_PHONE, 23.0)),
                Msg(m("c", Sms, ADA_PHONE, 48.0)),
            ],
            vec![
                SameConversation("a", "b"),
                Rule("b", ThreadRule::Window),
                NewConversation("b", "c"),
                Rule("c", ThreadRule::New),
            ],
        ),
        (
            "an SMS that follows an email within the continuation window joins it",
            vec![
                Link(ADA, ADA_PHONE, 0.0),
                Msg(m("mail", Email, ADA, 0.0).subject("Where is my order")),
                Msg(m("sms", Sms, ADA_PHONE, 1.5)),
                Msg(m("late", Sms, ADA_PHONE, 30.0)),
            ],
            vec![
                SameConversation("mail", "sms"),
                Rule("sms", ThreadRule::Continuation),
                NewConversation("mail", "late"),
            ],
        ),
        (
            "a message 3 days after resolve reopens; 10 days after opens a new one",
            vec![
                Msg(m("a", Sms, ADA_PHONE, 0.0)),
                Resolve("a", 1.0),
                Msg(m("b", Sms, ADA_PHONE, 73.0)),
                Resolve("b", 74.0),
                Msg(m("c", Sms, ADA_PHONE, 74.0 + 240.0)),
            ],
            vec![
                SameConversation("a", "b"),
                Rule("b", ThreadRule::Window),
                NewConversation("b", "c"),
            ],
        ),
        (
            "an email reply to a resolved conversation reopens it within 7 days, not after",
            vec![
                Msg(m("a", Email, ADA, 0.0).subject("Refund").mid("a@ada")),
                Resolve("a", 1.0),
                Msg(m("b", Email, ADA, 50.0)
                    .subject("Re: Refund")
                    .mid("b@ada")
                    .irt(&["a@ada"])),
                Resolve("b", 51.0),
                Msg(m("c", Email, ADA, 51.0 + 24.0 * 8.0)
                    .subject("Re: Refund")
                    .mid("c@ada")
                    .irt(&["b@ada"])),
            ],
            vec![
                SameConversation("a", "b"),
                Rule("b", ThreadRule::InReplyTo),
                NewConversation("a", "c"),
                Rule("c", ThreadRule::New),
            ],
        ),
        (
            "a WhatsApp id links to the same phone seen on SMS",
            vec![
                Msg(m("sms", Sms, ADA_PHONE, 0.0)),
                Msg(m("wa", Whatsapp, ADA_WA, 5.0)),
            ],
            vec![
                SameCustomer("sms", "wa"),
                Identities(ADA_PHONE, 2),
                NewConversation("sms", "wa"),
            ],
        ),
        (
            "a link command merges two customers that both have history",
            vec![
                Msg(m("mail1", Email, ADA, 0.0).subject("Hello")),
                Msg(m("mail2", Email, ADA, 0.5).subject("Re: Hello")),
                Msg(m("sms1", Sms, ADA_PHONE, 10.0)),
                Msg(m("sms2", Sms, ADA_PHONE, 10.5)),
                Link(ADA_PHONE, ADA, 11.0),
                Msg(m("bob", Email, BOB, 11.0).subject("Hello")),
            ],
            vec![
                SameCustomer("mail1", "sms2"),
                Messages(ADA, 4),
                Messages(ADA_PHONE, 4),
                Identities(ADA, 2),
                SameConversation("mail1", "mail2"),
                SameConversation("sms1", "sms2"),
                OtherCustomer("mail1", "bob"),
            ],
        ),
        (
            "unlink splits the merge again",
            vec![
                Msg(m("mail", Email, ADA, 0.0).subject("Hello")),
                Msg(m("sms", Sms, ADA_PHONE, 10.0)),
                Link(ADA_PHONE, ADA, 11.0),
                Unlink(ADA_PHONE, 12.0),
            ],
            vec![
                OtherCustomer("mail", "sms"),
                Messages(ADA, 1),
                Messages(ADA_PHONE, 1),
                Identities(ADA, 1),
            ],
        ),
        (
            "erase leaves a tombstone and nothing else",
            vec![
                Msg(m("a", Email, ADA, 0.0).subject("Hi")),
                Msg(m("b", Sms, ADA_PHONE, 1.0)),
                Link(ADA, ADA_PHONE, 2.0),
                Msg(m("bob", Email, BOB, 2.0).subject("Hi")),
                Erase(ADA, 3.0),
            ],
            vec![Erased(ADA), Erased(ADA_PHONE), Messages(BOB, 1)],
        ),
        (
            "out-of-order arrival of an email and its reply",
            vec![
                Msg(m("reply", Email, ADA, 1.0)
                    .subject("Re: Order")
                    .mid("r@ada")
                    .irt(&["p@ada"])
                    .refs(&["p@ada"])),
                Msg(m("parent", Email, ADA, 0.0).subject("Order").mid("p@ada")),
            ],
            vec![
                SameConversation("reply", "parent"),
                Rule("parent", ThreadRule::ReferencedBy),
                Messages(ADA, 2),
            ],
        ),
        (
            "a redelivered message changes nothing",
            vec![
                Msg(m("a", Sms, ADA_PHONE, 0.0)),
                Redeliver("a"),
                Redeliver("a"),
            ],
            vec![Messages(ADA_PHONE, 1)],
        ),
        (
            "other customers never share a conversation even on the same account",
            vec![
                Msg(m("ada", Email, ADA, 0.0).subject("Hi")),
                Msg(m("bob", Email, BOB, 0.1).subject("Hi")),
            ],
            vec![NewConversation("ada", "bob"), OtherCustomer("ada", "bob")],
        ),
    ];
    for (name, steps, expects) in cases {
        let Some(mut h) = Harness::on(backend, "threading_and_identity_table") else {
            return;
        };
        for step in steps {
            h.run(step);
        }
        for e in &expects {
            h.check(name, e);
        }
    }
}

#[test]
fn events_land_in_the_outbox_with_the_effect() {
    events_land_in_the_outbox_with_the_effect_on(Harness::new());
}

#[test]
fn events_land_in_the_outbox_with_the_effect_postgres() {
    if let Some(h) = Harness::on(
        Backend::Postgres,
        "events_land_in_the_outbox_with_the_effect",
    ) {
        events_land_in_the_outbox_with_the_effect_on(h);
    }
}

fn events_land_in_the_outbox_with_the_effect_on(mut h: Harness) {
    h.run(Step::Msg(m("a", Channel::Sms, ADA_PHONE, 0.0)));
    let outbox = h.store.outbox(100).unwrap();
    let types: Vec<String> = outbox
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            v["type"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        types,
        [
            "customer.created",
            "conversation.opened",
            "message.received"
        ]
    );
    let customer = h.customer("a").to_string();
    assert!(outbox.iter().all(|r| r.key == customer.as_bytes()));
    h.run(Step::Redeliver("a"));
    assert_eq!(
        h.store.outbox(100).unwrap().len(),
        3,
        "a duplicate emits nothing"
    );
}

#[test]
fn commands_apply_once_and_reject_the_impossible() {
    commands_apply_once_and_reject_the_impossible_on(Harness::new());
}

#[test]
fn commands_apply_once_and_reject_the_impossible_postgres() {
    if let Some(h) = Harness::on(
        Backend::Postgres,
        "commands_apply_once_and_reject_the_impossible",
    ) {
        commands_apply_once_and_reject_the_impossible_on(h);
    }
}

fn commands_apply_once_and_reject_the_impossible_on(mut h: Harness) {
    h.run(Step::Msg(m("a", Channel::Sms, ADA_PHONE, 0.0)));
    let conversation_id = h.conv("a");
    let cmd = Command {
        schema: CommandSchema::V1,
        id: Uuid::now_v7(),
        at: h.at(1.0),
        kind: CommandKind::ConversationResolve { conversation_id },
    };
    for expected in [1, 0] {
        let mut tx = h.store.begin().unwrap();
        let events = h.router.apply(&mut *tx, &cmd).unwrap();
        tx.commit().unwrap();
        assert_eq!(events.len(), expected);
    }
    let bad = Command {
        id: Uuid::now_v7(),
        kind: CommandKind::ConversationResolve {
            conversation_id: Uuid::now_v7(),
        },
        ..cmd
    };
    let mut tx = h.store.begin().unwrap();
    let err = h.router.apply(&mut *tx, &bad).unwrap_err();
    assert!(err.to_string().starts_with("unknown conversation"), "{err}");
}

/// What routing a change should do.
#[derive(Debug)]
enum ChangeOutcome {
    /// Recorded as this version.
    Version(i64),
    /// Seen before: nothing changes.
    Duplicate,
    /// Refused with a reason containing this.
    Refused(&'static str),
}

/// A change in a table case: key, target, kind, new text, emoji, who.
type ChangeRow = (
    &'static str,
    &'static str,
    switchboard_core::MessageChangeKind,
    &'static str,
    Option<&'static str>,
    &'static str,
);

#[test]
fn changes_table() {
    changes_table_on(Backend::Sqlite);
}

#[test]
fn changes_table_postgres() {
    changes_table_on(Backend::Postgres);
}

/// Edits, reactions and deletions change the stored message (keeping its
/// earlier versions) and never add one.
fn changes_table_on(backend: Backend) {
    use ChangeOutcome::*;
    use switchboard_core::MessageChangeKind::{Delete, Edit, Reaction, ReactionRemoved};
    const OTHER: &str = "whatsapp:+14155550199";
    // (case, changes and what each does, final text, versions, reactions,
    // deleted)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        Vec<(ChangeRow, ChangeOutcome)>,
        &str,
        i64,
        Vec<(&str, &str)>,
        bool,
    )> = vec![
        (
            "an edit replaces the text and keeps the old one",
            vec![(
                ("e1", "wamid.A", Edit, "hello, fixed", None, ADA_WA),
                Version(1),
            )],
            "hello, fixed",
            1,
            vec![],
            false,
        ),
        (
            "a redelivered edit is applied once",
            vec![
                (("e1", "wamid.A", Edit, "second", None, ADA_WA), Version(1)),
                (("e1", "wamid.A", Edit, "second", None, ADA_WA), Duplicate),
                (("e2", "wamid.A", Edit, "third", None, ADA_WA), Version(2)),
            ],
            "third",
            2,
            vec![],
            false,
        ),
        (
            "reactions are kept per person; a new one replaces, removal clears",
            vec![
                (
                    ("r1", "wamid.A", Reaction, "", Some("👍"), ADA_WA),
                    Version(1),
                ),
                (
                    ("r2", "wamid.A", Reaction, "", Some("❤️"), ADA_WA),
                    Version(2),
                ),
                (
                    ("r3", "wamid.A", Reaction, "", Some("😮"), OTHER),
                    Version(3),
                ),
                (
                    ("r4", "wamid.A", ReactionRemoved, "", None, OTHER),
                    Version(4),
                ),
            ],
            "message a",
            4,
            vec![(ADA_WA, "❤️")],
            false,
        ),
        (
            "a deletion empties the text, which the versions keep",
            vec![
                (("e1", "wamid.A", Edit, "edited", None, ADA_WA), Version(1)),
                (("d1", "wamid.A", Delete, "", None, ADA_WA), Version(2)),
            ],
            "",
            2,
            vec![],
            true,
        ),
        (
            "a reaction to our own message finds it by the provider's answer",
            vec![(
                ("r1", "wamid.OURS", Reaction, "", Some("🙏"), ADA_WA),
                Version(1),
            )],
            "message a",
            0,
            vec![],
            false,
        ),
        (
            "a change of an unknown message is refused",
            vec![(
                ("e1", "wamid.NOPE", Edit, "x", None, ADA_WA),
                Refused("change for unknown message wamid.NOPE"),
            )],
            "message a",
            0,
            vec![],
            false,
        ),
    ];
    for (case, changes, text, versions, reactions, deleted) in cases {
        let Some(mut h) = Harness::on(backend, "changes_table") else {
            return;
        };
        let a = m("a", Channel::Whatsapp, ADA_WA, 0.0).mid("wamid.A");
        let mut env = h.envelope(&a);
        env.account = SMS_NUMBER.into();
        h.deliver("a", &env);
        h.sent.insert("a", env.clone());
        // One of ours, which the provider answered with wamid.OURS.
        let ours = m("ours", Channel::Whatsapp, ADA_WA, 0.5).outbound();
        let ours_env = h.envelope(&ours);
        h.deliver("ours", &ours_env);
        let mut tx = h.store.begin().unwrap();
        let rec = switchboard_store::OutboundRecord {
            idempotency_key: "req-1".into(),
            message_id: ours_env.id,
            conversation_id: h.routed["ours"].0,
            customer_id: h.routed["ours"].1,
            channel: Channel::Whatsapp,
            account: SMS_NUMBER.into(),
            to: Identity::parse(ADA_WA).unwrap(),
            state: switchboard_store::OutboundState::Sent,
            attempts: 1,
            provider_message_id: Some("wamid.OURS".into()),
            error: None,
            created_at: 0,
            updated_at: 0,
        };
        tx.put_outbound(&rec, "{}").unwrap();
        tx.commit().unwrap();

        for (i, ((key, target, kind, new_text, emoji, by), want)) in changes.iter().enumerate() {
            let mut c = env.clone();
            c.id = Uuid::now_v7();
            c.idempotency_key = format!("whatsapp:{SMS_NUMBER}:{key}");
            c.from = Identity::parse(by).unwrap();
            c.text = (*new_text).to_owned();
            c.received_at = h.at(1.0 + i as f64);
            c.thread_hints = ThreadHints::default();
            c.change = Some(switchboard_core::MessageChange {
                kind: *kind,
                target: (*target).to_owned(),
                emoji: emoji.map(str::to_owned),
            });
            let mut tx = h.store.begin().unwrap();
            let got = h.router.route(&mut *tx, &c);
            match (want, &got) {
                (
                    Version(v),
                    Ok(Routed::Changed {
                        version, events, ..
                    }),
                ) => {
                    assert_eq!(version, v, "{case}: change {i}");
                    let name = events[0].kind.type_name();
                    let expected = match kind {
                        Edit => "message.edited",
                        Reaction | ReactionRemoved => "message.reacted",
                        Delete => "message.deleted",
                    };
                    assert_eq!(name, expected, "{case}: change {i}");
                }
                (Duplicate, Ok(Routed::Duplicate { .. })) => {}
                (Refused(why), Err(e)) => assert!(e.to_string().contains(why), "{case}: {e}"),
                _ => panic!("{case}: change {i}: wanted {want:?}, got {got:?}"),
            }
            tx.commit().unwrap();
        }

        let conv = h.conv("a");
        let (_, msgs) = h.store.conversation(conv).unwrap().unwrap();
        assert_eq!(msgs.len(), 2, "{case}: no message added");
        let target = if changes[0].0.1 == "wamid.OURS" {
            msgs.iter().find(|m| m.id == ours_env.id).unwrap()
        } else {
            msgs.iter().find(|m| m.id == env.id).unwrap()
        };
        let (text, versions) = if changes[0].0.1 == "wamid.OURS" {
            ("message ours", 1)
        } else {
            (text, versions)
        };
        assert_eq!(target.text, text, "{case}: text");
        assert_eq!(target.versions, versions, "{case}: versions");
        let want: std::collections::BTreeMap<String, String> = reactions
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if changes[0].0.1 != "wamid.OURS" {
            assert_eq!(target.reactions, want, "{case}: reactions");
        }
        assert_eq!(target.deleted_at.is_some(), deleted, "{case}: deleted");
        // Every earlier text is kept, in order.
        let kept = h.store.message_versions(target.id).unwrap();
        assert_eq!(kept.len() as i64, versions, "{case}: versions kept");
        if let Some(first) = kept.first()
            && changes[0].0.2 == Edit
        {
            assert_eq!(first.previous_text, "message a", "{case}: original kept");
        }
        if deleted {
            assert_eq!(kept.last().unwrap().previous_text, "edited", "{case}");
        }
    }
}

#[test]
fn provider_statuses_and_echoes_resolve_against_the_history() {
    provider_statuses_and_echoes_on(Backend::Sqlite);
}

#[test]
fn provider_statuses_and_echoes_resolve_against_the_history_postgres() {
    provider_statuses_and_echoes_on(Backend::Postgres);
}

/// `message.provider_status` names our sends by the provider's ids or by
/// recipient and read watermark; an echo naming a provider id our send
/// recorded is a duplicate.
fn provider_statuses_and_echoes_on(backend: Backend) {
    let Some(mut h) = Harness::on(backend, "provider_statuses") else {
        return;
    };
    let a = m("a", Channel::Whatsapp, ADA_WA, 0.0);
    let env = h.envelope(&a);
    h.deliver("a", &env);
    h.sent.insert("a", env);
    // Two sends, recorded sent at 1 h and 2 h with provider ids.
    let mut ours = Vec::new();
    for (i, (label, hours, pid)) in [("o1", 1.0, "wamid.O1"), ("o2", 2.0, "wamid.O2")]
        .into_iter()
        .enumerate()
    {
        let o = h.envelope(&m(label, Channel::Whatsapp, ADA_WA, hours).outbound());
        h.deliver(label, &o);
        let mut tx = h.store.begin().unwrap();
        tx.put_outbound(
            &switchboard_store::OutboundRecord {
                idempotency_key: format!("req-{i}"),
                message_id: o.id,
                conversation_id: h.routed[label].0,
                customer_id: h.routed[label].1,
                channel: Channel::Whatsapp,
                account: SMS_NUMBER.into(),
                to: Identity::parse(ADA_WA).unwrap(),
                state: switchboard_store::OutboundState::Sent,
                attempts: 1,
                provider_message_id: Some(pid.into()),
                error: None,
                created_at: h.at(hours).timestamp_millis(),
                updated_at: h.at(hours).timestamp_millis(),
            },
            "{}",
        )
        .unwrap();
        tx.commit().unwrap();
        ours.push(o);
    }
    let status_of = |h: &Harness, id: Uuid| {
        let (_, msgs) = h.store.conversation(h.conv("a")).unwrap().unwrap();
        msgs.into_iter()
            .find(|m| m.id == id)
            .and_then(|m| m.status)
            .unwrap_or_default()
    };
    let status =
        |status, ids: &[&str], watermark: Option<f64>, h: &Harness| CommandKind::ProviderStatus {
            channel: Channel::Whatsapp,
            account: SMS_NUMBER.into(),
            status,
            provider_message_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            recipient: watermark.map(|_| Identity::parse(ADA_WA).unwrap()),
            read_up_to: watermark.map(|w| h.at(w)),
            error: None,
        };
    // By id: delivered; an unknown id is skipped, not refused.
    let cmd = status(
        DeliveryState::Delivered,
        &["wamid.O2", "wamid.NOPE"],
        None,
        &h,
    );
    h.command(cmd, 3.0);
    assert_eq!(status_of(&h, ours[1].id), "delivered");
    assert_eq!(status_of(&h, ours[0].id), "sent");
    // A read watermark at 1.5 h covers the first send only.
    let cmd = status(DeliveryState::Read, &[], Some(1.5), &h);
    h.command(cmd, 3.0);
    assert_eq!(status_of(&h, ours[0].id), "read");
    assert_eq!(status_of(&h, ours[1].id), "delivered");
    // One at 2.5 h covers the second; every status went to delivery.v1.
    let cmd = status(DeliveryState::Read, &[], Some(2.5), &h);
    h.command(cmd, 3.0);
    assert_eq!(status_of(&h, ours[1].id), "read");
    let deliveries = h
        .store
        .outbox(100)
        .unwrap()
        .into_iter()
        .filter(|r| r.topic == switchboard_core::Topics::default().delivery)
        .count();
    assert_eq!(deliveries, 3);

    // The platform's echo of our second send (no metadata): a duplicate.
    let mut echo = h.envelope(&m("echo", Channel::Whatsapp, ADA_WA, 2.1).outbound());
    echo.thread_hints.message_id = Some("wamid.O2".into());
    let mut tx = h.store.begin().unwrap();
    let routed = h.router.route(&mut *tx, &echo).unwrap();
    tx.commit().unwrap();
    assert!(
        matches!(routed, Routed::Duplicate { message_id, .. } if message_id == ours[1].id),
        "{routed:?}"
    );
    // An echo of a message sent elsewhere is stored.
    echo.id = Uuid::now_v7();
    echo.idempotency_key = "whatsapp:elsewhere".into();
    echo.thread_hints.message_id = Some("wamid.ELSEWHERE".into());
    let routed = h.deliver("elsewhere", &echo);
    assert!(matches!(routed, Routed::Stored { .. }), "{routed:?}");
}

/// On PostgreSQL the two stages of re-keyed routing run at the same time:
/// a threading transaction that read identities and stored a message must
/// still commit after an identity transaction created a customer meanwhile.
/// (When resolving read messages by key, the two formed a serialization
/// cycle and the threading batch failed again and again under a steady
/// load.)
#[test]
fn threading_commits_while_identities_are_resolved_postgres() {
    let Some(h) = Harness::on(
        Backend::Postgres,
        "threading_commits_while_identities_are_resolved",
    ) else {
        return;
    };
    let known = h.envelope(&m("known", Channel::Sms, ADA_PHONE, 0.0));
    let mut tx = h.store.begin().unwrap();
    h.router.route(&mut *tx, &known).unwrap();
    tx.commit().unwrap();

    for round in 0..3 {
        let hours = f64::from(round) + 1.0;
        let next = h.envelope(&m("next", Channel::Sms, ADA_PHONE, hours));
        let mut next = next;
        next.idempotency_key = format!("sms:next-{round}");
        next.id = uuid::Uuid::now_v7();
        // Threading reads the batch's identities and keys first, and
        // stores the message after the identity transaction committed.
        let mut threading = h.store.begin().unwrap();
        h.router.prefetch(&mut *threading, &[&next], false).unwrap();

        let newcomer = Identity::parse(&format!("email:new-{round}@example.org")).unwrap();
        let mut fresh = next.clone();
        fresh.channel = Channel::Email;
        fresh.from = newcomer.clone();
        fresh.idempotency_key = format!("email:fresh-{round}");
        fresh.id = uuid::Uuid::now_v7();
        let mut identity = h.store.begin().unwrap();
        h.router.prefetch(&mut *identity, &[&fresh], true).unwrap();
        let created = h.router.resolve(&mut *identity, &fresh).unwrap();
        identity.commit().unwrap();

        h.router.route(&mut *threading, &next).unwrap();
        threading
            .commit()
            .unwrap_or_else(|e| panic!("round {round}: threading failed to commit: {e}"));
        assert_eq!(
            h.store
                .customer_by_identity(&newcomer)
                .unwrap()
                .map(|c| c.id),
            Some(created)
        );
    }
}

/// A platform's echo of our send carries our key: resolving it answers with
/// the customer the reply was stored under, even when the recipient's
/// identity on that platform belongs to nobody yet, and creates no customer.
#[test]
fn resolving_an_echo_of_our_send_creates_no_customer() {
    let h = Harness::new();
    let asked = h.envelope(&m("asked", Channel::Email, ADA, 0.0));
    let mut tx = h.store.begin().unwrap();
    let ada = match h.router.route(&mut *tx, &asked).unwrap() {
        Routed::Stored { customer_id, .. } => customer_id,
        other => panic!("not stored: {other:?}"),
    };
    // The reply went out on Messenger to a PSID nobody owns yet (an
    // explicit recipient), stored under Ada by the dispatcher.
    let psid = "messenger_psid:7001";
    let mut reply = h.envelope(&M {
        direction: Direction::Outbound,
        ..m("reply", Channel::Messenger, psid, 1.0)
    });
    reply.idempotency_key = "outbound:reply-1".into();
    h.router
        .record_outbound(&mut *tx, &reply, ada, None, "sent")
        .unwrap();
    tx.commit().unwrap();

    let mut echo = reply.clone();
    echo.id = uuid::Uuid::now_v7();
    let mut tx = h.store.begin().unwrap();
    h.router.prefetch(&mut *tx, &[&echo], true).unwrap();
    assert_eq!(h.router.resolve(&mut *tx, &echo).unwrap(), ada);
    tx.commit().unwrap();
    let psid = Identity::parse(psid).unwrap();
    assert_eq!(h.store.customer_by_identity(&psid).unwrap(), None);
}
