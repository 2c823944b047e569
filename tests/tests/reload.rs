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

/// Starts the daemon on `file`, its log in `log`.
fn start(dir: &TestDir, file: &std::path::Path, log: &std::path::Path) -> Child {
    switchboard_command()
        .args(["run", "--config", file.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("SWITCHBOARD__HTTP__TOKENS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start switchboard")
}

/// Waits until the daemon answers an authenticated read with `token`.
async fn answering(addr: SocketAddr, token: &str) {
    wait_for("the daemon to answer", Duration::from_secs(60), || async {
        Ok((status_with(addr, token).await == StatusCode::NOT_FOUND).then_some(()))
    })
    .await;
}

/// SIGTERM, then a clean exit (`log` shown if not).
async fn stop(mut child: Child, log: String) {
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
    assert!(status.success(), "exit {status}: {log}");
}

/// Waits for a refused reload in the log and checks it names `key`.
async fn refused_naming(log_text: &impl Fn() -> String, key: &str) {
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
    assert!(text.contains(key), "the refusal names {key}: {text}");
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

    let child = start(&dir, &file, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    answering(addr, "token-one-0123456789").await;
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
    refused_naming(&log_text, "http.listen").await;
    assert_eq!(
        status_with(addr, "token-two-0123456789").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_with(addr, "token-three-0123456789").await,
        StatusCode::UNAUTHORIZED,
        "nothing of the refused reload was applied"
    );

    stop(child, log_text()).await;
}

fn sms_config(
    tokens_file: &str,
    port: u16,
    auth_token_file: &str,
    api_base: &str,
    number: &str,
) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\ntokens_file = \"{tokens_file}\"\n\n\
         [channels.sms.accounts.main]\nprovider = \"twilio\"\nnumber = \"{number}\"\n\
         default_region = \"US\"\npublic_url = \"https://sb.example.test/webhooks/sms/main\"\n\
         api_base = \"{api_base}\"\naccount_sid = \"ACe2e0000000000000000000000000000\"\n\
         auth_token_file = \"{auth_token_file}\"\n"
    )
}

/// A Twilio webhook signed with `token`, posted to the daemon.
async fn twilio_inbound(addr: SocketAddr, sid: &str, token: &str) -> StatusCode {
    use switchboard_e2e::providers::{form_encode, params, twilio_signature};
    let form = params(&[
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("AccountSid", "ACe2e0000000000000000000000000000"),
        ("From", "+14155550100"),
        ("To", "+15550001111"),
        ("Body", "Is my order on its way?"),
        ("NumMedia", "0"),
        ("NumSegments", "1"),
    ]);
    let signature = twilio_signature(token, "https://sb.example.test/webhooks/sms/main", &form);
    reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/sms/main"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", signature)
        .body(form_encode(&form))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

/// The Twilio auth token is rotated in its file: after SIGHUP webhooks
/// signed with the new token are accepted and the old refused, and a send
/// authenticates with the new one. Changing the account's number is
/// refused, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_an_sms_auth_token_and_refuses_a_new_number() {
    use base64::Engine as _;
    let provider = switchboard_e2e::providers::FakeProvider::start().await;
    let dir = TestDir::new();
    let tokens = dir.path().join("tokens");
    let auth = dir.path().join("twilio-auth-token");
    let file = dir.path().join("switchboard.toml");
    let log = dir.path().join("daemon.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(&tokens, "token-one-0123456789\n").unwrap();
    std::fs::write(&auth, "twilio-token-old\n").unwrap();
    let (tokens_path, auth_path) = (tokens.to_str().unwrap(), auth.to_str().unwrap());
    let base = provider.base_url();
    std::fs::write(
        &file,
        sms_config(tokens_path, port, auth_path, &base, "+15550001111"),
    )
    .unwrap();

    let child = start(&dir, &file, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    answering(addr, "token-one-0123456789").await;
    assert_eq!(
        twilio_inbound(
            addr,
            "SMe2e0000000000000000000000000r01",
            "twilio-token-new"
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        twilio_inbound(
            addr,
            "SMe2e0000000000000000000000000r01",
            "twilio-token-old"
        )
        .await,
        StatusCode::OK
    );

    std::fs::write(&auth, "twilio-token-new\n").unwrap();
    hup(&child);
    wait_for(
        "the new auth token to be accepted",
        Duration::from_secs(20),
        || async {
            Ok((twilio_inbound(
                addr,
                "SMe2e0000000000000000000000000r02",
                "twilio-token-new",
            )
            .await
                == StatusCode::OK)
                .then_some(()))
        },
    )
    .await;
    assert_eq!(
        twilio_inbound(
            addr,
            "SMe2e0000000000000000000000000r03",
            "twilio-token-old"
        )
        .await,
        StatusCode::FORBIDDEN,
        "the old token is refused after the reload"
    );
    let text = log_text();
    assert!(text.contains("configuration reloaded"), "{text}");
    assert!(
        !text.contains("twilio-token-new") && !text.contains("twilio-token-old"),
        "a credential reached the log: {text}"
    );

    // A reply authenticates with the new token.
    let api = Api::new(addr, "token-one-0123456789");
    let conversation = wait_for("the message routed", Duration::from_secs(30), || async {
        let Some(customer) = api.customer("phone:+14155550100").await? else {
            return Ok(None);
        };
        let msgs = api
            .timeline_messages(switchboard_e2e::str_field(&customer, "id"), 10)
            .await?;
        Ok(msgs
            .first()
            .map(|m| switchboard_e2e::str_field(m, "conversation_id").to_owned()))
    })
    .await;
    let answer = api
        .send_message(&switchboard_e2e::outbound_request(
            "reload-reply-1",
            &conversation,
            "On its way",
        ))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let sent = provider.wait_sent(1, Duration::from_secs(30)).await;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode("ACe2e0000000000000000000000000000:twilio-token-new")
    );
    assert_eq!(sent[0].authorization.as_deref(), Some(expected.as_str()));

    // The account's number is not a credential: refused, named.
    std::fs::write(
        &file,
        sms_config(tokens_path, port, auth_path, &base, "+15550002222"),
    )
    .unwrap();
    hup(&child);
    refused_naming(&log_text, "channels.sms.accounts.main.number").await;

    stop(child, log_text()).await;
}
