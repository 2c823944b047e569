//! 1,000 messages from 100 customers on mixed channels, posted concurrently
//! through the API, end up in each customer's history: found by normalized
//! identity, every message exactly once, in `received_at` order, each in a
//! conversation that exists and holds it, and pages that concatenate to the
//! whole timeline. A redelivered envelope is accepted but not stored twice.
//!
//! Each test runs on the embedded log and SQLite, and again (`*_kafka_pg`)
//! on Kafka and PostgreSQL (see `backend_tests!`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_e2e::{
    Api, BASE_MS, Backend, Rng, StatusCode, TestDir, backend_tests, envelope, metric_sum,
    parse_millis, post_all, str_field, wait_for,
};

backend_tests! {
    thousand_messages:
        a_thousand_messages_reach_their_histories,
        a_thousand_messages_reach_their_histories_kafka_pg;
    pages_over_equal_times:
        pages_over_equal_times_neither_skip_nor_repeat,
        pages_over_equal_times_neither_skip_nor_repeat_kafka_pg;
    consistent_pages:
        timeline_pages_are_consistent_while_routing,
        timeline_pages_are_consistent_while_routing_kafka_pg;
}

const CUSTOMERS: usize = 100;
const PER_CUSTOMER: usize = 10;
const CONCURRENCY: usize = 32;

/// What the test posted for one customer.
struct Customer {
    /// Identities to look the customer up by (some deliberately written
    /// unnormalized); all must find the same customer.
    lookups: Vec<String>,
    /// Identities the customer must hold, normalized (`kind:value`).
    identities: Vec<String>,
    /// Conversations its messages must form.
    conversations: usize,
    /// Posted envelopes, in `received_at` order.
    posted: Vec<Posted>,
}

