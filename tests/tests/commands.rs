//! Commands end to end: identity.link merges two customers, so both
//! identities find one customer holding every message;
//! conversation.resolve resolves a conversation; customer.erase removes the
//! customer's identities and messages.
//!
//! On the embedded log and SQLite, and (`*_kafka_pg`) on Kafka and
//! PostgreSQL.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_e2e::{
    Api, BASE_MS, Backend, StatusCode, TestDir, backend_tests, envelope, str_field, wait_for,
};

backend_tests! {
    link_resolve_erase: link_resolve_and_erase, link_resolve_and_erase_kafka_pg;
}

const EMAIL: &str = "dana@example.com";
const PHONE: &str = "+14155550199";

fn keys(messages: &[Value]) -> BTreeSet<String> {
    messages
        .iter()
        .map(|m| str_field(m, "idempotency_key").to_owned())
        .collect()
}

/// Waits until `identity` finds a customer holding `n` messages; returns
/// its id.
async fn customer_with(api: &Api, identity: &str, n: usize) -> String {
    wait_for(
        &format!("{identity} to hold {n} messages"),
        Duration::from_secs(60),
        || async {
            let Some(c) = api.customer(identity).await? else {
                return Ok(None);
            };
            let id = str_field(&c, "id").to_owned();
            let held = api.timeline_messages(&id, 100).await?.len();
            Ok((held == n).then_some(id))
        },
    )
    .await
}

async fn command(api: &Api, body: Value) {
    let a = api.command(&body).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "command {body}: {}", a.body);
    assert!(
        a.body["id"]
            .as_str()
            .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
        "202 without a command id: {}",
        a.body
    );
}

