//! `switchboard replay` rebuilds the history from the retained topics into
//! an empty store, and the rebuilt history equals the original: the same
//! customers (by identities), the same messages, threaded into the same
//! conversations by the same rules, in the same order. Ids are Switchboard's
//! own and are minted anew, so the comparison is by structure.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_e2e::{Api, BASE_MS, TestDir, envelope, switchboard_command, wait_for};

/// A customer's history as structure: identities, then each message as
/// (key, conversation label, rule), conversations labelled by first
/// appearance.
type Shape = (Vec<String>, Vec<(String, usize, String)>);

async fn shape(api: &Api, identity: &str) -> Shape {
    let customer = api.customer(identity).await.unwrap().expect("customer");
    let mut identities: Vec<String> = customer["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["kind"].as_str().unwrap(),
                i["value"].as_str().unwrap()
            )
        })
        .collect();
    identities.sort();
    let messages = api
        .timeline_messages(customer["id"].as_str().unwrap(), 50)
        .await
        .unwrap();
    let mut labels: BTreeMap<String, usize> = BTreeMap::new();
    let shaped = messages
        .iter()
        .map(|m| {
            let next = labels.len();
            let label = *labels
                .entry(m["conversation_id"].as_str().unwrap().to_owned())
                .or_insert(next);
            (
                m["idempotency_key"].as_str().unwrap().to_owned(),
                label,
                m["rule"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (identities, shaped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_the_same_history() {
    let mut dir = TestDir::new();
    let mut daemon = dir.start(&[]).await;
    let api = daemon.api();

    // 12 customers: email threads (headers, subjects), SMS bursts, and
    // WhatsApp ids of the SMS numbers (automatic links).
    let mut posts: Vec<Value> = Vec::new();
    let mut identities = Vec::new();
    for c in 0..12i64 {
        let email = format!("customer{c}@example.org");
        let phone = format!("+1415555{:04}", 3000 + c);
        identities.push(format!("email:{email}"));
        identities.push(format!("phone:{phone}"));
        for m in 0..6i64 {
            let at = BASE_MS + c * 1000 + m * 3_600_000 * (1 + c % 3) * 5;
            let key = format!("mail-{c}-{m}");
            let mut e = envelope(
                &key,
                "email",
                "imap",
                "support@example.com",
                ("email", &email),
                ("email", "support@example.com"),
                at,
                "about my order",
            );
            e["subject"] = json!(if m % 3 == 0 {
                format!("Order {c}")
            } else {
                format!("Re: Order {c}")
            });
            e["thread_hints"] = json!({"message_id": format!("{key}@example.org")});
            if m % 2 == 1 {
                e["thread_hints"]["in_reply_to"] =
                    json!([format!("mail-{c}-{}@example.org", m - 1)]);
            }
            posts.push(e);
            let sms_at = at + 600_000;
            let channel = if m == 4 { "whatsapp" } else { "sms" };
            let kind = if m == 4 { "whatsapp" } else { "phone" };
            posts.push(envelope(
                &format!("sms-{c}-{m}"),
                channel,
                "twilio",
                "+15550001111",
                (kind, &phone),
                ("phone", "+15550001111"),
                sms_at,
                "where is it",
            ));
        }
    }
    for e in &posts {
        let a = api.inbound(e).await.unwrap();
        assert_eq!(a.status.as_u16(), 202, "{}", a.body);
    }
    // Link three customers' email and phone: merges with history on both sides.
    for c in 0..3 {
        let cmd = json!({
            "schema": "switchboard.command.v1", "type": "identity.link",
            "a": {"kind": "email", "value": format!("customer{c}@example.org")},
            "b": {"kind": "phone", "value": format!("+1415555{:04}", 3000 + c)},
            "evidence": "crm",
        });
        let a = api.command(&cmd).await.unwrap();
        assert_eq!(a.status.as_u16(), 202, "{}", a.body);
    }
    wait_for("everything routed", Duration::from_secs(60), || async {
        let mut total = 0;
        for id in &identities[..2] {
            if api.customer(id).await?.is_none() {
                return Ok(None);
            }
        }
        for c in 0..3 {
            let s = shape(&api, &format!("email:customer{c}@example.org")).await;
            total += s.1.len();
        }
        let lag = api.inbound_lag().await?.unwrap_or(1.0);
        Ok((total == 3 * 12 && lag == 0.0).then_some(()))
    })
    .await;
    let mut before = BTreeMap::new();
    for id in &identities {
        before.insert(id.clone(), shape(&api, id).await);
    }
    let stored: usize = before.values().map(|s| s.1.len()).sum::<usize>();
    assert!(stored >= posts.len(), "every message is in some timeline");
    daemon.terminate();
    assert!(
        daemon
            .wait_exit(Duration::from_secs(45))
            .await
            .unwrap()
            .success()
    );
    drop(daemon);

    // Into an empty store beside the first.
    let out = switchboard_command()
        .args(["replay", "--data-dir", dir.data_dir().to_str().unwrap()])
        .env("SWITCHBOARD__STORE__SQLITE_PATH", "replayed.sqlite3")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{} messages stored, 3 commands applied",
            posts.len()
        )),
        "{stdout}"
    );

    // Replay refuses a store that holds a history.
    let again = switchboard_command()
        .args(["replay", "--data-dir", dir.data_dir().to_str().unwrap()])
        .env("SWITCHBOARD__STORE__SQLITE_PATH", "replayed.sqlite3")
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty store"));

    let daemon = dir
        .start(&[("SWITCHBOARD__STORE__SQLITE_PATH", "replayed.sqlite3")])
        .await;
    let api = daemon.api();
    for (id, expected) in &before {
        assert_eq!(
            &shape(&api, id).await,
            expected,
            "history of {id} differs after replay"
        );
    }
}