struct Posted {
    key: String,
    received_ms: i64,
    channel: &'static str,
    /// The sender as stored: normalized.
    from: (&'static str, String),
    envelope: Value,
}

fn customer(c: usize) -> Customer {
    let mut posted = Vec::new();
    let (lookups, identities, conversations);
    let at = |i: usize| BASE_MS + c as i64 * 1_000 + i as i64 * 60_000;
    match c % 5 {
        // Email: addresses in several spellings, two threads told apart by
        // subject and Message-ID chains.
        0 => {
            let addr = format!("customer{c}@example.com");
            for i in 0..PER_CUSTOMER {
                let written = match i % 3 {
                    0 => format!("Customer{c}@Example.COM"),
                    1 => format!("Customer {c} <customer{c}@example.com>"),
                    _ => format!("  customer{c}@example.com "),
                };
                let key = format!("email:support:c{c}.m{i}");
                let mut env = envelope(
                    &key,
                    "email",
                    "imap",
                    "support@switchboard.test",
                    ("email", &written),
                    ("email", "support@switchboard.test"),
                    at(i),
                    &format!("email {i} from customer {c}"),
                );
                let (thread, first) = if i < PER_CUSTOMER / 2 {
                    ("Order", 0)
                } else {
                    ("Invoice", PER_CUSTOMER / 2)
                };
                env["subject"] = if i == first {
                    json!(format!("{thread} {c}"))
                } else {
                    json!(format!("Re: {thread} {c}"))
                };
                let mut hints = json!({"message_id": format!("<c{c}.m{i}@mail.example>")});
                if i > first {
                    hints["in_reply_to"] = json!([format!("<c{c}.m{}@mail.example>", i - 1)]);
                    hints["references"] = json!(
                        (first..i)
                            .map(|j| format!("<c{c}.m{j}@mail.example>"))
                            .collect::<Vec<_>>()
                    );
                }
                env["thread_hints"] = hints;
                posted.push(Posted {
                    key,
                    received_ms: at(i),
                    channel: "email",
                    from: ("email", addr.clone()),
                    envelope: env,
                });
            }
            lookups = vec![
                format!("email:{addr}"),
                format!("email:CUSTOMER{c}@EXAMPLE.COM"),
            ];
            identities = vec![format!("email:{addr}")];
            conversations = 2;
        }
        // SMS and WhatsApp from the same number: one customer (a phone
        // number and a WhatsApp id of the same number link), one
        // conversation (cross-channel continuation).
        1 => {
            let e164 = format!("+1415555{:04}", 1000 + c);
            let spaced = format!("+1 415 555 {:04}", 1000 + c);
            for i in 0..PER_CUSTOMER {
                let key;
                let env;
                if i % 2 == 0 {
                    key = format!("sms:+14155559999:c{c}.m{i}");
                    let written = if i % 4 == 0 { &spaced } else { &e164 };
                    env = envelope(
                        &key,
                        "sms",
                        "twilio",
                        "+14155559999",
                        ("phone", written),
                        ("phone", "+1 (415) 555-9999"),
                        at(i),
                        &format!("sms {i} from customer {c}"),
                    );
                    posted.push(Posted {
                        key,
                        received_ms: at(i),
                        channel: "sms",
                        from: ("phone", e164.clone()),
                        envelope: env,
                    });
                } else {
                    key = format!("whatsapp:+14155559998:c{c}.m{i}");
                    // WhatsApp sends bare digits.
                    env = envelope(
                        &key,
                        "whatsapp",
                        "meta",
                        "+14155559998",
                        ("whatsapp", &e164[1..]),
                        ("whatsapp", "14155559998"),
                        at(i),
                        &format!("whatsapp {i} from customer {c}"),
                    );
                    posted.push(Posted {
                        key,
                        received_ms: at(i),
                        channel: "whatsapp",
                        from: ("whatsapp", e164.clone()),
                        envelope: env,
                    });
                }
            }
            lookups = vec![
                format!("phone:{e164}"),
                format!("phone:{spaced}"),
                format!("whatsapp:{e164}"),
                format!("whatsapp:{}", &e164[1..]),
            ];
            identities = vec![format!("phone:{e164}"), format!("whatsapp:{e164}")];
            conversations = 1;
        }
        // WhatsApp only, sometimes written with spaces and a plus.
        2 => {
            let e164 = format!("+447700900{c:03}");
            for i in 0..PER_CUSTOMER {
                let key = format!("whatsapp:+14155559998:c{c}.m{i}");
                let written = if i % 2 == 0 {
                    format!("+44 7700 900{c:03}")
                } else {
                    e164[1..].to_owned()
                };
                let env = envelope(
                    &key,
                    "whatsapp",
                    "meta",
                    "+14155559998",
                    ("whatsapp", &written),
                    ("whatsapp", "14155559998"),
                    at(i),
                    &format!("whatsapp {i} from customer {c}"),
                );
                posted.push(Posted {
                    key,
                    received_ms: at(i),
                    channel: "whatsapp",
                    from: ("whatsapp", e164.clone()),
                    envelope: env,
                });
            }
            lookups = vec![
                format!("whatsapp:{e164}"),
                format!("whatsapp:+44 7700 900{c:03}"),
            ];
            identities = vec![format!("whatsapp:{e164}")];
            conversations = 1;
        }
        // Telegram, with the chat id as provider thread.
        3 => {
            let user = format!("{}", 500_000 + c);
            for i in 0..PER_CUSTOMER {
                let key = format!("telegram:bot-e2e:c{c}.m{i}");
                let written = if i % 2 == 0 {
                    format!(" {user} ")
                } else {
                    user.clone()
                };
                let mut env = envelope(
                    &key,
                    "telegram",
                    "telegram",
                    "bot-e2e",
                    ("telegram_user", &written),
                    ("telegram_user", "777000"),
                    at(i),
                    &format!("telegram {i} from customer {c}"),
                );
                env["thread_hints"] =
                    json!({"provider_thread_id": user, "message_id": format!("{i}")});
                posted.push(Posted {
                    key,
                    received_ms: at(i),
                    channel: "telegram",
                    from: ("telegram_user", user.clone()),
                    envelope: env,
                });
            }
            lookups = vec![format!("telegram_user:{user}")];
            identities = vec![format!("telegram_user:{user}")];
            conversations = 1;
        }
        // Another system through the api channel, with external ids.
        _ => {
            let ext = format!("crm-{c}");
            for i in 0..PER_CUSTOMER {
                let key = format!("api:crm:c{c}.m{i}");
                let written = if i % 2 == 0 {
                    format!("  {ext}\t")
                } else {
                    ext.clone()
                };
                let env = envelope(
                    &key,
                    "api",
                    "api",
                    "crm",
                    ("external", &written),
                    ("external", "support"),
                    at(i),
                    &format!("api {i} from customer {c}"),
                );
                posted.push(Posted {
                    key,
                    received_ms: at(i),
                    channel: "api",
                    from: ("external", ext.clone()),
                    envelope: env,
                });
            }
            lookups = vec![format!("external:{ext}")];
            identities = vec![format!("external:{ext}")];
            conversations = 1;
        }
    }
    posted.sort_by_key(|p| p.received_ms);
    Customer {
        lookups,
        identities,
        conversations,
        posted,
    }
}

fn keys(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| str_field(m, "idempotency_key").to_owned())
        .collect()
}

