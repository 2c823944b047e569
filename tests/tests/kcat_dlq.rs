//! A record that does not decode, published to `inbound.v1` by another
//! producer (Debian's `kcat`, as an integrator would), goes to `dlq.v1` with
//! its reason, its original key and its exact bytes; the valid record after
//! it in the same partition is routed. Kafka and PostgreSQL only: on the
//! embedded log nothing but the daemon itself can write to a topic.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use switchboard_core::DeadLetter;
use switchboard_e2e::{
    BASE_MS, Backend, StatusCode, TestDir, envelope, metric_samples, str_field, wait_for,
};

/// `kcat -P`: publishes `payload` (one record: no newline in it) with `key`.
fn kcat_produce(brokers: &str, topic: &str, key: &str, payload: &[u8]) {
    assert!(
        !payload.contains(&b'\n'),
        "kcat -P splits its input at newlines"
    );
    let mut child = Command::new("kcat")
        .args(["-P", "-b", brokers, "-t", topic, "-k", key])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run kcat (scripts/kafka up installs it)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(payload)
        .expect("writing to kcat");
    let out = child.wait_with_output().expect("waiting for kcat");
    assert!(
        out.status.success(),
        "kcat -P -t {topic}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kcat -C ... -o beginning -e -J`: every record of `topic` so far, as
/// kcat's JSON envelopes (topic, partition, offset, key, payload).
fn kcat_consume(brokers: &str, topic: &str) -> anyhow::Result<Vec<Value>> {
    let out = Command::new("kcat")
        .args([
            "-C",
            "-b",
            brokers,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-J",
            "-q",
        ])
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "kcat -C -t {topic}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_is_dead_lettered_and_the_next_one_routed() {
    if !Backend::KafkaPg.available("a_malformed_record_is_dead_lettered_and_the_next_one_routed") {
        return;
    }
    let mut dir = TestDir::with_backend(Backend::KafkaPg);
    let daemon = dir.start(&[]).await;
    let api = daemon.api();
    let brokers = dir.brokers().expect("on kafka").to_owned();
    let inbound = dir.topic("inbound.v1");
    let dlq = dir.topic("dlq.v1");

    // The daemon keys inbound.v1 by the sender's identity, `kind:value`;
    // both records go to that identity's partition, the bad one first.
    let key = "external:kcat-7";
    let bad: &[u8] = b"{not json";
    kcat_produce(&brokers, &inbound, key, bad);
    let good = envelope(
        "kcat:good-1",
        "api",
        "api",
        "crm",
        ("external", "kcat-7"),
        ("external", "support"),
        BASE_MS,
        "published after a malformed record",
    );
    kcat_produce(
        &brokers,
        &inbound,
        key,
        &serde_json::to_vec(&good).expect("json"),
    );

    // Where the two landed.
    let published = kcat_consume(&brokers, &inbound).expect("reading inbound.v1");
    assert_eq!(published.len(), 2, "{published:?}");
    let bad_record = &published
        .iter()
        .find(|r| r["payload"] == "{not json")
        .unwrap_or_else(|| panic!("the malformed record is not on {inbound}: {published:?}"));
    let good_record = published
        .iter()
        .find(|r| r["payload"] != "{not json")
        .expect("the valid record");
    assert_eq!(
        bad_record["partition"], good_record["partition"],
        "one key, one partition"
    );
    assert!(
        bad_record["offset"].as_u64() < good_record["offset"].as_u64(),
        "the malformed record comes first: {published:?}"
    );

    // The valid one is routed: the partition went on past the bad one.
    let customer = wait_for(
        "the valid record to be routed",
        Duration::from_secs(60),
        || async { api.customer("external:kcat-7").await },
    )
    .await;
    let messages = wait_for("its message", Duration::from_secs(30), || async {
        let m = api
            .timeline_messages(str_field(&customer, "id"), 100)
            .await?;
        Ok((!m.is_empty()).then_some(m))
    })
    .await;
    let keys: Vec<&str> = messages
        .iter()
        .map(|m| str_field(m, "idempotency_key"))
        .collect();
    assert_eq!(keys, ["kcat:good-1"]);
    assert_eq!(messages[0]["text"], "published after a malformed record");

    // The malformed one is on dlq.v1: keyed as it was, with the reason, its
    // coordinates and its exact bytes.
    let letters = wait_for("the dead letter", Duration::from_secs(30), || async {
        let records = kcat_consume(&brokers, &dlq)?;
        Ok((!records.is_empty()).then_some(records))
    })
    .await;
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    let record = &letters[0];
    assert_eq!(
        record["key"], key,
        "the dead letter keeps the key: {record}"
    );
    let payload = str_field(record, "payload");
    let json: Value = serde_json::from_str(payload).expect("a dead letter is JSON");
    assert_eq!(json["schema"], "switchboard.dlq.v1", "{json}");
    // The daemon's own type decodes it (it refuses unknown fields).
    let letter: DeadLetter = serde_json::from_str(payload).expect("a switchboard.dlq.v1 record");
    assert_eq!(letter.topic, inbound, "{json}");
    assert_eq!(
        Some(u64::from(letter.partition)),
        bad_record["partition"].as_u64(),
        "{json}"
    );
    assert_eq!(Some(letter.offset), bad_record["offset"].as_u64(), "{json}");
    assert!(
        letter.error.contains("malformed json"),
        "the reason does not say what is wrong: {:?}",
        letter.error
    );
    assert!(!letter.retryable, "a malformed record is not retryable");
    // On Kafka the identity stage reads inbound.v1, so it is the one that
    // gives up on the record (its group follows the topic prefix).
    let identity_group = switchboard_core::Topics::with_prefix(dir.topic_prefix())
        .groups
        .identity;
    assert_eq!(letter.group, identity_group, "{json}");
    let (orig_key, orig_payload) = letter.original().expect("valid base64");
    assert_eq!(orig_key, key.as_bytes());
    assert_eq!(
        orig_payload, bad,
        "payload_base64 is not the original bytes"
    );

    // Counted once, by source topic; nothing else went wrong.
    let metrics = api.metrics().await.expect("/metrics");
    let dead: Vec<(String, f64)> = metric_samples(&metrics, "switchboard_dead_letters_total");
    assert_eq!(dead.iter().map(|(_, v)| v).sum::<f64>(), 1.0, "{metrics}");
    assert!(dead.iter().any(|(l, _)| l.contains(&inbound)), "{dead:?}");
    let health = api
        .client()
        .get(api.url("/readyz"))
        .send()
        .await
        .expect("/readyz");
    assert_eq!(health.status(), StatusCode::OK);
}
