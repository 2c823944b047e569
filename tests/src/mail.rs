//! The mail server of the email tests: Dovecot (IMAP) and Postfix (SMTP)
//! that `scripts/mail up` starts and describes in `SWITCHBOARD_TEST_MAIL`
//! (`host=… imap=… imaps=… smtp=… smtps=… password=… ca=…`).
//!
//! Every address in a `.test` domain is a mailbox with the one password;
//! mail to `reply+TOKEN@D` lands in `inbox@D`. Each test takes a domain of
//! its own ([`MailServer::domain`]), so tests never see each other's mail,
//! even across runs on one server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures_util::TryStreamExt as _;
use switchboard_email::config::{AfterAccept, Auth, ImapConfig, Security};
use switchboard_email::imap::Session;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// The variable naming the test mail server.
pub const MAIL_ENV: &str = "SWITCHBOARD_TEST_MAIL";

/// The test mail server.
#[derive(Debug, Clone)]
pub struct MailServer {
    /// Host (loopback).
    pub host: String,
    /// IMAP, plain with STARTTLS.
    pub imap: u16,
    /// IMAP over implicit TLS.
    pub imaps: u16,
    /// SMTP from loopback, no authentication, STARTTLS offered.
    pub smtp: u16,
    /// SMTP over implicit TLS with AUTH.
    pub smtps: u16,
    /// Every user's password.
    pub password: String,
    /// The CA that signed the servers' certificate.
    pub ca: PathBuf,
}

impl MailServer {
    /// The server named by `SWITCHBOARD_TEST_MAIL`. When it is not set:
    /// under CI (`CI` set) this panics, since the test script provides the
    /// server; elsewhere it prints a notice naming `test` and returns
    /// `None`, and the caller skips.
    pub fn from_env(test: &str) -> Option<MailServer> {
        match std::env::var(MAIL_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                Some(MailServer::parse(&v).unwrap_or_else(|e| panic!("{MAIL_ENV}={v:?}: {e:#}")))
            }
            _ if std::env::var_os("CI").is_some() => panic!(
                "{MAIL_ENV} not set, but CI is: the test script must start the mail server \
                 (scripts/mail up)"
            ),
            _ => {
                eprintln!(
                    "SKIPPED {test}: set {MAIL_ENV} to what `scripts/mail up` prints \
                     (export {MAIL_ENV}=\"$(scripts/mail up)\") to run the email tests"
                );
                None
            }
        }
    }

    /// Reads the `key=value` line `scripts/mail up` prints.
    pub fn parse(s: &str) -> anyhow::Result<MailServer> {
        let mut get = std::collections::HashMap::new();
        for part in s.split_whitespace() {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("{part:?} is not key=value"))?;
            get.insert(k, v);
        }
        let field = |k: &str| {
            get.get(k)
                .map(|v| (*v).to_owned())
                .ok_or_else(|| anyhow!("no {k}= in {s:?}"))
        };
        let port = |k: &str| -> anyhow::Result<u16> {
            field(k)?
                .parse()
                .with_context(|| format!("{k} is not a port"))
        };
        Ok(MailServer {
            host: field("host")?,
            imap: port("imap")?,
            imaps: port("imaps")?,
            smtp: port("smtp")?,
            smtps: port("smtps")?,
            password: field("password")?,
            ca: PathBuf::from(field("ca")?),
        })
    }

    /// A fresh domain for `test`: `<test>-<random>.switchboard.test`.
    pub fn domain(&self, test: &str) -> String {
        let tag: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let rand = uuid::Uuid::now_v7().simple().to_string();
        format!("{tag}-{}.switchboard.test", &rand[rand.len() - 10..])
    }

    /// A plain IMAP session (loopback) as `user`.
    pub async fn imap(&self, user: &str) -> anyhow::Result<Session> {
        let cfg = ImapConfig {
            host: self.host.clone(),
            port: self.imap,
            security: Security::Plain,
            auth: Auth::Plain {
                username: user.to_owned(),
                password: switchboard_core::Secret::new(self.password.clone()),
            },
            mailboxes: vec!["INBOX".into()],
            after: AfterAccept::Seen,
            idle: true,
            idle_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_secs(60),
            fetch_batch: 100,
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            ca_file: None,
        };
        switchboard_email::imap::connect(&cfg, None)
            .await
            .map_err(|e| anyhow!("imap login as {user}: {e}"))
    }

    /// Delivers mails over one SMTP connection (no authentication, from
    /// loopback): each is `(envelope sender, recipients, bytes)`.
    pub async fn send_all(&self, mails: &[(String, Vec<String>, Vec<u8>)]) -> anyhow::Result<()> {
        let tcp = TcpStream::connect((self.host.as_str(), self.smtp))
            .await
            .context("smtp connect")?;
        let (r, mut w) = tcp.into_split();
        let mut r = BufReader::new(r);
        expect(&mut r, 220).await?;
        w.write_all(b"EHLO tests.switchboard.test\r\n").await?;
        expect(&mut r, 250).await?;
        for (from, to, raw) in mails {
            w.write_all(format!("MAIL FROM:<{from}>\r\n").as_bytes())
                .await?;
            expect(&mut r, 250).await?;
            for rcpt in to {
                w.write_all(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
                    .await?;
                expect(&mut r, 250).await?;
            }
            w.write_all(b"DATA\r\n").await?;
            expect(&mut r, 354).await?;
            // Dot-stuffing, CRLF line ends.
            let text = String::from_utf8_lossy(raw).replace("\r\n", "\n");
            let mut body = String::with_capacity(text.len() + 64);
            for line in text.split('\n') {
                if line.starts_with('.') {
                    body.push('.');
                }
                body.push_str(line);
                body.push_str("\r\n");
            }
            body.push_str(".\r\n");
            w.write_all(body.as_bytes()).await?;
            expect(&mut r, 250).await?;
        }
        w.write_all(b"QUIT\r\n").await?;
        expect(&mut r, 221).await?;
        Ok(())
    }

    /// Delivers one mail.
    pub async fn send(&self, from: &str, to: &str, raw: &[u8]) -> anyhow::Result<()> {
        self.send_all(&[(from.to_owned(), vec![to.to_owned()], raw.to_vec())])
            .await
    }

    /// The environment that configures email account `name` of a test
    /// daemon: `address` read over plain IMAP on loopback, IDLE, replies
    /// over plain SMTP without authentication. `extra` keys are relative to
    /// the account (`IMAP__MAILBOXES`, `REPLY_ADDRESS_DOMAIN` …) and win.
    pub fn daemon_env(
        &self,
        name: &str,
        address: &str,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let p = format!(
            "SWITCHBOARD__CHANNELS__EMAIL__ACCOUNTS__{}__",
            name.to_uppercase()
        );
        let mut env: Vec<(String, String)> = vec![
            (format!("{p}ADDRESS"), address.to_owned()),
            (format!("{p}IMAP__HOST"), self.host.clone()),
            (format!("{p}IMAP__PORT"), self.imap.to_string()),
            (format!("{p}IMAP__SECURITY"), "plain".into()),
            (format!("{p}IMAP__PASSWORD"), self.password.clone()),
            (format!("{p}IMAP__RECONNECT_MIN"), "200ms".into()),
            (format!("{p}IMAP__RECONNECT_MAX"), "2s".into()),
            // Only IDLE can bring mail in quickly.
            (format!("{p}IMAP__POLL_INTERVAL"), "10m".into()),
            (format!("{p}SMTP__HOST"), self.host.clone()),
            (format!("{p}SMTP__PORT"), self.smtp.to_string()),
            (format!("{p}SMTP__SECURITY"), "plain".into()),
            (format!("{p}SMTP__AUTH"), "none".into()),
        ];
        for (k, v) in extra {
            let key = format!("{p}{k}");
            env.retain(|(e, _)| *e != key);
            env.push((key, (*v).to_owned()));
        }
        env
    }
}