/// Finds the customer by every lookup identity; all must agree.
async fn find(api: &Api, c: &Customer) -> anyhow::Result<Option<Value>> {
    let mut found: Option<Value> = None;
    for identity in &c.lookups {
        let Some(customer) = api.customer(identity).await? else {
            return Ok(None);
        };
        if let Some(prev) = &found {
            anyhow::ensure!(
                prev["id"] == customer["id"],
                "{identity} found customer {} but {} found {}",
                customer["id"],
                c.lookups[0],
                prev["id"]
            );
        }
        found = Some(customer);
    }
    Ok(found)
}

async fn thousand_messages(backend: Backend) {
    let mut dir = TestDir::with_backend(backend);
    let daemon = dir.start(&[]).await;
    let api = daemon.api();

    let customers: Vec<Customer> = (0..CUSTOMERS).map(customer).collect();
    let mut all: Vec<Value> = customers
        .iter()
        .flat_map(|c| c.posted.iter().map(|p| p.envelope.clone()))
        .collect();
    assert_eq!(all.len(), CUSTOMERS * PER_CUSTOMER);
    // Arrival order differs from received_at order.
    Rng::new(0x5eed).shuffle(&mut all);

    for (key, answer) in post_all(&api, all, CONCURRENCY).await {
        let a = answer.unwrap_or_else(|e| panic!("posting {key}: {e:#}"));
        assert_eq!(a.status, StatusCode::ACCEPTED, "posting {key}: {}", a.body);
        assert_eq!(a.body["idempotency_key"], key.as_str(), "{}", a.body);
        assert!(
            a.body["id"]
                .as_str()
                .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
            "202 without an id: {}",
            a.body
        );
    }

    // Routing is asynchronous: wait until every timeline is complete.
    let mut ids: Vec<String> = Vec::new();
    for (c, cust) in customers.iter().enumerate() {
        let want = cust.posted.len();
        let id = wait_for(
            &format!("customer {c} ({}) to hold {want} messages", cust.lookups[0]),
            Duration::from_secs(120),
            || async {
                let Some(found) = find(&api, cust).await? else {
                    return Ok(None);
                };
                let id = str_field(&found, "id").to_owned();
                let n = api.timeline_messages(&id, 1000).await?.len();
                anyhow::ensure!(n <= want, "customer {c} holds {n} messages, {want} posted");
                Ok((n == want).then_some(id))
            },
        )
        .await;
        ids.push(id);
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        CUSTOMERS,
        "customers were merged or split: {} distinct ids for {CUSTOMERS} customers",
        distinct.len()
    );

    let mut conversation_cache: HashMap<String, Value> = HashMap::new();
    for (c, (cust, id)) in customers.iter().zip(&ids).enumerate() {
        let found = find(&api, cust).await.unwrap().expect("found above");
        let held: BTreeSet<String> = found["identities"]
            .as_array()
            .expect("identities")
            .iter()
            .map(|i| format!("{}:{}", str_field(i, "kind"), str_field(i, "value")))
            .collect();
        let want: BTreeSet<String> = cust.identities.iter().cloned().collect();
        assert_eq!(held, want, "customer {c}: identities");

        // The whole timeline in one page: exactly the posted messages, in
        // received_at order, normalized.
        let page = api.timeline_page(id, None, 1000).await.unwrap();
        assert_eq!(page["customer_id"], id.as_str());
        assert!(page["next_cursor"].is_null(), "customer {c}: one page");
        let messages = page["messages"].as_array().unwrap().clone();
        let expected: Vec<String> = cust.posted.iter().map(|p| p.key.clone()).collect();
        assert_eq!(
            keys(&messages),
            expected,
            "customer {c}: timeline keys and order"
        );
        let timeline_conversations: HashSet<&str> = page["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|conv| str_field(conv, "id"))
            .collect();
        assert_eq!(
            timeline_conversations.len(),
            cust.conversations,
            "customer {c}: conversations {}",
            page["conversations"]
        );
        // Conversations come newest activity first, each stamped with the
        // time of its latest message.
        let last: Vec<i64> = page["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|conv| {
                let id = str_field(conv, "id");
                let newest = messages
                    .iter()
                    .filter(|m| m["conversation_id"] == id)
                    .map(|m| parse_millis(str_field(m, "received_at")).unwrap())
                    .max()
                    .unwrap_or_else(|| panic!("customer {c}: conversation {id} is empty"));
                let stamped = parse_millis(str_field(conv, "last_message_at")).unwrap();
                assert_eq!(stamped, newest, "customer {c}: last_message_at of {conv}");
                stamped
            })
            .collect();
        assert!(
            last.windows(2).all(|w| w[0] >= w[1]),
            "customer {c}: conversations not newest first: {}",
            page["conversations"]
        );
        for (m, p) in messages.iter().zip(&cust.posted) {
            assert_eq!(m["customer_id"], id.as_str(), "customer {c}: {m}");
            assert_eq!(m["channel"], p.channel, "customer {c}: {m}");
            assert_eq!(m["direction"], "inbound", "customer {c}: {m}");
            assert_eq!(
                parse_millis(str_field(m, "received_at")).unwrap(),
                p.received_ms,
                "customer {c}: received_at of {m}"
            );
            assert_eq!(m["from"]["kind"], p.from.0, "customer {c}: {m}");
            assert_eq!(
                m["from"]["value"],
                p.from.1.as_str(),
                "customer {c}: sender not normalized in {m}"
            );
            assert_eq!(m["text"], p.envelope["text"], "customer {c}: {m}");
            if p.channel == "email" {
                assert_eq!(m["subject"], p.envelope["subject"], "customer {c}: {m}");
                // Message-IDs are kept without angle brackets.
                let mid = p.envelope["thread_hints"]["message_id"].as_str().unwrap();
                assert_eq!(
                    m["message_id"],
                    mid.trim_start_matches('<').trim_end_matches('>'),
                    "customer {c}: {m}"
                );
            }

            // The message's conversation exists, is the customer's, and
            // holds it.
            let conv_id = str_field(m, "conversation_id").to_owned();
            assert!(
                timeline_conversations.contains(conv_id.as_str()),
                "customer {c}: conversation {conv_id} missing from the timeline"
            );
            if !conversation_cache.contains_key(&conv_id) {
                let conv = api
                    .conversation(&conv_id)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("conversation {conv_id} is 404"));
                conversation_cache.insert(conv_id.clone(), conv);
            }
            let conv = &conversation_cache[&conv_id];
            assert_eq!(conv["conversation"]["id"], conv_id.as_str());
            assert_eq!(conv["conversation"]["customer_id"], id.as_str());
            let in_conv: Vec<&str> = conv["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| str_field(x, "id"))
                .collect();
            assert!(
                in_conv.contains(&str_field(m, "id")),
                "customer {c}: conversation {conv_id} does not hold message {}",
                m["id"]
            );
        }

        // Small pages concatenate to the whole timeline, without repeats.
        let paged = keys(&api.timeline_messages(id, 7).await.unwrap());
        assert_eq!(paged, expected, "customer {c}: pages of 7");
        let unique: HashSet<&String> = paged.iter().collect();
        assert_eq!(unique.len(), paged.len(), "customer {c}: repeats in pages");
    }

    // Every conversation's messages are in time order and belong to it.
    for (id, conv) in &conversation_cache {
        let times: Vec<i64> = conv["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["conversation_id"], id.as_str());
                parse_millis(str_field(m, "received_at")).unwrap()
            })
            .collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "conversation {id}: messages out of order"
        );
    }
    let in_conversations: usize = conversation_cache
        .values()
        .map(|c| c["messages"].as_array().unwrap().len())
        .sum();
    assert_eq!(in_conversations, CUSTOMERS * PER_CUSTOMER);

    // Redelivery: the same envelope again, and the same key with other
    // content, are accepted but not stored again.
    let before = metric_sum(
        &api.metrics().await.unwrap(),
        "switchboard_messages_duplicate_total",
    );
    let first = &customers[0].posted[0];
    let a = api.inbound(&first.envelope).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "repost: {}", a.body);
    assert_eq!(a.body["idempotency_key"], first.key.as_str());
    let mut changed = first.envelope.clone();
    changed["text"] = json!("a different text under the same key");
    let a = api.inbound(&changed).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "changed repost: {}", a.body);
    wait_for(
        "the router to see both redeliveries",
        Duration::from_secs(60),
        || async {
            let m = api.metrics().await?;
            Ok(
                (metric_sum(&m, "switchboard_messages_duplicate_total") >= before + 2.0)
                    .then_some(()),
            )
        },
    )
    .await;
    let messages = api.timeline_messages(&ids[0], 1000).await.unwrap();
    let expected: Vec<String> = customers[0].posted.iter().map(|p| p.key.clone()).collect();
    assert_eq!(keys(&messages), expected, "a redelivery added a message");
    assert_eq!(
        messages[0]["text"], first.envelope["text"],
        "a redelivery changed the stored message"
    );
    let metrics = api.metrics().await.unwrap();
    assert_eq!(
        metric_sum(&metrics, "switchboard_messages_routed_total"),
        (CUSTOMERS * PER_CUSTOMER) as f64,
        "routed counter:\n{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "switchboard_dead_letters_total"),
        0.0,
        "dead letters:\n{metrics}"
    );
}

