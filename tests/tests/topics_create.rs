//! `switchboard topics create` on Kafka: it creates every topic with
//! `bus.partitions` partitions, a second run finds them all, and a first run
//! on fresh topics succeeds (it did not always: a regression test).

use std::process::Command;

use switchboard_e2e::{
    Backend, KAFKA_PARTITIONS, TOPICS, TestDir, delete_topics, kafka_brokers, random_prefix,
    topics_create,
};

/// Partitions per topic as `kcat -L` lists them: (topic, partitions).
fn listed_partitions(brokers: &str, topic: &str) -> Option<usize> {
    let out = Command::new("kcat")
        .args(["-L", "-b", brokers, "-t", topic])
        .output()
        .expect("cannot run kcat (scripts/kafka up installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    // `  topic "NAME" with N partitions:`
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(&format!("topic \"{topic}\" with "))?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_create_makes_every_topic_and_a_second_run_finds_them() {
    if !Backend::KafkaPg.available("topics_create_makes_every_topic_and_a_second_run_finds_them") {
        return;
    }
    let mut dir = TestDir::with_backend(Backend::KafkaPg);
    // Creates the topics (the helper runs `topics create`).
    let env = dir.backend_env();
    let brokers = dir.brokers().expect("on kafka").to_owned();
    for t in TOPICS {
        let topic = dir.topic(t);
        assert_eq!(
            listed_partitions(&brokers, &topic),
            Some(KAFKA_PARTITIONS as usize),
            "{topic}"
        );
    }

    let out = topics_create(&env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "second run: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for t in TOPICS {
        let line = format!("exists  {}", dir.topic(t));
        assert!(stdout.lines().any(|l| l == line), "{line:?} in:\n{stdout}");
    }
    assert!(stdout.contains("every topic is present"), "{stdout}");
}

/// Regression (crates/switchboard-bus/src/kafka.rs, `check_topics`): right
/// after `KafkaBus::create_topics` reported the topics created, one metadata
/// request now and then did not list the brand-new topics yet (KRaft applies
/// the controller's records to the broker's metadata cache asynchronously),
/// and the command printed `missing kafka topics: <every topic>` and exited
/// 1 although it had created them all (2 of 30 and 1 of 12 serial runs by
/// hand). `switchboard run` made the same single check. `check_topics` now
/// asks again for up to `TOPIC_CHECK_PATIENCE` before it reports a topic
/// missing.
///
/// This test creates 20 fresh topic sets and expects every first run to
/// succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_create_succeeds_on_its_first_run() {
    if !Backend::KafkaPg.available("topics_create_succeeds_on_its_first_run") {
        return;
    }
    let brokers = kafka_brokers();
    let _lock = switchboard_e2e::lock_kafka(&brokers, false);
    let mut failures = Vec::new();
    let mut created = Vec::new();
    for _ in 0..20 {
        let prefix = random_prefix();
        let env: Vec<(String, String)> = [
            ("SWITCHBOARD__BUS__BACKEND", "kafka"),
            ("SWITCHBOARD__BUS__KAFKA__BROKERS", brokers.as_str()),
            ("SWITCHBOARD__BUS__TOPIC_PREFIX", prefix.as_str()),
            ("SWITCHBOARD__BUS__PARTITIONS", "4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let out = topics_create(&env);
        created.extend(TOPICS.iter().map(|t| format!("{prefix}{t}")));
        if !out.status.success() {
            let again = topics_create(&env);
            failures.push(format!(
                "{prefix}: {} {}; run again: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                again.status,
                String::from_utf8_lossy(&again.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
            ));
        }
    }
    if let Err(e) = delete_topics(&brokers, &created) {
        eprintln!("cannot delete the topics: {e:#}");
    }
    assert!(
        failures.is_empty(),
        "{} of 20 first runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