async fn expect(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    code: u16,
) -> anyhow::Result<()> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            bail!("smtp server closed the connection (expected {code})");
        }
        let got: u16 = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        if got != code {
            bail!("smtp: expected {code}, got {line:?}");
        }
        // "250-" continues, "250 " ends.
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(());
        }
    }
}

/// A plain-text mail.
pub fn mail(
    from: &str,
    to: &str,
    subject: &str,
    message_id: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let mut m = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n\
         Date: Mon, 2 Mar 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n"
    );
    for (k, v) in extra_headers {
        m.push_str(&format!("{k}: {v}\r\n"));
    }
    m.push_str("\r\n");
    m.push_str(body);
    m.push_str("\r\n");
    m.into_bytes()
}

/// One mail as the server holds it.
#[derive(Debug, Clone)]
pub struct ServerMail {
    /// UID.
    pub uid: u32,
    /// The bytes.
    pub raw: Vec<u8>,
    /// Whether `\Seen` is set.
    pub seen: bool,
}

impl ServerMail {
    /// A header's value (first occurrence, unfolded), case-insensitive.
    pub fn header(&self, name: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.raw).replace("\r\n", "\n");
        let head = text
            .split("\n\n")
            .next()?
            .replace("\n ", " ")
            .replace("\n\t", " ");
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// Every mail in `mailbox`, with flags, read without changing any flag
/// (`BODY.PEEK[]`).
pub async fn fetch_all(session: &mut Session, mailbox: &str) -> anyhow::Result<Vec<ServerMail>> {
    let mb = session.select(mailbox).await?;
    if mb.exists == 0 {
        return Ok(Vec::new());
    }
    let fetches: Vec<_> = session
        .uid_fetch("1:*", "(UID FLAGS BODY.PEEK[])")
        .await?
        .try_collect()
        .await?;
    let mut out: Vec<ServerMail> = fetches
        .iter()
        .filter_map(|f| {
            Some(ServerMail {
                uid: f.uid?,
                raw: f.body()?.to_vec(),
                seen: f
                    .flags()
                    .any(|fl| matches!(fl, async_imap::types::Flag::Seen)),
            })
        })
        .collect();
    out.sort_by_key(|m| m.uid);
    Ok(out)
}

/// Polls `mailbox` of `user` until it holds at least `count` mails.
pub async fn wait_mails(
    server: &MailServer,
    user: &str,
    mailbox: &str,
    count: usize,
    deadline: Duration,
) -> anyhow::Result<Vec<ServerMail>> {
    let started = Instant::now();
    loop {
        let mut s = server.imap(user).await?;
        // A mailbox not made yet holds nothing.
        let mails = fetch_all(&mut s, mailbox).await.unwrap_or_default();
        if let Err(e) = s.logout().await {
            eprintln!("logout: {e}");
        }
        if mails.len() >= count {
            return Ok(mails);
        }
        if started.elapsed() > deadline {
            bail!(
                "{user}/{mailbox} held {} mails after {deadline:?}, expected {count}",
                mails.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
