//! The email channel through the real binary and a real mail server:
//! Dovecot (IMAP) and Postfix (SMTP) from `scripts/mail up`, named in
//! `SWITCHBOARD_TEST_MAIL`. Without it each test says SKIPPED (and fails
//! under CI, which provides the server).
//!
//! Each test takes a mail domain of its own, so its mailboxes start empty.
//! The daemons poll only every 10 minutes: mail that arrives while one runs
//! can only come in through IDLE.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::TryStreamExt as _;
use serde_json::{Value, json};
use switchboard_e2e::mail::{MailServer, ServerMail, fetch_all, mail, wait_mails};
use switchboard_e2e::{Api, Daemon, StatusCode, TestDir, str_field, wait_for};

/// How long mail may take to be in the history.
const INGEST: Duration = Duration::from_secs(90);

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Waits until the daemon's poller of `mailbox` has selected it.
async fn wait_selected(daemon: &Daemon, mailbox: &str, times: usize) {
    let needle = format!("mailbox={mailbox}");
    wait_for("the imap poller to select its mailbox", INGEST, || {
        let log = daemon.stderr();
        let n = log
            .lines()
            .filter(|l| l.contains("imap mailbox selected") && l.contains(&needle))
            .count();
        async move { Ok((n >= times).then_some(())) }
    })
    .await;
}

/// Every message in the timelines of the customers owning `identities`.
async fn history(api: &Api, identities: &[String]) -> anyhow::Result<Vec<Value>> {
    let mut seen_customers = std::collections::HashSet::new();
    let mut out = Vec::new();
    for identity in identities {
        let Some(c) = api.customer(identity).await? else {
            continue;
        };
        let id = str_field(&c, "id").to_owned();
        if seen_customers.insert(id.clone()) {
            out.extend(api.timeline_messages(&id, 200).await?);
        }
    }
    Ok(out)
}

/// Waits until the history of `identities` holds `count` inbound messages.
async fn wait_history(api: &Api, identities: &[String], count: usize) -> Vec<Value> {
    wait_for(
        &format!("{count} inbound messages in the history"),
        INGEST,
        || async {
            let all = history(api, identities).await?;
            let inbound = all.iter().filter(|m| m["direction"] == "inbound").count();
            anyhow::ensure!(
                inbound <= count,
                "{inbound} inbound messages, more than {count}"
            );
            Ok((inbound == count).then_some(all))
        },
    )
    .await
}

/// Counts the history's inbound messages by Message-ID.
fn by_message_id(messages: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in messages.iter().filter(|m| m["direction"] == "inbound") {
        let id = m["message_id"].as_str().unwrap_or("(none)").to_owned();
        *out.entry(id).or_default() += 1;
    }
    out
}

