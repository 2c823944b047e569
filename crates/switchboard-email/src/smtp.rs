//! SMTP out: the email channel's [`Outbound`].
//!
//! One `send` is one SMTP transaction through the account's server
//! (implicit TLS, STARTTLS, or plain on loopback; AUTH PLAIN, LOGIN or
//! XOAUTH2). Every mail carries a Message-ID of Switchboard's making,
//! `<{message id}@{message_id_domain}>`, which the dispatcher stores with the
//! message, and, in a conversation, `In-Reply-To` (the customer's latest
//! mail) and `References` (the conversation's Message-IDs), so the
//! customer's client threads it and their answer threads back. With
//! `reply_address_domain` set, `Reply-To: reply+<conversation>@<domain>`
//! threads answers whose client dropped the headers. A 5xx reply fails the
//! message for good; a 4xx reply, a timeout or a broken connection is
//! retried by the dispatcher.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Address, AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use switchboard_core::{
    Channel, Identity, IdentityKind, Outbound, OutboundMessage, SendError, SendReceipt,
};
use uuid::Uuid;

use crate::config::{Auth, EmailAccount, EmailConfig, Security, SmtpConfig};
use crate::parse::our_message_id;

/// One sending account.
struct Sender {
    address: String,
    display_name: Option<String>,
    message_id_domain: String,
    reply_address_domain: Option<String>,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    timeout: Duration,
}

/// The email channel's sending side: one SMTP transport per account.
pub struct SmtpOutbound {
    accounts: HashMap<String, Sender>,
    default_account: Option<String>,
}

impl std::fmt::Debug for SmtpOutbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("SmtpOutbound")
            .field("accounts", &names)
            .field("default_account", &self.default_account)
            .finish()
    }
}

/// Why the SMTP side could not be built.
#[derive(Debug, thiserror::Error)]
#[error("account {account}: {reason}")]
pub struct SmtpSetupError {
    /// The account's name.
    pub account: String,
    /// What is wrong.
    pub reason: String,
}

fn transport(cfg: &SmtpConfig) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    let tls = || -> Result<TlsParameters, String> {
        let mut b = TlsParameters::builder(cfg.host.clone());
        if let Some(path) = &cfg.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            b = b.add_root_certificate(
                Certificate::from_pem(&pem)
                    .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?,
            );
        }
        b.build_rustls().map_err(|e| e.to_string())
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.clone())
        .port(cfg.port)
        .timeout(Some(cfg.timeout))
        .tls(match cfg.security {
            Security::Tls => Tls::Wrapper(tls()?),
            Security::StartTls => Tls::Required(tls()?),
            Security::Plain => Tls::None,
        });
    builder = match &cfg.auth {
        Auth::None => builder,
        Auth::Plain { username, password } => builder
            .credentials(Credentials::new(
                username.clone(),
                password.expose().to_owned(),
            ))
            .authentication(vec![Mechanism::Plain]),
        Auth::Login { username, password } => builder
            .credentials(Credentials::new(
                username.clone(),
                password.expose().to_owned(),
            ))
            .authentication(vec![Mechanism::Login]),
        Auth::XOAuth2 { username, token } => builder
            .credentials(Credentials::new(
                username.clone(),
                token.expose().to_owned(),
            ))
            .authentication(vec![Mechanism::Xoauth2]),
    };
    Ok(builder.build())
}

impl SmtpOutbound {
    /// The sending side of every account with SMTP settings; `None` when
    /// there is none. Call it within a tokio runtime (the connection pools
    /// start tasks).
    pub fn from_config(cfg: &EmailConfig) -> Result<Option<Self>, SmtpSetupError> {
        let mut accounts = HashMap::new();
        for a in &cfg.accounts {
            let Some(smtp) = &a.smtp else { continue };
            accounts.insert(a.address.clone(), Self::sender(a, smtp)?);
        }
        if accounts.is_empty() {
            return Ok(None);
        }
        let default_account = cfg
            .default_account
            .clone()
            .filter(|d| accounts.contains_key(d));
        Ok(Some(SmtpOutbound {
            accounts,
            default_account,
        }))
    }

    fn sender(a: &EmailAccount, smtp: &SmtpConfig) -> Result<Sender, SmtpSetupError> {
        Ok(Sender {
            address: a.address.clone(),
            display_name: a.display_name.clone(),
            message_id_domain: a.message_id_domain.clone(),
            reply_address_domain: a.reply_address_domain.clone(),
            transport: transport(smtp).map_err(|reason| SmtpSetupError {
                account: a.name.clone(),
                reason,
            })?,
            timeout: smtp.timeout,
        })
    }