/// Keyset pagination must neither skip nor repeat messages that share a
/// `received_at`, whatever the page size.
async fn pages_over_equal_times(backend: Backend) {
    let mut dir = TestDir::with_backend(backend);
    let daemon = dir.start(&[]).await;
    let api = daemon.api();

    // 30 messages: three groups of ten sharing a time each, posted one by
    // one so arrival (the tie-break) is known.
    let mut expected = Vec::new();
    for group in 0..3i64 {
        for i in 0..10 {
            let key = format!("api:crm:ties.{group}.{i}");
            let env = envelope(
                &key,
                "api",
                "api",
                "crm",
                ("external", "ties"),
                ("external", "support"),
                BASE_MS + (2 - group) * 1_000,
                &format!("{group}.{i}"),
            );
            let a = api.inbound(&env).await.unwrap();
            assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
            expected.push((2 - group, key));
        }
    }
    // Time order; within a time, arrival order.
    expected.sort_by_key(|(t, _)| *t);
    let expected: Vec<String> = expected.into_iter().map(|(_, k)| k).collect();

    let id = wait_for("30 messages", Duration::from_secs(60), || async {
        let Some(c) = api.customer("external:ties").await? else {
            return Ok(None);
        };
        let id = str_field(&c, "id").to_owned();
        Ok((api.timeline_messages(&id, 1000).await?.len() == 30).then_some(id))
    })
    .await;
    let whole = keys(&api.timeline_messages(&id, 1000).await.unwrap());
    assert_eq!(whole, expected, "time order, then arrival order");
    for limit in [1, 3, 7, 10, 11, 29, 30, 31] {
        let paged = keys(&api.timeline_messages(&id, limit).await.unwrap());
        assert_eq!(paged, whole, "pages of {limit}");
    }
    // The last page has no cursor, also when it is exactly full.
    let page = api.timeline_page(&id, None, 30).await.unwrap();
    assert!(page["next_cursor"].is_null(), "{}", page["next_cursor"]);
    let page = api.timeline_page(&id, None, 29).await.unwrap();
    let cursor = str_field(&page, "next_cursor").to_owned();
    let rest = api.timeline_page(&id, Some(&cursor), 29).await.unwrap();
    assert_eq!(
        keys(rest["messages"].as_array().unwrap()),
        [whole[29].clone()]
    );
    assert!(rest["next_cursor"].is_null());
}

