//! kill -9 while 10,000 posts are in flight: every post the daemon answered
//! 2xx is in the history after a restart on the same data directory, exactly
//! once, and no post (acknowledged or not) is stored twice.
//!
//! On the embedded log and SQLite, and (`*_kafka_pg`) on Kafka and
//! PostgreSQL, where the restart reuses the same topics and schema.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use switchboard_e2e::{
    BASE_MS, Backend, Flood, FloodResult, StatusCode, TestDir, backend_tests, envelope,
    stored_keys, wait_for,
};

backend_tests! {
    survive_kill_9:
        acknowledged_posts_survive_kill_9,
        acknowledged_posts_survive_kill_9_kafka_pg;
}

const TOTAL: usize = 10_000;
const CUSTOMERS: usize = 200;
const CONCURRENCY: usize = 96;
/// SIGKILL once this many posts were acknowledged.
const KILL_AFTER: usize = 3_000;

/// The customer identity (`kind:value`) of customer `c`.
fn identity(c: usize) -> (&'static str, String) {
    match c % 3 {
        0 => ("email", format!("crash{c}@example.com")),
        1 => ("phone", format!("+1415666{c:04}")),
        _ => ("external", format!("ext-{c}")),
    }
}

fn post(n: usize) -> Value {
    let c = n % CUSTOMERS;
    let (kind, value) = identity(c);
    let (channel, provider, account, to) = match kind {
        "email" => (
            "email",
            "imap",
            "support@switchboard.test",
            ("email", "support@switchboard.test"),
        ),
        "phone" => ("sms", "twilio", "+14155559999", ("phone", "+14155559999")),
        _ => ("api", "api", "crm", ("external", "support")),
    };
    let mut env = envelope(
        &format!("crash:{n}"),
        channel,
        provider,
        account,
        (kind, &value),
        to,
        BASE_MS + n as i64 * 10,
        &format!("message {n}"),
    );
    if channel == "email" {
        env["subject"] = Value::String(format!("Case {c}"));
    }
    env
}

/// The customer a key was posted for.
fn customer_of(key: &str) -> usize {
    key.strip_prefix("crash:")
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n % CUSTOMERS)
        .unwrap_or_else(|| panic!("a key this test did not post: {key}"))
}

/// The identities of every customer, as lookups.
fn identities() -> Vec<String> {
    (0..CUSTOMERS)
        .map(|c| {
            let (kind, value) = identity(c);
            format!("{kind}:{value}")
        })
        .collect()
}

async fn survive_kill_9(backend: Backend) {
    // On Kafka and PostgreSQL the restart reuses the directory's topics and
    // schema: the same deployment, restarted.
    let mut dir = TestDir::with_backend(backend);
    let mut daemon = dir.start(&[]).await;
    let api = daemon.api();

    let flood = Flood::start(&api, (0..TOTAL).map(post).collect(), CONCURRENCY);
    flood.wait_acked(KILL_AFTER, Duration::from_secs(120)).await;
    daemon.kill();
    let at_kill = flood.acked();
    let FloodResult {
        acked,
        refused,
        failed,
    } = flood.finish(Duration::from_secs(120)).await;
    eprintln!(
        "{} acknowledged ({at_kill} when killed), {failed} failed, {} refused",
        acked.len(),
        refused.len()
    );
    assert_eq!(acked.len() + failed + refused.len(), TOTAL);
    assert!(
        failed > 0 && acked.len() < TOTAL,
        "the kill did not interrupt any post"
    );
    // A healthy daemon refuses nothing it is given here; it may only answer
    // 503 (not durable, retry).
    for (key, status, body) in &refused {
        assert_eq!(
            *status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{key} was refused: {body}"
        );
    }

    // Restart on the same data directory; everything on the bus is routed.
    drop(daemon);
    let daemon = dir.start(&[]).await;
    let api = daemon.api();
    if let Ok(Some(lag)) = daemon.routing_lag().await {
        eprintln!("{lag} records not yet routed at the restart");
    }
    daemon.wait_routed(Duration::from_secs(120)).await;

    let lookups = identities();
    let belongs = |key: &str, identity: &str| lookups[customer_of(key)] == identity;
    let counts: HashMap<String, usize> = wait_for(
        "every acknowledged post to be in the history",
        Duration::from_secs(120),
        || async {
            let counts = stored_keys(&api, &lookups, belongs).await?;
            let missing = acked.iter().filter(|k| !counts.contains_key(*k)).count();
            Ok((missing == 0).then_some(counts))
        },
    )
    .await;

    let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "{} keys are stored more than once, e.g. {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(10)]
    );
    for key in &acked {
        assert_eq!(counts.get(key), Some(&1), "acknowledged {key}");
    }
    // Posts in flight at the kill may have been durable without their answer
    // arriving: stored but unacknowledged is allowed, lost or doubled is not.
    assert!(
        counts.len() <= acked.len() + failed + refused.len(),
        "more stored than posted"
    );
    eprintln!(
        "{} stored after the restart ({} of them unacknowledged)",
        counts.len(),
        counts.len() - acked.len()
    );
    let metrics = api.metrics().await.unwrap();
    assert_eq!(
        switchboard_e2e::metric_sum(&metrics, "switchboard_dead_letters_total"),
        0.0,
        "dead letters after the restart:\n{metrics}"
    );
}