async fn link_resolve_erase(backend: Backend) {
    let mut dir = TestDir::with_backend(backend);
    let daemon = dir.start(&[]).await;
    let api = daemon.api();

    // Three emails and three texts, a day apart so the two stay separate
    // conversations.
    let mut posted = BTreeSet::new();
    for i in 0..3i64 {
        let key = format!("email:support:dana.{i}");
        let mut env = envelope(
            &key,
            "email",
            "imap",
            "support@switchboard.test",
            ("email", "Dana <Dana@Example.com>"),
            ("email", "support@switchboard.test"),
            BASE_MS + i * 60_000,
            &format!("email {i}"),
        );
        env["subject"] = json!("Broken widget");
        let a = api.inbound(&env).await.unwrap();
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        posted.insert(key);

        let key = format!("sms:+14155559999:dana.{i}");
        let env = envelope(
            &key,
            "sms",
            "twilio",
            "+14155559999",
            ("phone", "+1 415 555 0199"),
            ("phone", "+14155559999"),
            BASE_MS + 3 * 86_400_000 + i * 60_000,
            &format!("sms {i}"),
        );
        let a = api.inbound(&env).await.unwrap();
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        posted.insert(key);
    }
    let by_email = customer_with(&api, &format!("email:{EMAIL}"), 3).await;
    let by_phone = customer_with(&api, &format!("phone:{PHONE}"), 3).await;
    assert_ne!(by_email, by_phone, "two customers before the link");

    // A command that cannot be applied (an unknown conversation) is
    // accepted, dead-lettered, and does not hold up the commands after it.
    command(
        &api,
        json!({
            "schema": "switchboard.command.v1",
            "type": "conversation.resolve",
            "conversation_id": uuid::Uuid::now_v7(),
        }),
    )
    .await;

    // identity.link: one customer (the older survives) with both identities
    // and all six messages.
    command(
        &api,
        json!({
            "schema": "switchboard.command.v1",
            "type": "identity.link",
            "a": {"kind": "email", "value": EMAIL},
            "b": {"kind": "phone", "value": PHONE},
            "evidence": "crm",
        }),
    )
    .await;
    wait_for(
        "both identities to find one customer",
        Duration::from_secs(60),
        || async {
            let (Some(a), Some(b)) = (
                api.customer(&format!("email:{EMAIL}")).await?,
                api.customer(&format!("phone:{PHONE}")).await?,
            ) else {
                anyhow::bail!("an identity was lost during the link");
            };
            Ok((a["id"] == b["id"]).then_some(()))
        },
    )
    .await;
    // Read again: the first lookup above may predate the merge.
    let merged = api
        .customer(&format!("email:{EMAIL}"))
        .await
        .unwrap()
        .expect("the linked customer");
    let survivor = str_field(&merged, "id").to_owned();
    let (older, newer) = if by_email < by_phone {
        (&by_email, &by_phone)
    } else {
        (&by_phone, &by_email)
    };
    assert_eq!(&survivor, older, "the older customer survives the merge");
    assert_eq!(merged["merged_from"], json!([newer]), "{merged}");
    let identities: BTreeSet<String> = merged["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{}:{}", str_field(i, "kind"), str_field(i, "value")))
        .collect();
    assert_eq!(
        identities,
        BTreeSet::from([format!("email:{EMAIL}"), format!("phone:{PHONE}")])
    );
    let timeline = api.timeline_page(&survivor, None, 100).await.unwrap();
    let messages = timeline["messages"].as_array().unwrap();
    assert_eq!(keys(messages), posted, "the survivor's timeline");
    assert!(
        messages
            .iter()
            .all(|m| m["customer_id"] == survivor.as_str()),
        "messages still name the merged customer: {timeline}"
    );
    let conversations = timeline["conversations"].as_array().unwrap();
    assert_eq!(conversations.len(), 2, "{timeline}");
    // The merged customer's id leads to the survivor.
    let via_old = api.timeline_page(newer, None, 100).await.unwrap();
    assert_eq!(via_old["customer_id"], survivor.as_str());
    assert_eq!(keys(via_old["messages"].as_array().unwrap()), posted);

    // conversation.resolve on the email conversation.
    let email_conv = conversations
        .iter()
        .find(|c| c["channel"] == "email")
        .expect("an email conversation");
    let conv_id = str_field(email_conv, "id").to_owned();
    assert_eq!(email_conv["status"], "open");
    command(
        &api,
        json!({
            "schema": "switchboard.command.v1",
            "type": "conversation.resolve",
            "conversation_id": conv_id,
        }),
    )
    .await;
    let resolved = wait_for(
        "the conversation to be resolved",
        Duration::from_secs(60),
        || async {
            let c = api
                .conversation(&conv_id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("conversation {conv_id} is 404"))?;
            Ok((c["conversation"]["status"] == "resolved").then_some(c))
        },
    )
    .await;
    assert!(
        resolved["conversation"]["resolved_at"].is_string(),
        "{resolved}"
    );
    assert_eq!(resolved["messages"].as_array().unwrap().len(), 3);
    // The other conversation is untouched.
    let sms_conv = conversations
        .iter()
        .find(|c| c["channel"] == "sms")
        .expect("an sms conversation");
    let sms = api
        .conversation(str_field(sms_conv, "id"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sms["conversation"]["status"], "open");

    // customer.erase: the identities and messages go; a tombstone stays.
    command(
        &api,
        json!({
            "schema": "switchboard.command.v1",
            "type": "customer.erase",
            "customer_id": survivor,
        }),
    )
    .await;
    wait_for(
        "the erased customer's identities to be gone",
        Duration::from_secs(60),
        || async {
            let email = api.customer(&format!("email:{EMAIL}")).await?;
            let phone = api.customer(&format!("phone:{PHONE}")).await?;
            Ok((email.is_none() && phone.is_none()).then_some(()))
        },
    )
    .await;
    let a = api
        .get(&format!("/v1/customers?identity=email:{EMAIL}"))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let after = api
        .get(&format!("/v1/customers/{survivor}/timeline"))
        .await
        .unwrap();
    if after.status == StatusCode::OK {
        assert_eq!(after.body["messages"], json!([]), "erased messages remain");
        assert_eq!(
            after.body["conversations"],
            json!([]),
            "erased conversations remain"
        );
    } else {
        assert_eq!(after.status, StatusCode::NOT_FOUND, "{}", after.body);
    }
    assert!(
        api.conversation(&conv_id).await.unwrap().is_none(),
        "an erased customer's conversation is still readable"
    );
    // The identity is free again: a new message makes a new customer that
    // holds only it.
    let env = envelope(
        "email:support:dana.after",
        "email",
        "imap",
        "support@switchboard.test",
        ("email", EMAIL),
        ("email", "support@switchboard.test"),
        BASE_MS + 10 * 86_400_000,
        "hello again",
    );
    let a = api.inbound(&env).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let fresh = customer_with(&api, &format!("email:{EMAIL}"), 1).await;
    assert_ne!(fresh, survivor, "an erased customer came back");
    let timeline = api.timeline_page(&fresh, None, 100).await.unwrap();
    assert_eq!(
        keys(timeline["messages"].as_array().unwrap()),
        BTreeSet::from(["email:support:dana.after".to_owned()])
    );

    let metrics = api.metrics().await.unwrap();
    let dead: f64 = switchboard_e2e::metric_samples(&metrics, "switchboard_dead_letters_total")
        .iter()
        .filter(|(labels, _)| labels.contains("commands"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(dead, 1.0, "dead-lettered commands:\n{metrics}");
    for kind in ["identity.link", "conversation.resolve", "customer.erase"] {
        let applied: f64 =
            switchboard_e2e::metric_samples(&metrics, "switchboard_commands_applied_total")
                .iter()
                .filter(|(labels, _)| labels.contains(&format!("\"{kind}\"")))
                .map(|(_, v)| v)
                .sum();
        assert_eq!(applied, 1.0, "{kind} applied:\n{metrics}");
    }
}
