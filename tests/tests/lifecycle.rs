//! The daemon's life cycle: SIGTERM drains and exits 0 without losing an
//! acknowledged message, and `check-config` reports configuration problems
//! by name.
//!
//! The SIGTERM tests run on the embedded log and SQLite, and (`*_kafka_pg`)
//! on Kafka and PostgreSQL, restarting on the same topics and schema.

use std::collections::HashMap;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use switchboard_e2e::{
    BASE_MS, Backend, Daemon, Flood, FloodResult, StatusCode, TestDir, backend_tests, envelope,
    post_all, stored_keys, switchboard_command, wait_for, workspace_root,
};

backend_tests! {
    sigterm_drains:
        sigterm_drains_exits_0_and_loses_nothing,
        sigterm_drains_exits_0_and_loses_nothing_kafka_pg;
    sigterm_in_flight:
        sigterm_with_posts_in_flight_loses_nothing_acknowledged,
        sigterm_with_posts_in_flight_loses_nothing_acknowledged_kafka_pg;
}

const CUSTOMERS: usize = 50;
const MESSAGES: usize = 500;

fn identity(c: usize) -> (&'static str, String) {
    match c % 4 {
        0 => ("email", format!("life{c}@example.com")),
        1 => ("phone", format!("+1415777{c:04}")),
        2 => ("telegram_user", format!("{}", 900_000 + c)),
        _ => ("external", format!("life-{c}")),
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
        "telegram_user" => (
            "telegram",
            "telegram",
            "bot-e2e",
            ("telegram_user", "777000"),
        ),
        _ => ("api", "api", "crm", ("external", "support")),
    };
    let mut env = envelope(
        &format!("life:{n}"),
        channel,
        provider,
        account,
        (kind, &value),
        to,
        BASE_MS + n as i64 * 1_000,
        &format!("message {n}"),
    );
    if channel == "email" {
        env["subject"] = Value::String(format!("Question {c}"));
    }
    env
}

fn lookups() -> Vec<String> {
    (0..CUSTOMERS)
        .map(|c| {
            let (kind, value) = identity(c);
            format!("{kind}:{value}")
        })
        .collect()
}

/// The customer a key was posted for.
fn customer_of(key: &str) -> usize {
    key.strip_prefix("life:")
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n % CUSTOMERS)
        .unwrap_or_else(|| panic!("a key this test did not post: {key}"))
}

