//! What an operator sees and shares on Kafka: the routing lag the daemon
//! reports in `/metrics`, and the consumer groups of two deployments (two
//! topic prefixes) on one cluster. Both were daemon bugs, found by these
//! tests and fixed; each test describes what went wrong.

use std::time::{Duration, Instant};

use switchboard_e2e::{
    Api, BASE_MS, Backend, Daemon, StatusCode, TestDir, envelope, metric_samples, wait_for,
};

/// Posts one api message from `external:<who>` and returns when it was
/// accepted.
async fn post_one(api: &Api, key: &str, who: &str) -> Instant {
    let a = api
        .inbound(&envelope(
            key,
            "api",
            "api",
            "crm",
            ("external", who),
            ("external", "support"),
            BASE_MS,
            "hello",
        ))
        .await
        .expect("POST /v1/inbound");
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    Instant::now()
}

/// Regression (crates/switchboard/src/http.rs, `metrics`): on Kafka the
/// daemon re-keys (`inbound.v1` is read by the identity group, `routed.v1`
/// by the router group), but `/metrics` used to report `switchboard_bus_lag`
/// for the router group on `inbound.v1`, a pair nothing consumes, so the
/// gauge counted every record ever accepted and never went down. It now
/// reports the pairs the daemon consumes (`daemon::consumed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_metric_returns_to_zero_on_kafka() {
    if !Backend::KafkaPg.available("the_lag_metric_returns_to_zero_on_kafka") {
        return;
    }
    let mut dir = TestDir::with_backend(Backend::KafkaPg);
    let daemon = dir.start(&[]).await;
    let api = daemon.api();
    for i in 0..3 {
        post_one(&api, &format!("lag:{i}"), "lag-metric").await;
    }
    // Routed, by the broker's account and by the history.
    daemon.wait_routed(Duration::from_secs(60)).await;
    wait_for("the customer", Duration::from_secs(30), || async {
        api.customer("external:lag-metric").await
    })
    .await;
    // The daemon's own gauge for the routing of inbound.v1.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let text = api.metrics().await.expect("/metrics");
        let lags: Vec<(String, f64)> = metric_samples(&text, "switchboard_bus_lag")
            .into_iter()
            .filter(|(labels, _)| labels.contains("inbound.v1"))
            .collect();
        if !lags.is_empty() && lags.iter().all(|(_, v)| *v == 0.0) {
            return;
        }
        last = format!("{lags:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("switchboard_bus_lag for inbound.v1 never returned to 0 although all is routed: {last}");
}

/// Starts a daemon on `dir` with the daemon's default consumer session
/// timeout (librdkafka's 45 s) instead of the helpers' 6 s.
async fn start_default_session(dir: &mut TestDir) -> Daemon {
    dir.start(&[
        (
            "SWITCHBOARD__BUS__KAFKA__OPTIONS__SESSION_TIMEOUT_MS",
            "45000",
        ),
        (
            "SWITCHBOARD__BUS__KAFKA__OPTIONS__HEARTBEAT_INTERVAL_MS",
            "3000",
        ),
    ])
    .await
}

/// Regression: the consumer group ids used to be constants
/// (`switchboard-router`, ...) whatever `bus.topic_prefix` said, so two
/// deployments on one Kafka cluster with different prefixes (staging and
/// production, two tenants) were members of the same groups. Their offsets
/// did not collide (they are per topic), but their rebalances were one:
/// when an instance of deployment A died without leaving (kill -9, a lost
/// host) and was restarted, the group waited for the dead member's session
/// to expire (45 s by default) before completing the rebalance the restart
/// started, and deployment B had its partitions revoked and routed nothing
/// meanwhile (measured: B routed a message 39.6 s after it was posted). The
/// groups now follow the prefix (`switchboard_core::Groups`).
///
/// The test: B runs; A runs, is killed with SIGKILL and restarted at once;
/// a message posted to B 5 s later must be routed within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_with_different_prefixes_do_not_stall_each_other() {
    if !Backend::KafkaPg.available("deployments_with_different_prefixes_do_not_stall_each_other") {
        return;
    }
    let mut b_dir = TestDir::with_backend(Backend::KafkaPg);
    let b = start_default_session(&mut b_dir).await;
    let b_api = b.api();
    post_one(&b_api, "b:0", "deployment-b").await;
    b.wait_routed(Duration::from_secs(60)).await;

    let mut a_dir = TestDir::with_backend(Backend::KafkaPg);
    let mut a = start_default_session(&mut a_dir).await;
    post_one(&a.api(), "a:0", "deployment-a").await;
    a.wait_routed(Duration::from_secs(60)).await;
    a.kill();
    drop(a);
    let a2 = start_default_session(&mut a_dir).await;
    // A's restarted instance joins the groups (a rebalance that cannot end
    // before the dead member's session expires); B's members hear of it at
    // their next heartbeat (3 s).
    let a_posted = post_one(&a2.api(), "a:1", "deployment-a-2").await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let posted = post_one(&b_api, "b:1", "deployment-b-2").await;
    wait_for(
        "B's message to be routed",
        Duration::from_secs(120),
        || async { b_api.customer("external:deployment-b-2").await },
    )
    .await;
    let took = posted.elapsed();
    let a2_api = a2.api();
    wait_for(
        "A's message to be routed",
        Duration::from_secs(120),
        || async { a2_api.customer("external:deployment-a-2").await },
    )
    .await;
    eprintln!(
        "deployment B routed a message {took:?} after it was posted, while deployment A \
         restarted after a kill -9 (A's restarted instance routed its first message after \
         {:?})",
        a_posted.elapsed()
    );
    drop(a2);
    assert!(
        took < Duration::from_secs(10),
        "deployment B's routing stalled for {took:?} because an instance of deployment A \
         (another topic prefix) was killed and restarted"
    );
}