    fn account(&self, account: &str) -> Result<&Sender, SendError> {
        self.accounts
            .get(&account.trim().to_lowercase())
            .ok_or_else(|| SendError::NotConfigured(format!("no smtp account {account:?}")))
    }
}

fn angle(id: &str) -> String {
    format!(
        "<{}>",
        id.trim().trim_start_matches('<').trim_end_matches('>')
    )
}

fn rejected(reason: impl Into<String>) -> SendError {
    SendError::Rejected {
        status: 0,
        code: None,
        reason: reason.into(),
    }
}

/// The mail for `msg` from `sender`.
fn build_message(sender: &Sender, msg: &OutboundMessage) -> Result<Message, SendError> {
    if msg.to.kind != IdentityKind::Email {
        return Err(rejected(format!(
            "cannot send email to a {} identity",
            msg.to.kind
        )));
    }
    if !msg.attachments.is_empty() {
        return Err(rejected("the email channel does not send attachments yet"));
    }
    if msg.template.is_some() {
        return Err(rejected("email takes no templates; send text"));
    }
    let from_addr: Address = sender
        .address
        .parse()
        .map_err(|e| SendError::NotConfigured(format!("bad sender address: {e}")))?;
    let to_addr: Address = msg
        .to
        .value
        .parse()
        .map_err(|e| rejected(format!("bad recipient address {:?}: {e}", msg.to.value)))?;
    let mut b = Message::builder()
        .from(Mailbox::new(sender.display_name.clone(), from_addr))
        .to(Mailbox::new(None, to_addr))
        .message_id(Some(our_message_id(
            msg.message_id,
            &sender.message_id_domain,
        )))
        .date_now();
    if let Some(subject) = &msg.subject {
        b = b.subject(subject.clone());
    }
    if let Some(parent) = &msg.thread.in_reply_to {
        b = b.in_reply_to(angle(parent));
    }
    if !msg.thread.references.is_empty() {
        let refs: Vec<String> = msg.thread.references.iter().map(|r| angle(r)).collect();
        b = b.references(refs.join(" "));
    }
    if let Some(domain) = &sender.reply_address_domain {
        let reply: Address = format!("reply+{}@{domain}", msg.conversation_id)
            .parse()
            .map_err(|e| SendError::NotConfigured(format!("bad reply address: {e}")))?;
        b = b.reply_to(Mailbox::new(sender.display_name.clone(), reply));
    }
    b.header(ContentType::TEXT_PLAIN)
        .body(msg.text.clone())
        .map_err(|e| rejected(format!("cannot build the mail: {e}")))
}

/// What an SMTP failure means for a retry.
fn classify(e: &lettre::transport::smtp::Error, timeout: Duration) -> SendError {
    if e.is_timeout() {
        return SendError::Timeout(timeout);
    }
    if let Some(code) = e.status() {
        let status = u16::from(code);
        let reason = e.to_string();
        return if e.is_permanent() {
            SendError::Rejected {
                status,
                code: Some(status.to_string()),
                reason,
            }
        } else {
            SendError::Provider { status, reason }
        };
    }
    if e.is_client() {
        return rejected(e.to_string());
    }
    SendError::Connect(e.to_string())
}

#[async_trait]
impl Outbound for SmtpOutbound {
    fn channel(&self) -> Channel {
        Channel::Email
    }

    fn idempotent(&self) -> bool {
        false
    }