/// A timeline page must be one snapshot: every message on it belongs to a
/// conversation listed on it, even while the customer's messages are being
/// routed. (Before the store read each page in one read transaction, a
/// routing batch committing between the conversations query and the messages
/// query made this fail in about 1 poll in 40.)
async fn consistent_pages(backend: Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use switchboard_e2e::Flood;

    let mut dir = TestDir::with_backend(backend);
    let daemon = dir.start(&[]).await;
    let api = daemon.api();

    // Each message opens a conversation of its own (a new subject) and is
    // older than the ones before, so it lands on the first page.
    const N: usize = 3_000;
    let start = BASE_MS + 10_000_000_000;
    let post = |i: usize| {
        let mut env = envelope(
            &format!("email:support:snap.{i}"),
            "email",
            "imap",
            "support@switchboard.test",
            ("email", "snapshot@example.com"),
            ("email", "support@switchboard.test"),
            start - i as i64 * 100_000_000,
            "x",
        );
        env["subject"] = json!(format!("subject {i}"));
        env
    };
    let a = api.inbound(&post(0)).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let id = wait_for("the first message", Duration::from_secs(60), || async {
        Ok(api
            .customer("email:snapshot@example.com")
            .await?
            .map(|c| str_field(&c, "id").to_owned()))
    })
    .await;

    let flood = Flood::start(&api, (1..N).map(post).collect(), 8);
    let stop = Arc::new(AtomicBool::new(false));
    let mut pollers = Vec::new();
    for _ in 0..3 {
        let (api, id, stop) = (api.clone(), id.clone(), Arc::clone(&stop));
        pollers.push(tokio::spawn(async move {
            let mut torn = Vec::new();
            let mut polls = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let page = api.timeline_page(&id, None, 50).await.unwrap();
                polls += 1;
                let listed: HashSet<&str> = page["conversations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| str_field(c, "id"))
                    .collect();
                if let Some(m) = page["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| !listed.contains(str_field(m, "conversation_id")))
                {
                    torn.push(format!(
                        "{} in conversation {} not among the {} listed",
                        m["idempotency_key"],
                        m["conversation_id"],
                        listed.len()
                    ));
                }
            }
            (polls, torn)
        }));
    }
    let result = flood.finish(Duration::from_secs(300)).await;
    assert_eq!(result.acked.len(), N - 1, "{:?}", result.refused.first());
    stop.store(true, Ordering::SeqCst);
    let mut polls = 0;
    let mut torn = Vec::new();
    for p in pollers {
        let (n, t) = p.await.unwrap();
        polls += n;
        torn.extend(t);
    }
    assert!(
        torn.is_empty(),
        "{} of {polls} timeline pages were torn, e.g. {:?}",
        torn.len(),
        &torn[..torn.len().min(5)]
    );
}
