//! SIGHUP reloads what is safe to reload on a running daemon (here: the API
//! tokens, from `http.tokens_file`, and `log.level`) and refuses a change
//! that needs a restart (here: `http.listen`), naming it and applying
//! nothing.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use switchboard_e2e::{
    Api, BASE_MS, StatusCode, TestDir, envelope, free_port, switchboard_command, wait_for,
};

fn config(tokens_file: &str, level: &str, port: u16) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\ntokens_file = \"{tokens_file}\"\n\n[log]\nlevel = \"{level}\"\n"
    )
}

/// The status of an authenticated read with `token`.
async fn status_with(addr: SocketAddr, token: &str) -> StatusCode {
    Api::new(addr, token)
        .get("/v1/customers?identity=phone:%2B14155550100")
        .await
        .map(|a| a.status)
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

fn hup(child: &Child) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -HUP failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_tokens_and_refuses_a_new_listen_address() {
    let dir = TestDir::new();
    let tokens = dir.path().join("tokens");
    let file = dir.path().join("switchboard.toml");
    let log = dir.path().join("daemon.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(&tokens, "token-one-0123456789\n").unwrap();
    let tokens_path = tokens.to_str().unwrap();
    std::fs::write(&file, config(tokens_path, "info", port)).unwrap();

    let mut child = switchboard_command()
        .args(["run", "--config", file.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("SWITCHBOARD__HTTP__TOKENS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start switchboard");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    wait_for("the daemon to answer", Duration::from_secs(60), || async {
        Ok(
            (status_with(addr, "token-one-0123456789").await == StatusCode::NOT_FOUND)
                .then_some(()),
        )
    })
    .await;
    assert_eq!(
        status_with(addr, "token-two-0123456789").await,
        StatusCode::UNAUTHORIZED
    );

    // Rotate: the new token in the file, a finer log level; SIGHUP.
    std::fs::write(&tokens, "token-two-0123456789\n").unwrap();
    std::fs::write(&file, config(tokens_path, "debug", port)).unwrap();
    hup(&child);
    wait_for(
        "the new token to be accepted",
        Duration::from_secs(20),
        || async {
            Ok(
                (status_with(addr, "token-two-0123456789").await == StatusCode::NOT_FOUND)
                    .then_some(()),
            )
        },
    )
    .await;
    assert_eq!(
        status_with(addr, "token-one-0123456789").await,
        StatusCode::UNAUTHORIZED,
        "the old token is refused after the reload"
    );
    assert!(
        log_text().contains("configuration reloaded"),
        "{}",
        log_text()
    );
    // log.level = "debug" took effect: debug lines appear after the reload.
    let a = Api::new(addr, "token-two-0123456789")
        .inbound(&envelope(
            "reload:1",
            "sms",
            "twilio",
            "+15550001111",
            ("phone", "+14155550199"),
            ("phone", "+15550001111"),
            BASE_MS,
            "hi",
        ))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    wait_for("a debug line", Duration::from_secs(20), || async {
        Ok(log_text().contains("inbound accepted").then_some(()))
    })
    .await;

    // A new listen address needs a restart: refused, nothing applied.
    std::fs::write(&tokens, "token-three-0123456789\n").unwrap();
    std::fs::write(&file, config(tokens_path, "info", free_port())).unwrap();
    hup(&child);
    wait_for(
        "the refusal in the log",
        Duration::from_secs(20),
        || async {
            Ok(log_text()
                .contains("configuration reload refused")
                .then_some(()))
        },
    )
    .await;
    let text = log_text();
    assert!(
        text.contains("http.listen"),
        "the refusal names the key: {text}"
    );
    assert_eq!(
        status_with(addr, "token-two-0123456789").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_with(addr, "token-three-0123456789").await,
        StatusCode::UNAUTHORIZED,
        "nothing of the refused reload was applied"
    );

    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit {status}: {}", log_text());
}
