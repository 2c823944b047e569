//! `switchboard dlq list | show | redrive` on both backends: a command
//! refused for a reason that a later command fixes is dead-lettered, listed
//! and shown while the daemon runs, and redriven once its cause is fixed,
//! after which it takes effect exactly once.

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_e2e::{
    Api, BASE_MS, Backend, TestDir, backend_tests, envelope, switchboard_command, wait_for,
};

/// Runs `switchboard dlq ARGS` against the directory's data and backend.
fn dlq(dir: &mut TestDir, args: &[&str]) -> Output {
    let data_dir = dir.data_dir();
    let env = dir.backend_env();
    let mut cmd = switchboard_command();
    cmd.arg("dlq")
        .args(args)
        .args(["--data-dir", data_dir.to_str().unwrap()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run switchboard dlq")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn identities(api: &Api, identity: &str) -> Option<Vec<String>> {
    let c = api.customer(identity).await.ok()??;
    let mut ids: Vec<String> = c["identities"]
        .as_array()?
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["kind"].as_str().unwrap(),
                i["value"].as_str().unwrap()
            )
        })
        .collect();
    ids.sort();
    Some(ids)
}

fn command(id: &str, kind: Value) -> Value {
    let mut c = kind;
    c["schema"] = json!("switchboard.command.v1");
    c["id"] = json!(id);
    c["at"] = json!("2026-11-02T10:00:00Z");
    c
}

async fn dead_letter_redriven_after_its_cause_is_fixed(backend: Backend) {
    let mut dir = TestDir::with_backend(backend);
    let mut daemon = dir.start(&[]).await;
    let api = daemon.api();

    // Ada writes once: a customer with one identity.
    let a = api
        .inbound(&envelope(
            "dlq:mail:1",
            "email",
            "imap",
            "support@example.com",
            ("email", "ada@example.org"),
            ("email", "support@example.com"),
            BASE_MS,
            "hello",
        ))
        .await
        .unwrap();
    assert_eq!(a.status.as_u16(), 202, "{}", a.body);
    wait_for("ada's customer", Duration::from_secs(60), || async {
        Ok(identities(&api, "email:ada@example.org").await)
    })
    .await;

    // The CRM says her email is not her phone's, but she has no phone yet:
    // refused ("only identity"), dead-lettered.
    let unlink = command(
        "01936f0e-7c1a-7000-8000-00000000d001",
        json!({"type": "identity.unlink",
               "identity": {"kind": "email", "value": "ada@example.org"},
               "evidence": "crm: shared mailbox"}),
    );
    let a = api.command(&unlink).await.unwrap();
    assert_eq!(a.status.as_u16(), 202, "{}", a.body);

    let listed = wait_for("the dead letter listed", Duration::from_secs(60), || {
        let out = dlq(&mut dir, &["list", "--reason", "only identity"]);
        async move {
            assert!(out.status.success(), "{}", text(&out));
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok((!stdout.trim().is_empty()).then_some(stdout))
        }
    })
    .await;
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 1, "{listed}");
    assert!(lines[0].contains("commands.v1"), "{listed}");
    let id = lines[0].split_whitespace().next().unwrap().to_owned();

    let shown = dlq(&mut dir, &["show", &id]);
    assert!(shown.status.success(), "{}", text(&shown));
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("nothing to unlink"), "{shown}");
    assert!(
        shown.contains("\"identity.unlink\""),
        "the original payload: {shown}"
    );

    // Nothing is redriven without a filter.
    let refused = dlq(&mut dir, &["redrive"]);
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused));

    // The fix: her phone number, linked to her.
    let link = command(
        "01936f0e-7c1a-7000-8000-00000000d002",
        json!({"type": "identity.link",
               "a": {"kind": "email", "value": "ada@example.org"},
               "b": {"kind": "phone", "value": "+14155550123"},
               "evidence": "crm"}),
    );
    let a = api.command(&link).await.unwrap();
    assert_eq!(a.status.as_u16(), 202, "{}", a.body);
    wait_for("the link applied", Duration::from_secs(60), || async {
        Ok((identities(&api, "email:ada@example.org").await
            == Some(vec![
                "email:ada@example.org".to_owned(),
                "phone:+14155550123".to_owned(),
            ]))
        .then_some(()))
    })
    .await;

    if backend == Backend::Embedded {
        // The embedded log has one writer: redrive refuses while the daemon
        // runs, and says what to do.
        let busy = dlq(&mut dir, &["redrive", "--id", &id]);
        assert!(!busy.status.success(), "{}", text(&busy));
        assert!(
            String::from_utf8_lossy(&busy.stderr).contains("stop the daemon"),
            "{}",
            text(&busy)
        );
        daemon.terminate();
        daemon.wait_exit(Duration::from_secs(30)).await.unwrap();
    }
    let dry = dlq(&mut dir, &["redrive", "--id", &id, "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(String::from_utf8_lossy(&dry.stderr).contains("1 dead letter(s) would be redriven"));
    let redriven = dlq(&mut dir, &["redrive", "--id", &id]);
    assert!(redriven.status.success(), "{}", text(&redriven));
    assert!(
        String::from_utf8_lossy(&redriven.stderr).contains("redrove 1 dead letter(s)"),
        "{}",
        text(&redriven)
    );
    if backend == Backend::Embedded {
        daemon = dir.start(&[]).await;
    }
    let api = daemon.api();

    // The unlink now takes effect: the email is a customer of its own again.
    wait_for(
        "the redriven unlink applied",
        Duration::from_secs(60),
        || async {
            Ok((identities(&api, "email:ada@example.org").await
                == Some(vec!["email:ada@example.org".to_owned()]))
            .then_some(()))
        },
    )
    .await;
    assert_eq!(
        identities(&api, "phone:+14155550123").await,
        Some(vec!["phone:+14155550123".to_owned()])
    );
    // It succeeded, so no new dead letter: still exactly the one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = dlq(&mut dir, &["list"]);
    assert!(all.status.success(), "{}", text(&all));
    assert_eq!(
        String::from_utf8_lossy(&all.stdout).lines().count(),
        1,
        "{}",
        text(&all)
    );
    drop(daemon);
}

backend_tests! {
    dead_letter_redriven_after_its_cause_is_fixed:
        redrive_on_embedded, redrive_on_kafka_pg;
}