/// SIGTERM, then the exit: 0, within the drain deadline (30 s), with the
/// listener closed.
async fn terminate_cleanly(daemon: &mut Daemon) {
    let api = daemon.api();
    daemon.terminate();
    let status = daemon
        .wait_exit(Duration::from_secs(45))
        .await
        .expect("the daemon did not exit after SIGTERM within the drain deadline");
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        daemon.stderr()
    );
    assert_eq!(status.code(), Some(0));
    assert!(
        api.client()
            .get(api.url("/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_err(),
        "the daemon still answers after exiting"
    );
}

/// Restarts on the same data directory (on Kafka and PostgreSQL: the same
/// topics and schema) and checks that every acknowledged key is in the
/// history exactly once, and nothing is stored twice.
async fn check_restart(dir: &mut TestDir, acked: &[String]) -> HashMap<String, usize> {
    let daemon = dir.start(&[]).await;
    let api = daemon.api();
    if let Ok(Some(lag)) = daemon.routing_lag().await {
        eprintln!("{lag} records not yet routed at the restart");
    }
    daemon.wait_routed(Duration::from_secs(60)).await;
    let lookups = lookups();
    let belongs = |key: &str, identity: &str| lookups[customer_of(key)] == identity;
    let counts: HashMap<String, usize> = wait_for(
        "every acknowledged message in the history",
        Duration::from_secs(60),
        || async {
            let counts = stored_keys(&api, &lookups, belongs).await?;
            Ok(acked
                .iter()
                .all(|k| counts.contains_key(k))
                .then_some(counts))
        },
    )
    .await;
    for key in acked {
        assert_eq!(counts.get(key), Some(&1), "{key}");
    }
    for (key, n) in &counts {
        assert_eq!(*n, 1, "{key} is stored {n} times");
    }
    counts
}

async fn sigterm_drains(backend: Backend) {
    let mut dir = TestDir::with_backend(backend);
    let mut daemon = dir.start(&[]).await;
    let api = daemon.api();

    let posts: Vec<Value> = (0..MESSAGES).map(post).collect();
    let mut acked = Vec::new();
    for (key, answer) in post_all(&api, posts, 32).await {
        let a = answer.unwrap_or_else(|e| panic!("posting {key}: {e:#}"));
        assert_eq!(a.status, StatusCode::ACCEPTED, "posting {key}: {}", a.body);
        acked.push(key);
    }
    // SIGTERM right after the last 202.
    terminate_cleanly(&mut daemon).await;
    drop(daemon);

    let counts = check_restart(&mut dir, &acked).await;
    assert_eq!(counts.len(), MESSAGES, "stored keys");
}

async fn sigterm_in_flight(backend: Backend) {
    const TOTAL: usize = 4_000;
    let mut dir = TestDir::with_backend(backend);
    let mut daemon = dir.start(&[]).await;
    let api = daemon.api();

    let flood = Flood::start(&api, (0..TOTAL).map(post).collect(), 64);
    flood.wait_acked(1_000, Duration::from_secs(120)).await;
    terminate_cleanly(&mut daemon).await;
    let FloodResult {
        acked,
        refused,
        failed,
    } = flood.finish(Duration::from_secs(120)).await;
    eprintln!(
        "{} acknowledged, {failed} failed, {} refused",
        acked.len(),
        refused.len()
    );
    // While draining the daemon may refuse with 503; nothing else.
    for (key, status, body) in &refused {
        assert_eq!(
            *status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{key} was refused: {body}"
        );
    }
    drop(daemon);

    let counts = check_restart(&mut dir, &acked).await;
    assert!(counts.len() <= TOTAL);
}

/// With `shutdown.unready_delay`, SIGTERM first turns `/readyz` to 503
/// (saying why) while every other request is still served, so a load
/// balancer stops sending work before the listener closes; then the daemon
/// drains and exits 0, and what it accepted meanwhile is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_the_daemon_drains() {
    let mut dir = TestDir::new();
    let mut daemon = dir
        .start(&[("SWITCHBOARD__SHUTDOWN__UNREADY_DELAY", "3s")])
        .await;
    let api = daemon.api();
    let readyz = || async {
        let r = api
            .client()
            .get(api.url("/readyz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        anyhow::Ok((r.status(), r.text().await?))
    };
    let (status, _) = readyz().await.unwrap();
    assert_eq!(status, StatusCode::OK);

    daemon.terminate();
    let (status, body) = wait_for("/readyz to answer 503", Duration::from_secs(3), || async {
        let (status, body) = readyz().await?;
        Ok((status != StatusCode::OK).then_some((status, body)))
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("draining"), "{body}");
    // Still serving everything else until the listener closes.
    let a = api.inbound(&post(7)).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    terminate_cleanly(&mut daemon).await;
    drop(daemon);
    check_restart(&mut dir, &["life:7".to_owned()]).await;
}

/// Embedded only, by nature: the data directory holds the embedded log, which
/// one process at a time may open. On Kafka and PostgreSQL the data directory
/// holds nothing shared, and a second daemon with the same configuration is
/// simply another instance of the deployment (multi_instance.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let mut dir = TestDir::new();
    let first = dir.start(&[]).await;
    let mut second = dir.spawn(&[]);
    let status = second
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("a second daemon on the same data directory kept running");
    assert!(!status.success(), "second daemon: {status}");
    let log = second.stderr();
    assert!(
        log.contains("in use"),
        "the refusal does not say why:\n{log}"
    );

    // The first one is unharmed.
    let api = first.api();
    let a = api.inbound(&post(0)).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let (kind, value) = identity(0);
    wait_for("the post to be routed", Duration::from_secs(30), || async {
        api.customer(&format!("{kind}:{value}")).await
    })
    .await;
}

fn check_config(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let mut cmd = switchboard_command();
    cmd.arg("check-config").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run switchboard check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

#[test]
fn check_config_accepts_the_defaults() {
    let (out, text) = check_config(&[], &[]);
    assert!(out.status.success(), "defaults: {}\n{text}", out.status);
    assert!(text.contains("configuration ok"), "{text}");

    // The shipped file is the defaults.
    let shipped = workspace_root().join("config/switchboard.toml");
    let (out, text) = check_config(&[shipped.to_str().unwrap()], &[]);
    assert!(out.status.success(), "shipped file: {}\n{text}", out.status);

    // A partial file on top of the defaults, with tokens from the
    // environment.
    let dir = TestDir::new();
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        "[http]\nlisten = \"127.0.0.1:9191\"\n[threading.sms]\ninactivity = \"12h\"\n",
    )
    .unwrap();
    let (out, text) = check_config(
        &[path.to_str().unwrap()],
        &[(
            "SWITCHBOARD__HTTP__TOKENS",
            "aaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbb",
        )],
    );
    assert!(out.status.success(), "partial file: {}\n{text}", out.status);
    assert!(text.contains("127.0.0.1:9191"), "{text}");
    assert!(text.contains("2 api token(s)"), "{text}");
}

#[test]
fn check_config_names_an_unknown_key() {
    let dir = TestDir::new();
    let path = dir.path().join("unknown.toml");
    std::fs::write(
        &path,
        "[http]\nlisten = \"127.0.0.1:8080\"\nlisten_port = 8081\n",
    )
    .unwrap();
    let (out, text) = check_config(&[path.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "unknown key accepted:\n{text}");
    assert!(
        text.contains("listen_port"),
        "the key is not named:\n{text}"
    );

    // The same from the environment.
    let (out, text) = check_config(&[], &[("SWITCHBOARD__BUS__PARTITONS", "4")]);
    assert!(!out.status.success(), "unknown env key accepted:\n{text}");
    assert!(text.contains("partitons"), "the key is not named:\n{text}");

    // A missing file.
    let missing = dir.path().join("missing.toml");
    let (out, text) = check_config(&[missing.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "missing file accepted:\n{text}");
    assert!(text.contains("does not exist"), "{text}");
}

#[test]
fn check_config_lists_every_value_problem() {
    let dir = TestDir::new();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[http]\nlisten = \"nowhere\"\n\
         [shutdown]\ndrain_timeout = \"30 parsecs\"\n\
         [log]\nformat = \"xml\"\n\
         [threading.default]\nreopen = \"7 weeks\"\n",
    )
    .unwrap();
    let (out, text) = check_config(
        &[path.to_str().unwrap()],
        &[("SWITCHBOARD__HTTP__TOKENS", "short")],
    );
    assert!(!out.status.success(), "bad values accepted:\n{text}");
    for key in [
        "http.listen",
        "shutdown.drain_timeout",
        "log.format",
        "threading.default.reopen",
        "http.tokens",
    ] {
        assert!(text.contains(key), "{key} is not named in:\n{text}");
    }
    assert!(text.contains("parsecs"), "{text}");
    assert!(text.contains("5 configuration problem(s)"), "{text}");

    // `run` refuses the same file without starting.
    let mut cmd = switchboard_command();
    let out = cmd
        .args(["run", "--config", path.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .expect("cannot run switchboard run");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run with a bad config: {text}");
    assert!(text.contains("http.listen"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "run created its data directory despite a bad config"
    );
}