fn customer_mail(i: usize, cdomain: &str, to: &str) -> (String, Vec<String>, Vec<u8>) {
    let from = format!("c{}@{cdomain}", i % 10);
    let raw = mail(
        &from,
        to,
        &format!("Order {i}"),
        &format!("m{i}@{cdomain}"),
        &[],
        &format!("Where is order {i}?"),
    );
    (from, vec![to.to_owned()], raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ingest_then_downtime_and_another_reader_leave_every_mail_once() {
    let Some(server) = MailServer::from_env("email::idle_ingest") else {
        return;
    };
    let domain = server.domain("ingest");
    let inbox = format!("inbox@{domain}");
    let cdomain = format!("c.{domain}");
    let customers: Vec<String> = (0..10).map(|i| format!("email:c{i}@{cdomain}")).collect();
    let env = server.daemon_env("t", &inbox, &[]);
    let mut dir = TestDir::new();
    let mut daemon = dir.start(&refs(&env)).await;
    let api = daemon.api();
    wait_selected(&daemon, "INBOX", 1).await;

    // 200 mails while the daemon waits in IDLE.
    let first: Vec<_> = (0..200)
        .map(|i| customer_mail(i, &cdomain, &inbox))
        .collect();
    server.send_all(&first).await.unwrap();
    let messages = wait_history(&api, &customers, 200).await;
    let counts = by_message_id(&messages);
    assert_eq!(counts.len(), 200, "distinct Message-IDs: {counts:?}");
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    assert!(
        daemon
            .stderr()
            .lines()
            .filter(|l| l.contains("imap mailbox selected"))
            .count()
            == 1,
        "the poller reconnected: mail did not come in through one IDLE session"
    );

    // Down: 50 more arrive, and another client reads some of them.
    daemon.terminate();
    let status = daemon.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "daemon exit: {status}");
    let second: Vec<_> = (200..250)
        .map(|i| customer_mail(i, &cdomain, &inbox))
        .collect();
    server.send_all(&second).await.unwrap();
    let held = wait_mails(&server, &inbox, "INBOX", 250, INGEST)
        .await
        .unwrap();
    let unseen: Vec<u32> = held.iter().filter(|m| !m.seen).map(|m| m.uid).collect();
    assert_eq!(
        unseen.len(),
        50,
        "the first 200 are \\Seen, the 50 new are not"
    );
    {
        let mut other = server.imap(&inbox).await.unwrap();
        other.select("INBOX").await.unwrap();
        // Reading with BODY[] sets \Seen on 20 of them; 5 more are flagged.
        let read = format!("{}:{}", unseen[0], unseen[19]);
        let fetched: Vec<_> = other
            .uid_fetch(&read, "BODY[]")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(fetched.len(), 20);
        let flag = format!("{}:{}", unseen[20], unseen[24]);
        let _: Vec<_> = other
            .uid_store(&flag, "+FLAGS (\\Seen)")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        other.logout().await.unwrap();
    }
    let held = wait_mails(&server, &inbox, "INBOX", 250, INGEST)
        .await
        .unwrap();
    assert_eq!(held.iter().filter(|m| !m.seen).count(), 25);

    let daemon = dir.start(&refs(&env)).await;
    let api = daemon.api();
    let messages = wait_history(&api, &customers, 250).await;
    let counts = by_message_id(&messages);
    let expected: BTreeMap<String, usize> =
        (0..250).map(|i| (format!("m{i}@{cdomain}"), 1)).collect();
    assert_eq!(counts, expected, "every mail exactly once");
    // Everything read is acknowledged on the server.
    let held = wait_mails(&server, &inbox, "INBOX", 250, INGEST)
        .await
        .unwrap();
    wait_for("every mail \\Seen", INGEST, || {
        let server = server.clone();
        let inbox = inbox.clone();
        async move {
            let held = wait_mails(&server, &inbox, "INBOX", 250, INGEST).await?;
            Ok(held.iter().all(|m| m.seen).then_some(()))
        }
    })
    .await;
    assert_eq!(held.len(), 250);
    // And once more after a while: no late duplicates.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = by_message_id(&history(&api, &customers).await.unwrap());
    assert_eq!(again, expected);
}

/// The header's ids, without angle brackets.
fn ids(v: &str) -> Vec<String> {
    v.split_whitespace()
        .map(|s| s.trim_start_matches('<').trim_end_matches('>').to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_threads_on_the_customers_side_and_their_answer_threads_back() {
    let Some(server) = MailServer::from_env("email::reply_threads") else {
        return;
    };
    let domain = server.domain("reply");
    let inbox = format!("inbox@{domain}");
    let ada = format!("ada@c.{domain}");
    let ca = server.ca.display().to_string();
    let smtps = server.smtps.to_string();
    let imaps = server.imaps.to_string();
    // Over TLS both ways this time: IMAP on implicit TLS, SMTP on
    // submissions with AUTH PLAIN, both trusting the test CA.
    let env = server.daemon_env(
        "t",
        &inbox,
        &[
            ("IMAP__PORT", &imaps),
            ("IMAP__SECURITY", "tls"),
            ("IMAP__CA_FILE", &ca),
            ("SMTP__PORT", &smtps),
            ("SMTP__SECURITY", "tls"),
            ("SMTP__AUTH", "plain"),
            ("SMTP__PASSWORD", &server.password),
            ("SMTP__CA_FILE", &ca),
            ("DISPLAY_NAME", "Example Support"),
            ("REPLY_ADDRESS_DOMAIN", &domain),
        ],
    );
    let mut dir = TestDir::new();
    let daemon = dir.start(&refs(&env)).await;
    let api = daemon.api();
    wait_selected(&daemon, "INBOX", 1).await;

    let first_id = format!("first@c.{domain}");
    server
        .send(
            &ada,
            &inbox,
            &mail(
                &ada,
                &inbox,
                "Where is my parcel?",
                &first_id,
                &[],
                "It has not come.",
            ),
        )
        .await
        .unwrap();
    let who = vec![format!("email:{ada}")];
    let messages = wait_history(&api, &who, 1).await;
    let conversation = str_field(&messages[0], "conversation_id").to_owned();

    // The reply, through the API.
    let answer = api
        .post_json(
            "/v1/messages",
            &json!({
                "schema": "switchboard.outbound.v1",
                "idempotency_key": format!("reply-{domain}"),
                "conversation_id": conversation,
                "subject": "Re: Where is my parcel?",
                "text": "It ships today.",
            }),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let message_id = str_field(&answer.body, "message_id").to_owned();

    // Read back from the customer's mailbox.
    let got = wait_mails(&server, &ada, "INBOX", 1, INGEST).await.unwrap();
    let reply: &ServerMail = &got[0];
    let our_id = format!("{message_id}@{domain}");
    assert_eq!(reply.header("Message-ID"), Some(format!("<{our_id}>")));
    assert_eq!(
        reply.header("In-Reply-To").map(|v| ids(&v)),
        Some(vec![first_id.clone()])
    );
    assert_eq!(
        reply.header("References").map(|v| ids(&v)),
        Some(vec![first_id.clone()])
    );
    assert_eq!(
        reply.header("Subject").as_deref(),
        Some("Re: Where is my parcel?")
    );
    assert_eq!(
        reply.header("From").as_deref(),
        Some(format!("\"Example Support\" <{inbox}>").as_str())
    );
    assert_eq!(
        reply.header("Reply-To").as_deref(),
        Some(format!("\"Example Support\" <reply+{conversation}@{domain}>").as_str())
    );
    let body = String::from_utf8_lossy(&reply.raw).into_owned();
    assert!(body.contains("It ships today."), "{body}");
    // Stored with that id and sent.
    let stored = wait_for("the reply marked sent", INGEST, || async {
        let conv = api.conversation(&conversation).await?.unwrap_or_default();
        let out = conv["messages"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["direction"] == "outbound").cloned());
        Ok(out.filter(|m| m["status"] == "sent"))
    })
    .await;
    assert_eq!(stored["message_id"], json!(our_id));

    // The customer answers: a new subject, but In-Reply-To our reply.
    let second_id = format!("second@c.{domain}");
    server
        .send(
            &ada,
            &inbox,
            &mail(
                &ada,
                &inbox,
                "A completely different subject",
                &second_id,
                &[
                    ("In-Reply-To", &format!("<{our_id}>")),
                    ("References", &format!("<{first_id}> <{our_id}>")),
                ],
                "Thanks!",
            ),
        )
        .await
        .unwrap();
    // And answers again from a client that drops every header, to the
    // reply address.
    let reply_to = format!("reply+{conversation}@{domain}");
    let third_id = format!("third@c.{domain}");
    server
        .send(
            &ada,
            &reply_to,
            &mail(
                &ada,
                &reply_to,
                "no headers",
                &third_id,
                &[],
                "One more thing.",
            ),
        )
        .await
        .unwrap();
    let messages = wait_history(&api, &who, 3).await;
    let rules: HashMap<String, (String, String)> = messages
        .iter()
        .filter(|m| m["direction"] == "inbound")
        .map(|m| {
            (
                m["message_id"].as_str().unwrap_or_default().to_owned(),
                (
                    str_field(m, "conversation_id").to_owned(),
                    m["rule"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect();
    assert_eq!(rules[&second_id].0, conversation, "{rules:?}");
    assert_eq!(rules[&second_id].1, "in_reply_to", "{rules:?}");
    assert_eq!(rules[&third_id].0, conversation, "{rules:?}");
    assert_eq!(rules[&third_id].1, "reply_address", "{rules:?}");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_uidvalidity_rescans_without_duplicates_and_moves_work() {
    let Some(server) = MailServer::from_env("email::uidvalidity") else {
        return;
    };
    let domain = server.domain("uidv");
    let inbox = format!("inbox@{domain}");
    let cdomain = format!("c.{domain}");
    let customers: Vec<String> = (0..10).map(|i| format!("email:c{i}@{cdomain}")).collect();
    // Two mailboxes of one account, two pollers: INBOX (mail moved to
    // Processed once accepted) and Support (marked \Seen).
    let env = server.daemon_env(
        "t",
        &inbox,
        &[
            ("IMAP__MAILBOXES", "INBOX,Support"),
            ("IMAP__AFTER", "seen"),
        ],
    );
    let moving = format!("mover@{domain}");
    let mut env2 = server.daemon_env(
        "m",
        &moving,
        &[("IMAP__AFTER", "move"), ("IMAP__MOVE_TO", "Processed")],
    );
    // One daemon, two accounts: the second only reads.
    env2.retain(|(k, _)| !k.contains("__SMTP__"));
    let mut all_env = env.clone();
    all_env.extend(env2);
    all_env.push((
        "SWITCHBOARD__CHANNELS__EMAIL__DEFAULT_ACCOUNT".into(),
        "t".into(),
    ));

    let mut setup = server.imap(&inbox).await.unwrap();
    setup.create("Support").await.unwrap();
    let append = |i: usize| customer_mail(i, &cdomain, &inbox).2;
    for i in 0..5 {
        setup
            .append("Support", None, None, append(i))
            .await
            .unwrap();
    }
    let mut dir = TestDir::new();
    let daemon = dir.start(&refs(&all_env)).await;
    let api = daemon.api();
    wait_selected(&daemon, "Support", 1).await;
    wait_selected(&daemon, "INBOX", 2).await;
    // INBOX of the first account gets one by SMTP.
    server
        .send_all(&[customer_mail(5, &cdomain, &inbox)])
        .await
        .unwrap();
    wait_history(&api, &customers, 6).await;

    // The Support folder is deleted and made again (a new UIDVALIDITY), and
    // the same five go back in with three new ones.
    let before = setup.select("Support").await.unwrap().uid_validity;
    setup.select("INBOX").await.unwrap();
    setup.delete("Support").await.unwrap();
    setup.create("Support").await.unwrap();
    for i in (0..5).chain(6..9) {
        setup
            .append("Support", None, None, append(i))
            .await
            .unwrap();
    }
    let after = setup.select("Support").await.unwrap().uid_validity;
    assert_ne!(before, after, "the test must change UIDVALIDITY");
    setup.logout().await.unwrap();

    let messages = wait_history(&api, &customers, 9).await;
    let counts = by_message_id(&messages);
    let expected: BTreeMap<String, usize> =
        (0..9).map(|i| (format!("m{i}@{cdomain}"), 1)).collect();
    assert_eq!(counts, expected);
    wait_for("the rescan to be logged", INGEST, || {
        let log = daemon.stderr();
        async move { Ok(log.contains("uidvalidity changed").then_some(())) }
    })
    .await;
    let support = wait_mails(&server, &inbox, "Support", 8, INGEST)
        .await
        .unwrap();
    wait_for("the rescanned mail \\Seen", INGEST, || {
        let server = server.clone();
        let inbox = inbox.clone();
        async move {
            let m = wait_mails(&server, &inbox, "Support", 8, INGEST).await?;
            Ok(m.iter().all(|m| m.seen).then_some(()))
        }
    })
    .await;
    assert_eq!(support.len(), 8);

    // The second account moves what it accepted.
    let mover_customers = vec![format!("email:z@{cdomain}")];
    let z = format!("z@{cdomain}");
    let moved: Vec<_> = (0..3)
        .map(|i| {
            (
                z.clone(),
                vec![moving.clone()],
                mail(
                    &z,
                    &moving,
                    &format!("Move {i}"),
                    &format!("z{i}@{cdomain}"),
                    &[],
                    "x",
                ),
            )
        })
        .collect();
    server.send_all(&moved).await.unwrap();
    wait_history(&api, &mover_customers, 3).await;
    let processed = wait_mails(&server, &moving, "Processed", 3, INGEST)
        .await
        .unwrap();
    assert_eq!(processed.len(), 3);
    wait_for("INBOX emptied by the moves", INGEST, || {
        let server = server.clone();
        let moving = moving.clone();
        async move {
            let mut s = server.imap(&moving).await?;
            let left = fetch_all(&mut s, "INBOX").await?;
            s.logout().await?;
            Ok(left.is_empty().then_some(()))
        }
    })
    .await;
}