    fn provider(&self, _account: &str) -> &'static str {
        "smtp"
    }

    fn sender(&self, account: &str) -> Result<Identity, SendError> {
        let s = self.account(account)?;
        Identity::new(IdentityKind::Email, &s.address)
            .map_err(|e| SendError::NotConfigured(e.to_string()))
    }

    fn default_account(&self) -> Option<String> {
        self.default_account.clone()
    }

    fn wire_message_id(&self, account: &str, message_id: Uuid) -> Option<String> {
        let s = self.account(account).ok()?;
        Some(
            our_message_id(message_id, &s.message_id_domain)
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned(),
        )
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        let sender = self.account(&msg.account)?;
        let mail = build_message(sender, msg)?;
        let started = std::time::Instant::now();
        // The transport's own timeout covers each step; this bounds the
        // whole transaction.
        let res = tokio::time::timeout(sender.timeout * 2, sender.transport.send(mail)).await;
        match res {
            Err(_) => Err(SendError::Timeout(sender.timeout * 2)),
            Ok(Err(e)) => Err(classify(&e, sender.timeout)),
            Ok(Ok(response)) => {
                tracing::debug!(
                    message_id = %msg.message_id, account = %sender.address,
                    code = %response.code(), elapsed_ms = started.elapsed().as_millis() as u64,
                    "smtp accepted the mail"
                );
                Ok(SendReceipt {
                    provider_message_id: self.wire_message_id(&msg.account, msg.message_id),
                    ..SendReceipt::default()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_core::ThreadRefs;

    use super::*;

    fn sender(reply: Option<&str>) -> Sender {
        Sender {
            address: "support@example.com".into(),
            display_name: Some("Example Support".into()),
            message_id_domain: "mail.example.com".into(),
            reply_address_domain: reply.map(str::to_owned),
            transport: AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
                .tls(Tls::None)
                .build(),
            timeout: Duration::from_secs(5),
        }
    }

    fn message() -> OutboundMessage {
        OutboundMessage {
            message_id: Uuid::parse_str("0190f0c2-4b6e-7a3d-8c1e-2f3a4b5c6d7e").unwrap(),
            idempotency_key: "k1".into(),
            conversation_id: Uuid::parse_str("0190f0c2-0000-7000-8000-000000000001").unwrap(),
            customer_id: Uuid::now_v7(),
            channel: Channel::Email,
            account: "Support@Example.com".into(),
            from: Identity::new(IdentityKind::Email, "support@example.com").unwrap(),
            to: Identity::new(IdentityKind::Email, "ada@example.org").unwrap(),
            subject: Some("Re: Where is my parcel?".into()),
            text: "It ships today.".into(),
            attachments: vec![],
            template: None,
            attempt: 1,
            thread: ThreadRefs {
                in_reply_to: Some("m2@example.org".into()),
                references: vec!["m1@example.org".into(), "m2@example.org".into()],
                provider_thread_id: None,
            },
        }
    }

    fn header<'a>(mail: &'a str, name: &str) -> Option<&'a str> {
        mail.split("\r\n\r\n")
            .next()?
            .split("\r\n")
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
    }

    #[tokio::test]
    async fn a_reply_names_its_thread_and_our_message_id() {
        let mail = build_message(&sender(None), &message()).unwrap();
        let text = String::from_utf8(mail.formatted()).unwrap();
        assert_eq!(
            header(&text, "Message-ID"),
            Some("<0190f0c2-4b6e-7a3d-8c1e-2f3a4b5c6d7e@mail.example.com>")
        );
        assert_eq!(header(&text, "In-Reply-To"), Some("<m2@example.org>"));
        assert_eq!(
            header(&text, "References"),
            Some("<m1@example.org> <m2@example.org>")
        );
        assert_eq!(header(&text, "To"), Some("ada@example.org"));
        assert_eq!(
            header(&text, "From"),
            Some("\"Example Support\" <support@example.com>")
        );
        assert_eq!(header(&text, "Reply-To"), None);
        assert!(text.ends_with("It ships today."), "{text}");
    }

    #[tokio::test]
    async fn reply_addressing_names_the_conversation() {
        let mail = build_message(&sender(Some("example.com")), &message()).unwrap();
        let text = String::from_utf8(mail.formatted()).unwrap();
        assert_eq!(
            header(&text, "Reply-To"),
            Some("\"Example Support\" <reply+0190f0c2-0000-7000-8000-000000000001@example.com>")
        );
    }

    #[tokio::test]
    async fn what_email_cannot_carry_fails_for_good() {
        let mut m = message();
        m.to = Identity::new(IdentityKind::Phone, "+14155550100").unwrap();
        let e = build_message(&sender(None), &m).unwrap_err();
        assert!(matches!(e, SendError::Rejected { .. }), "{e}");
        let mut m = message();
        m.attachments.push(switchboard_core::Attachment {
            name: None,
            content_type: "image/png".into(),
            size: 1,
            url: None,
            storage_ref: None,
            sha256: None,
        });
        let e = build_message(&sender(None), &m).unwrap_err();
        assert!(!switchboard_core::Retryable::retryable(&e));
    }

    #[tokio::test]
    async fn the_wire_id_is_the_stored_form_of_the_message_id() {
        let out = SmtpOutbound {
            accounts: HashMap::from([("support@example.com".to_owned(), sender(None))]),
            default_account: None,
        };
        let m = message();
        assert_eq!(
            out.wire_message_id("SUPPORT@example.com", m.message_id)
                .as_deref(),
            Some("0190f0c2-4b6e-7a3d-8c1e-2f3a4b5c6d7e@mail.example.com")
        );
        assert_eq!(out.wire_message_id("other@example.com", m.message_id), None);
        assert!(matches!(
            out.sender("nobody@example.com"),
            Err(SendError::NotConfigured(_))
        ));
    }
}
