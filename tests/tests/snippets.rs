//! The Kafka snippets of docs/integration.md, run exactly as written
//! (docs/snippets/*) against the test broker and a daemon on Kafka: an
//! outbound request and a command published with kcat, events consumed with
//! kcat, and the same from Python with confluent-kafka.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::Value;
use switchboard_e2e::{BASE_MS, TestDir, envelope, switchboard_command, wait_for, workspace_root};

fn required(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set under CI: scripts/test sets it")
        }
        _ => {
            eprintln!("skipped: {var} is not set (scripts/test sets it)");
            None
        }
    }
}

fn snippet(name: &str) -> PathBuf {
    workspace_root().join("docs/snippets").join(name)
}

#[test]
fn the_docs_show_the_snippets_verbatim() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/integration.md")).unwrap();
    for name in [
        "publish-outbound.sh",
        "publish-command.sh",
        "consume-events.sh",
        "client.py",
    ] {
        let body = std::fs::read_to_string(snippet(name)).unwrap();
        assert!(
            doc.contains(&body),
            "docs/integration.md does not show docs/snippets/{name} as it is"
        );
    }
}

/// Runs a snippet; its stdout, or a panic with its stderr.
fn run(
    program: &str,
    args: &[&str],
    brokers: &str,
    prefix: &str,
    extra: &[(&str, &str)],
) -> String {
    let out = Command::new(program)
        .args(args)
        .env("BROKERS", brokers)
        .env("PREFIX", prefix)
        .envs(extra.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_snippets_work_against_the_broker() {
    let Some(brokers) = required("SWITCHBOARD_TEST_KAFKA") else {
        return;
    };
    let Some(python) = required("SWITCHBOARD_TEST_PYTHON") else {
        return;
    };
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("snip{n}.");

    // A receiver for the api channel, so the published requests are sent.
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            post(
                |State(got): State<Arc<Mutex<Vec<Value>>>>, body: Bytes| async move {
                    got.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    "{}"
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let env = [
        ("SWITCHBOARD__BUS__BACKEND", "kafka"),
        ("SWITCHBOARD__BUS__KAFKA__BROKERS", brokers.as_str()),
        ("SWITCHBOARD__BUS__TOPIC_PREFIX", prefix.as_str()),
        ("SWITCHBOARD__BUS__PARTITIONS", "2"),
        ("SWITCHBOARD__CHANNELS__API__DEFAULT_ACCOUNT", "crm"),
        (
            "SWITCHBOARD__CHANNELS__API__ACCOUNTS__CRM__URL",
            hook.as_str(),
        ),
        (
            "SWITCHBOARD__CHANNELS__API__ACCOUNTS__CRM__SECRET",
            "snippet-secret-0123456789",
        ),
    ];
    let created = switchboard_command()
        .args(["topics", "create"])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let mut dir = TestDir::new();
    let daemon = dir.start(&env).await;
    let api = daemon.api();

    // A customer to write to.
    let post = api
        .inbound(&envelope(
            "snippet-in-1",
            "api",
            "api",
            "crm",
            ("external", "contact-77"),
            ("external", "crm"),
            BASE_MS,
            "hello",
        ))
        .await
        .unwrap();
    assert_eq!(post.status.as_u16(), 202, "{}", post.body);
    let customer = wait_for("the customer", Duration::from_secs(60), || async {
        api.customer("external:contact-77").await
    })
    .await;
    let customer_id = customer["id"].as_str().unwrap().to_owned();

    // kcat: an outbound request, sent through the api channel.
    run(
        "sh",
        &[
            snippet("publish-outbound.sh").to_str().unwrap(),
            &customer_id,
        ],
        &brokers,
        &prefix,
        &[],
    );
    wait_for(
        "the kcat request at the receiver",
        Duration::from_secs(60),
        || async {
            Ok(got
                .lock()
                .unwrap()
                .iter()
                .any(|m| m["text"] == "Your parcel ships today.")
                .then_some(()))
        },
    )
    .await;

    // kcat: a command linking two identities.
    run(
        "sh",
        &[
            snippet("publish-command.sh").to_str().unwrap(),
            "ada@example.org",
            "+14155550177",
        ],
        &brokers,
        &prefix,
        &[],
    );
    let linked = wait_for("the link", Duration::from_secs(60), || async {
        Ok(api
            .customer("phone:+14155550177")
            .await?
            .filter(|c| c["identities"].as_array().is_some_and(|i| i.len() == 2)))
    })
    .await;
    assert_eq!(
        api.customer("email:ada@example.org")
            .await
            .unwrap()
            .unwrap()["id"],
        linked["id"]
    );

    // kcat: the events so far.
    let events = run(
        "sh",
        &[snippet("consume-events.sh").to_str().unwrap()],
        &brokers,
        &prefix,
        &[],
    );
    assert!(
        events
            .lines()
            .any(|l| l.starts_with(&customer_id) && l.contains("\"customer.created\"")),
        "{events}"
    );
    assert!(events.contains("\"message.sent\""), "{events}");
    assert!(events.contains("\"identity.linked\""), "{events}");

    // Python: a request and the events, in a consumer group.
    let out = run(
        &python,
        &[snippet("client.py").to_str().unwrap(), &customer_id],
        &brokers,
        &prefix,
        &[("GROUP", "snippet-test"), ("EVENTS", "3")],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines
            .iter()
            .any(|l| *l == format!("customer.created {customer_id}")),
        "{out}"
    );
    wait_for(
        "the python request at the receiver",
        Duration::from_secs(60),
        || async {
            Ok(got
                .lock()
                .unwrap()
                .iter()
                .any(|m| m["text"] == "Sent from Python.")
                .then_some(()))
        },
    )
    .await;
    let sent = got.lock().unwrap().len();
    assert_eq!(sent, 2, "each request sent once");
}
