//! Mail parsing: raw RFC 5322 bytes into an [`Envelope`], with mail-parser
//! doing the MIME work.
//!
//! Contract: [`parse`] never panics and never refuses mail. Whatever the
//! bytes, it returns an envelope whose original is in the attachment store;
//! mail it cannot read lands as that original with
//! `provider_raw.parse_error` set, so one bad message never blocks a
//! mailbox. It fails only when the attachment store cannot be written
//! ([`StoreError`], worth a retry), and then the caller must leave the mail
//! unacknowledged. The same bytes always give the same idempotency key.
//!
//! - Text: `text/plain` is preferred in `multipart/alternative`; HTML is
//!   reduced to text when it is all there is, and every HTML body is also kept
//!   as a `text/html` attachment. Encoded words (RFC 2047) and body charsets
//!   are decoded to UTF-8.
//! - Attachments are stored by SHA-256 ([`AttachmentStore`]); one over the
//!   store's size limit is listed with its size and hash but no
//!   `storage_ref`: its bytes were not kept (they remain in the original).
//! - Thread hints: Message-ID, In-Reply-To, References, and a provider
//!   thread id: `gmail:<X-GM-THRID>` when the IMAP server gave one, else
//!   `outlook:<conversation GUID>` from `Thread-Index`.
//! - Auto-replies and bounces are flagged in [`Parsed::automated`] and on
//!   the envelope (`automated`); nothing may answer them automatically. A delivery status notification naming one
//!   of our messages (see [`our_message_id`]) also yields a `message.status`
//!   command with status `failed`.

mod dsn;
mod html;
mod store;

use std::borrow::Cow;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::{
    Address, Encoding, HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType,
};
use serde::Serialize;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::records::CommandSchema;
use switchboard_core::{
    Attachment, Channel, Command, CommandKind, DeliveryError, DeliveryState, Direction, Envelope,
    Identity, IdentityKind, ProviderRaw, Received, ThreadHints, Trace,
};
use uuid::Uuid;

pub use store::{AttachmentStore, StoreError, Stored};

/// The envelope's `provider` for mail read from a mailbox.
pub const PROVIDER: &str = "imap";

/// The sender recorded when a mail names no usable address. `.invalid` is
/// reserved (RFC 2606), so it can never be a real customer's address.
pub const UNKNOWN_SENDER: &str = "unknown-sender@invalid";

/// The default limit on an envelope's `text`, in bytes (the full body stays
/// in the original).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 256 * 1024;

/// The longest subject carried in the envelope, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 4096;

/// Namespace of the UUIDv5 ids of the `message.status` commands made from
/// bounces, so a bounce fetched twice names the same command.
const STATUS_NAMESPACE: Uuid = Uuid::from_u128(0x5b1c_2f4e_8a3d_4c6b_9e0f_7a1d_2c3b_4e5f);

/// The Message-ID Switchboard gives an outbound mail, in header form:
/// `<{message_id}@{domain}>`. Strip the angle brackets where ids are kept
/// without them (thread hints).
pub fn our_message_id(message_id: Uuid, domain: &str) -> String {
    format!("<{}@{}>", message_id.hyphenated(), domain.trim())
}

/// Switchboard's message id inside one of our Message-IDs (with or without
/// angle brackets), or `None` when `id` is not ours: another domain, or a
/// left part that is not a UUID. The domain compares case-insensitively.
pub fn parse_our_message_id(id: &str, domain: &str) -> Option<Uuid> {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    let (left, right) = id.rsplit_once('@')?;
    if domain.trim().is_empty() || !right.eq_ignore_ascii_case(domain.trim()) {
        return None;
    }
    // Only the hyphenated form we write: 36 characters.
    (left.len() == 36)
        .then(|| Uuid::try_parse(left).ok())
        .flatten()
}

/// What the parser needs to know about the mailbox: fixed per account.
#[derive(Debug)]
pub struct ParseContext {
    /// Our side of the channel, the envelope's `account` (the mailbox
    /// address). Must not be empty.
    pub account: String,
    /// Our own addresses (the account's and its aliases), lowercased. The
    /// envelope's `to` is the first of them the mail names.
    pub addresses: Vec<String>,
    /// The domain of the Message-IDs we generate ([`our_message_id`]).
    pub message_id_domain: String,
    /// Where attachments and originals are kept.
    pub store: AttachmentStore,
    /// Longest `text` carried in the envelope, in bytes.
    pub max_text_bytes: usize,
}

impl ParseContext {
    /// A context for `account`, whose address is also its only address.
    pub fn new(
        account: impl Into<String>,
        message_id_domain: impl Into<String>,
        store: AttachmentStore,
    ) -> Self {
        let account = account.into();
        ParseContext {
            addresses: vec![account.trim().to_lowercase()],
            account,
            message_id_domain: message_id_domain.into(),
            store,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
        }
    }

    /// Adds addresses (aliases) that are ours too.
    pub fn with_addresses<S: AsRef<str>>(mut self, addresses: impl IntoIterator<Item = S>) -> Self {
        for a in addresses {
            let a = a.as_ref().trim().to_lowercase();
            if !a.is_empty() && !self.addresses.contains(&a) {
                self.addresses.push(a);
            }
        }
        self
    }
}

/// What the IMAP server said about one mail besides its bytes.
#[derive(Debug, Clone, Default)]
pub struct ServerExtras {
    /// Gmail's `X-GM-THRID`, fetched when the server offers `X-GM-EXT-1`.
    pub gmail_thread_id: Option<u64>,
    /// The envelope's `trace.request_id` (e.g. `imap:INBOX:<uidvalidity>:<uid>`).
    pub request_id: Option<String>,
    /// Our time of receipt; now when absent.
    pub received_at: Option<DateTime<Utc>>,
}

/// Why a mail counts as sent by a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Automated {
    /// An auto-reply or other machine-generated or bulk mail
    /// (`Auto-Submitted`, `X-Auto-Response-Suppress`, `Precedence`, a null
    /// `Return-Path`, a disposition notification).
    AutoReply,
    /// A bounce: a delivery status notification (`multipart/report`) or a
    /// mailer daemon's message.
    Bounce,
}

/// A mail sent by a machine: stored and threaded like any other, but never
/// to be answered automatically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AutomatedFlag {
    /// Which kind.
    pub kind: Automated,
    /// The header or structure that decided it (`auto-submitted: auto-replied`).
    pub reason: String,
}

/// The outcome of [`parse`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parsed {
    /// The message, always.
    pub envelope: Envelope,
    /// Set when a machine sent the mail.
    pub automated: Option<AutomatedFlag>,
    /// A `message.status` command (`failed`) when the mail is a delivery
    /// status notification for one of our messages.
    pub status: Option<Command>,
    /// Why the mail could not be read (also in
    /// `envelope.provider_raw.parse_error`).
    pub parse_error: Option<String>,
    /// What was lost or repaired on the way (an attachment over the limit,
    /// text cut short, an undecodable charset), for the logs.
    pub warnings: Vec<String>,
}

impl Parsed {
    /// Whether an automatic answer (an acknowledgement, a bot) may be sent
    /// to this mail: never to a machine, never to mail that could not be
    /// read.
    pub fn may_auto_answer(&self) -> bool {
        self.automated.is_none() && self.parse_error.is_none()
    }

    /// The records to hand to [`switchboard_core::Intake::accept`]: the
    /// envelope, then the status command if there is one.
    pub fn into_records(self) -> Vec<Received> {
        let mut out = vec![Received::from(self.envelope)];
        if let Some(cmd) = self.status {
            out.push(Received::from(cmd));
        }
        out
    }
}

/// Parses one mail. See the module documentation for the contract.
pub fn parse(raw: &[u8], ctx: &ParseContext, extras: &ServerExtras) -> Result<Parsed, StoreError> {
    let received_at = extras.received_at.unwrap_or_else(Utc::now);
    let original = ctx.store.put(raw)?;
    let provider_raw = ProviderRaw {
        content_type: "message/rfc822".to_owned(),
        body: None,
        encoding: None,
        storage_ref: Some(original.storage_ref.clone()),
        parse_error: None,
    };
    // mail-parser panics on some malformed structures (the fuzz target found
    // "Invalid part ID, could not find multipart"): such mail lands unparsed
    // with the reason, like any other mail that cannot be read, and never
    // stops the mailbox.
    let message = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        MessageParser::default().parse(raw)
    }));
    let message = match message {
        Ok(message) => message,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".to_owned());
            return Ok(unparsed(
                ctx,
                extras,
                received_at,
                &original,
                provider_raw,
                &format!("the mail parser failed on this mail: {why}"),
            ));
        }
    };
    let message = match message {
        Some(m) if looks_like_mail(&m) => m,
        _ => {
            let error = if raw.is_empty() {
                "empty message"
            } else {
                "no rfc 5322 header fields found"
            };
            return Ok(unparsed(
                ctx,
                extras,
                received_at,
                &original,
                provider_raw,
                error,
            ));
        }
    };
    Normalizer {
        ctx,
        extras,
        received_at,
        message: &message,
        warnings: Vec::new(),
    }
    .run(&original, provider_raw)
}

/// Mail with no recognizable header field at all is not mail.
fn looks_like_mail(m: &Message<'_>) -> bool {
    const KNOWN: [&str; 12] = [
        "from",
        "sender",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "content-type",
        "mime-version",
        "received",
        "return-path",
        "in-reply-to",
    ];
    m.headers()
        .iter()
        .any(|h| KNOWN.iter().any(|k| h.name().eq_ignore_ascii_case(k)))
}

/// The longest Message-ID used as a key; a longer one is junk, and the
/// mail is keyed by its hash instead.
const MAX_KEY_ID_BYTES: usize = 512;

/// The key for a mail: its Message-ID, else the hash of its bytes.
fn idempotency_key(account: &str, message_id: Option<&str>, sha256: &str) -> String {
    match message_id.filter(|id| id.len() <= MAX_KEY_ID_BYTES) {
        Some(id) => format!("email:{account}:{id}"),
        None => format!("email:{account}:sha256:{sha256}"),
    }
}

fn email(value: &str) -> Option<Identity> {
    Identity::new(IdentityKind::Email, value).ok()
}

fn unknown_sender() -> Identity {
    Identity {
        kind: IdentityKind::Email,
        value: UNKNOWN_SENDER.to_owned(),
    }
}

/// Our identity for the `to` side when the mail names none of our addresses.
fn our_default_identity(ctx: &ParseContext) -> Identity {
    ctx.addresses
        .iter()
        .find_map(|a| email(a))
        .or_else(|| email(&ctx.account))
        .unwrap_or_else(|| Identity {
            kind: IdentityKind::Email,
            value: "unknown-recipient@invalid".to_owned(),
        })
}

fn base_envelope(
    ctx: &ParseContext,
    extras: &ServerExtras,
    received_at: DateTime<Utc>,
    key: String,
    from: Identity,
    to: Identity,
) -> Envelope {
    Envelope {
        schema: EnvelopeSchema::V1,
        id: Uuid::now_v7(),
        idempotency_key: key,
        channel: Channel::Email,
        provider: PROVIDER.to_owned(),
        account: ctx.account.clone(),
        direction: Direction::Inbound,
        from,
        to,
        sent_at: None,
        received_at,
        subject: None,
        text: String::new(),
        attachments: Vec::new(),
        thread_hints: ThreadHints::default(),
        provider_raw: None,
        trace: Trace {
            request_id: extras.request_id.clone(),
            correlation_id: None,
        },
        automated: None,
        change: None,
    }
}

fn unparsed(
    ctx: &ParseContext,
    extras: &ServerExtras,
    received_at: DateTime<Utc>,
    original: &Stored,
    mut provider_raw: ProviderRaw,
    error: &str,
) -> Parsed {
    provider_raw.parse_error = Some(error.to_owned());
    let key = idempotency_key(&ctx.account, None, &original.sha256);
    let mut envelope = base_envelope(
        ctx,
        extras,
        received_at,
        key,
        unknown_sender(),
        our_default_identity(ctx),
    );
    envelope.provider_raw = Some(provider_raw);
    Parsed {
        envelope,
        automated: None,
        status: None,
        parse_error: Some(error.to_owned()),
        warnings: Vec::new(),
    }
}

struct Normalizer<'a, 'x> {
    ctx: &'a ParseContext,
    extras: &'a ServerExtras,
    received_at: DateTime<Utc>,
    message: &'a Message<'x>,
    warnings: Vec<String>,
}

impl Normalizer<'_, '_> {
    fn run(mut self, original: &Stored, provider_raw: ProviderRaw) -> Result<Parsed, StoreError> {
        let m = self.message;
        let mut hints = ThreadHints {
            message_id: m.message_id().map(str::to_owned),
            in_reply_to: ids(m.in_reply_to()),
            references: ids(m.references()),
            provider_thread_id: self.provider_thread_id(),
        };
        hints.normalize();
        let key = idempotency_key(
            &self.ctx.account,
            hints.message_id.as_deref(),
            &original.sha256,
        );
        let from = self.sender();
        let to = self.recipient();
        let mut envelope = base_envelope(self.ctx, self.extras, self.received_at, key, from, to);
        envelope.sent_at = m
            .date()
            .filter(|d| d.is_valid())
            .and_then(|d| DateTime::from_timestamp(d.to_timestamp(), 0));
        envelope.subject = self.subject();
        envelope.text = self.text();
        envelope.attachments = self.attachments()?;
        envelope.thread_hints = hints;
        envelope.provider_raw = Some(provider_raw);

        let report = self.delivery_report();
        let automated = self.automated(report.is_some());
        // On the envelope too, so every reader of the stream and the history
        // knows not to answer it automatically.
        envelope.automated = automated.as_ref().map(|a| switchboard_core::Automated {
            kind: match a.kind {
                Automated::AutoReply => switchboard_core::AutomatedKind::AutoReply,
                Automated::Bounce => switchboard_core::AutomatedKind::Bounce,
            },
            reason: a.reason.clone(),
        });
        let status = report.and_then(|r| self.status_command(&envelope, &r));
        if m.parts.iter().any(|p| p.is_encoding_problem) {
            self.warnings
                .push("a part could not be decoded as declared and was read leniently".into());
        }
        Ok(Parsed {
            envelope,
            automated,
            status,
            parse_error: None,
            warnings: self.warnings,
        })
    }

    /// The first usable address of From, Sender, Reply-To, Return-Path.
    fn sender(&mut self) -> Identity {
        let m = self.message;
        let found = [m.from(), m.sender(), m.reply_to()]
            .into_iter()
            .flatten()
            .find_map(first_email)
            .or_else(|| m.return_address().and_then(email));
        found.unwrap_or_else(|| {
            self.warnings.push(format!(
                "no usable sender address; recorded as {UNKNOWN_SENDER}"
            ));
            unknown_sender()
        })
    }

    /// The first of our addresses the mail names (To, Cc, Delivered-To,
    /// X-Original-To), else our main address.
    fn recipient(&self) -> Identity {
        let m = self.message;
        let named = [m.to(), m.cc()]
            .into_iter()
            .flatten()
            .flat_map(|a| a.iter())
            .filter_map(|a| a.address().and_then(email))
            .chain(
                ["Delivered-To", "X-Original-To"]
                    .into_iter()
                    .flat_map(|h| header_texts(m, h))
                    .filter_map(email),
            )
            .find(|id| self.ctx.addresses.contains(&id.value));
        named.unwrap_or_else(|| our_default_identity(self.ctx))
    }

    fn provider_thread_id(&self) -> Option<String> {
        if let Some(thrid) = self.extras.gmail_thread_id {
            return Some(format!("gmail:{thrid}"));
        }
        let index = header_text(self.message, "Thread-Index")?;
        let compact: String = index.split_whitespace().collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .ok()?;
        // A 22-byte header: one reserved byte, a 5-byte FILETIME, and the
        // conversation's 16-byte GUID, which every reply repeats.
        (bytes.len() >= 22).then(|| format!("outlook:{}", hex::encode(&bytes[6..22])))
    }

    /// The decoded subject, cut to [`MAX_SUBJECT_BYTES`].
    fn subject(&mut self) -> Option<String> {
        let subject = self.message.subject()?.trim();
        if subject.len() <= MAX_SUBJECT_BYTES {
            return (!subject.is_empty()).then(|| subject.to_owned());
        }
        self.warnings.push(format!(
            "subject of {} bytes cut to {MAX_SUBJECT_BYTES}",
            subject.len()
        ));
        Some(cut(subject, MAX_SUBJECT_BYTES).to_owned())
    }

    /// Text bodies in order, HTML reduced to text; the HTML when the text
    /// parts are empty.
    fn text(&mut self) -> String {
        let m = self.message;
        let mut text = self.join_bodies(&m.text_body);
        if text.trim().is_empty() {
            text = self.join_bodies(&m.html_body);
        }
        if text.trim().is_empty() {
            // A multipart whose boundary never appears is read as one text
            // part: show it as it came rather than nothing.
            let broken = m.parts.iter().find_map(|p| match &p.body {
                PartType::Text(t)
                    if p.content_type()
                        .is_some_and(|ct| ct.ctype().eq_ignore_ascii_case("multipart")) =>
                {
                    Some(t)
                }
                _ => None,
            });
            if let Some(body) = broken {
                self.warnings
                    .push("multipart boundary not found; the body is shown as it came".into());
                text = body.to_string();
            }
        }
        let mut text = normalize_newlines(&text);
        text.truncate(text.trim_end().len());
        let max = self.ctx.max_text_bytes;
        if text.len() > max {
            let kept = cut(&text, max).len();
            self.warnings.push(format!(
                "text of {} bytes cut to {kept}; the original has it whole",
                text.len()
            ));
            text.truncate(kept);
            text.push_str("\n[text cut short; the original mail has the rest]");
        }
        text
    }

    /// The body parts `ids` as text, one blank line between parts.
    fn join_bodies(&mut self, ids: &[u32]) -> String {
        let m = self.message;
        let mut out = String::new();
        for &id in ids {
            let Some(part) = m.parts.get(id as usize) else {
                continue;
            };
            let text = match &part.body {
                PartType::Text(t) => self.repair_charset(part, t),
                PartType::Html(h) => Cow::Owned(html::html_to_text(&self.repair_charset(part, h))),
                _ => continue,
            };
            let text = text.trim_end();
            if text.trim().is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(text);
        }
        out
    }

    /// Rereads a text part whose declared charset is a lie: UTF-8 (or
    /// ASCII) declared but the bytes are not UTF-8 (read as windows-1252,
    /// the usual truth), or a Latin charset declared on valid UTF-8 with
    /// non-ASCII characters (read as UTF-8).
    fn repair_charset<'p>(&mut self, part: &MessagePart<'_>, decoded: &'p str) -> Cow<'p, str> {
        let declared = part
            .content_type()
            .and_then(|ct| ct.attribute("charset"))
            .unwrap_or("us-ascii")
            .trim()
            .to_ascii_lowercase();
        let claims_utf8 = matches!(declared.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii");
        let claims_latin = matches!(
            declared.as_str(),
            "iso-8859-1" | "latin1" | "iso-8859-15" | "windows-1252" | "cp1252"
        );
        let suspicious = (claims_utf8 && decoded.contains('\u{FFFD}'))
            || (claims_latin && decoded.contains(['Ã', 'Â']));
        if !suspicious {
            return Cow::Borrowed(decoded);
        }
        let Some(bytes) = self.part_bytes(part) else {
            return Cow::Borrowed(decoded);
        };
        match (std::str::from_utf8(&bytes), claims_utf8) {
            (Err(_), true) => match charset_decoder(b"windows-1252") {
                Some(decode) => {
                    self.warnings.push(format!(
                        "a part declared {declared} is not; read as windows-1252"
                    ));
                    Cow::Owned(decode(&bytes))
                }
                None => Cow::Borrowed(decoded),
            },
            (Ok(utf8), false) if !utf8.is_ascii() => {
                self.warnings
                    .push(format!("a part declared {declared} is UTF-8; read as such"));
                Cow::Owned(utf8.to_owned())
            }
            _ => Cow::Borrowed(decoded),
        }
    }

    /// A part's body bytes with the transfer encoding undone, the charset not.
    fn part_bytes(&self, part: &MessagePart<'_>) -> Option<Vec<u8>> {
        let raw = self
            .message
            .raw_message
            .get(part.offset_body as usize..part.offset_end as usize)?;
        match part.encoding {
            Encoding::QuotedPrintable => quoted_printable_decode(raw),
            Encoding::Base64 => base64_decode(raw),
            Encoding::None => Some(raw.to_vec()),
        }
    }

    fn attachments(&mut self) -> Result<Vec<Attachment>, StoreError> {
        let m = self.message;
        let mut ids: Vec<u32> = Vec::new();
        let mut seen = vec![false; m.parts.len()];
        // HTML bodies first, in body order, then the attachments proper.
        let html = m.text_body.iter().chain(&m.html_body).filter(|&&id| {
            matches!(
                m.parts.get(id as usize).map(|p| &p.body),
                Some(PartType::Html(_))
            )
        });
        for &id in html.chain(&m.attachments) {
            if let Some(seen) = seen.get_mut(id as usize)
                && !*seen
            {
                *seen = true;
                ids.push(id);
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(part) = m.parts.get(id as usize) else {
                continue;
            };
            if let Some(att) = self.attachment(part)? {
                out.push(att);
            }
        }
        Ok(out)
    }

    fn attachment(&mut self, part: &MessagePart<'_>) -> Result<Option<Attachment>, StoreError> {
        let bytes = match &part.body {
            PartType::Multipart(_) => return Ok(None),
            _ => part.contents(),
        };
        let content_type = content_type_of(part);
        let name = part
            .attachment_name()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        let size = bytes.len() as u64;
        let max = self.ctx.store.max_size();
        let (stored, storage_ref) = if size > max {
            self.warnings.push(format!(
                "attachment {} ({content_type}, {size} bytes) is over the {max}-byte limit and was not kept",
                name.as_deref().unwrap_or("without a name")
            ));
            (AttachmentStore::address(bytes), None)
        } else {
            let stored = self.ctx.store.put(bytes)?;
            let r = stored.storage_ref.clone();
            (stored, Some(r))
        };
        Ok(Some(Attachment {
            name,
            content_type,
            size,
            url: None,
            storage_ref,
            sha256: Some(stored.sha256),
        }))
    }

    /// The delivery status of a `multipart/report; report-type=delivery-status`.
    fn delivery_report(&self) -> Option<Report> {
        let m = self.message;
        let root = m.content_type()?;
        if !(root.ctype().eq_ignore_ascii_case("multipart")
            && root
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report")))
        {
            return None;
        }
        let is_dsn = root
            .attributes()
            .into_iter()
            .flatten()
            .find(|a| a.name.eq_ignore_ascii_case("report-type"))
            .is_none_or(|a| a.value.to_ascii_lowercase().contains("delivery-status"));
        if !is_dsn {
            return None;
        }
        let mut report = Report::default();
        for part in &m.parts {
            let Some(ct) = part.content_type() else {
                continue;
            };
            let sub = ct.subtype().unwrap_or_default().to_ascii_lowercase();
            match (ct.ctype().to_ascii_lowercase().as_str(), sub.as_str()) {
                ("message", "delivery-status" | "global-delivery-status") => {
                    let body = String::from_utf8_lossy(part.contents());
                    report.status = dsn::parse_delivery_status(&body);
                }
                ("message", "rfc822" | "global") => {
                    if let Some(id) = part.message().and_then(|r| r.message_id()) {
                        report.returned_message_id = Some(id.to_owned());
                    }
                }
                ("text", "rfc822-headers") | ("message", "rfc822-headers") => {
                    let headers = MessageParser::default().parse_headers(part.contents());
                    if let Some(id) = headers.as_ref().and_then(|h| h.message_id()) {
                        report.returned_message_id = Some(id.to_owned());
                    }
                }
                _ => {}
            }
        }
        Some(report)
    }

    fn automated(&self, is_dsn: bool) -> Option<AutomatedFlag> {
        let m = self.message;
        let flag = |kind, reason: String| Some(AutomatedFlag { kind, reason });
        if is_dsn {
            return flag(Automated::Bounce, "multipart/report delivery status".into());
        }
        let from_local = m
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .and_then(|a| a.rsplit_once('@'))
            .map(|(local, _)| local.to_ascii_lowercase());
        if let Some(local) = from_local
            && (local == "mailer-daemon" || local == "postmaster")
        {
            return flag(Automated::Bounce, format!("from: {local}"));
        }
        if let Some(v) = header_text(m, "Auto-Submitted") {
            let v = v.trim().to_ascii_lowercase();
            if !v.is_empty() && !v.starts_with("no") {
                return flag(Automated::AutoReply, format!("auto-submitted: {v}"));
            }
        }
        if let Some(v) = header_text(m, "X-Auto-Response-Suppress") {
            return flag(
                Automated::AutoReply,
                format!("x-auto-response-suppress: {}", v.trim()),
            );
        }
        if let Some(v) = header_text(m, "Precedence") {
            let v = v.trim().to_ascii_lowercase();
            if ["bulk", "junk", "list", "auto_reply"].contains(&v.as_str()) {
                return flag(Automated::AutoReply, format!("precedence: {v}"));
            }
        }
        for h in ["X-Autoreply", "X-Autorespond", "X-Autoresponder"] {
            if header_text(m, h).is_some() {
                return flag(Automated::AutoReply, h.to_ascii_lowercase());
            }
        }
        if let Some(ct) = m.content_type()
            && ct.ctype().eq_ignore_ascii_case("multipart")
            && ct
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        {
            return flag(Automated::AutoReply, "multipart/report".into());
        }
        if header_text(m, "Return-Path").is_some_and(|v| v.trim() == "<>") {
            return flag(Automated::AutoReply, "return-path: <>".into());
        }
        None
    }

    /// A `message.status` (`failed`) command when the report names one of
    /// our messages and a recipient failed.
    fn status_command(&mut self, env: &Envelope, report: &Report) -> Option<Command> {
        let domain = &self.ctx.message_id_domain;
        let m = self.message;
        let candidates = report
            .returned_message_id
            .iter()
            .chain(&report.status.original_envelope_id)
            .cloned()
            .chain(header_texts(m, "Original-Message-ID").map(str::to_owned))
            .chain(env.thread_hints.in_reply_to.iter().cloned())
            .chain(env.thread_hints.references.iter().rev().cloned());
        let mut ours = None;
        for c in candidates {
            if let Some(id) = parse_our_message_id(&c, domain) {
                ours = Some((id, c));
                break;
            }
        }
        let Some((message_id, wire_id)) = ours else {
            self.warnings
                .push("delivery report names none of our messages".into());
            return None;
        };
        let Some(failure) = report.status.first_failure() else {
            self.warnings.push(format!(
                "delivery report for message {message_id} reports no failure"
            ));
            return None;
        };
        let status = failure.status.clone();
        let detail = failure
            .diagnostic
            .clone()
            .or_else(|| status.as_ref().map(|s| format!("status {s}")))
            .unwrap_or_else(|| "delivery failed".to_owned());
        let reason = match &failure.final_recipient {
            Some(rcpt) => format!("bounced for {rcpt}: {detail}"),
            None => format!("bounced: {detail}"),
        };
        // A temporary status (4.x.x) on a failure means the remote gave up
        // waiting; sending again later may work. 5.x.x will not.
        let retryable = status.as_deref().is_some_and(|s| s.starts_with('4'));
        Some(Command {
            schema: CommandSchema::V1,
            id: Uuid::new_v5(
                &STATUS_NAMESPACE,
                format!("{}#status", env.idempotency_key).as_bytes(),
            ),
            at: env.sent_at.unwrap_or(env.received_at),
            kind: CommandKind::MessageStatus {
                message_id,
                status: DeliveryState::Failed,
                provider_message_id: Some(
                    wire_id
                        .trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned(),
                ),
                error: Some(DeliveryError {
                    reason,
                    code: status,
                    retryable,
                }),
            },
        })
    }
}

#[derive(Debug, Default)]
struct Report {
    status: dsn::DeliveryStatus,
    returned_message_id: Option<String>,
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `type/subtype`, lowercased; a sensible default by body kind.
fn content_type_of(part: &MessagePart<'_>) -> String {
    if let Some(ct) = part.content_type() {
        let main = ct.ctype().trim().to_ascii_lowercase();
        if let Some(sub) = ct.subtype() {
            let sub = sub.trim().to_ascii_lowercase();
            if !main.is_empty() && !sub.is_empty() {
                return format!("{main}/{sub}");
            }
        }
    }
    match &part.body {
        PartType::Text(_) => "text/plain",
        PartType::Html(_) => "text/html",
        PartType::Message(_) => "message/rfc822",
        _ => "application/octet-stream",
    }
    .to_owned()
}

/// CRLF, and CRs doubled before LF (as `=0D` line ends leave them), become
/// LF; a lone CR becomes LF.
fn normalize_newlines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut crs = 0usize;
    for c in s.chars() {
        match c {
            '\r' => crs += 1,
            '\n' => {
                crs = 0;
                out.push('\n');
            }
            c => {
                for _ in 0..crs {
                    out.push('\n');
                }
                crs = 0;
                out.push(c);
            }
        }
    }
    for _ in 0..crs {
        out.push('\n');
    }
    out
}

fn first_email(addr: &Address<'_>) -> Option<Identity> {
    addr.iter().find_map(|a| a.address().and_then(email))
}

/// Ids from a Message-ID style header value.
fn ids(v: &HeaderValue<'_>) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => vec![t.to_string()],
        HeaderValue::TextList(list) => list.iter().map(|t| t.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// Every text value of the root header `name`, case-insensitively.
fn header_texts<'m>(m: &'m Message<'_>, name: &'static str) -> impl Iterator<Item = &'m str> {
    m.headers()
        .iter()
        .filter(move |h| h.name().eq_ignore_ascii_case(name))
        .filter_map(|h| match h.value() {
            HeaderValue::Text(t) => Some(t.as_ref()),
            HeaderValue::TextList(l) => l.first().map(|t| t.as_ref()),
            _ => None,
        })
}

fn header_text<'m>(m: &'m Message<'_>, name: &'static str) -> Option<&'m str> {
    header_texts(m, name).next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_message_ids_round_trip() {
        let id = Uuid::parse_str("0196a0a0-0000-7000-8000-0000000000aa").unwrap();
        let wire = our_message_id(id, "mail.example.com");
        assert_eq!(
            wire,
            "<0196a0a0-0000-7000-8000-0000000000aa@mail.example.com>"
        );
        assert_eq!(parse_our_message_id(&wire, "mail.example.com"), Some(id));
        assert_eq!(
            parse_our_message_id(
                " 0196a0a0-0000-7000-8000-0000000000aa@MAIL.example.com",
                "mail.example.com"
            ),
            Some(id)
        );
        for other in [
            "<0196a0a0-0000-7000-8000-0000000000aa@example.org>",
            "<not-a-uuid@mail.example.com>",
            "<0196a0a000007000800000000000000000aa@mail.example.com>",
            "<@mail.example.com>",
            "",
            "<>",
        ] {
            assert_eq!(
                parse_our_message_id(other, "mail.example.com"),
                None,
                "{other}"
            );
        }
        assert_eq!(parse_our_message_id(&wire, ""), None);
    }

    fn ctx(dir: &std::path::Path) -> ParseContext {
        ParseContext::new(
            "support@example.com",
            "mail.example.com",
            AttachmentStore::new(dir, 1024).without_fsync(),
        )
    }

    #[test]
    fn the_same_mail_gets_the_same_key_and_mail_without_id_a_hash() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let with_id = b"From: a@example.org\r\nMessage-ID: <x1@example.org>\r\n\r\nhi\r\n";
        let a = parse(with_id, &ctx, &ServerExtras::default()).unwrap();
        let b = parse(with_id, &ctx, &ServerExtras::default()).unwrap();
        assert_eq!(
            a.envelope.idempotency_key,
            "email:support@example.com:x1@example.org"
        );
        assert_eq!(a.envelope.idempotency_key, b.envelope.idempotency_key);
        let without = b"From: a@example.org\r\n\r\nhi\r\n";
        let c = parse(without, &ctx, &ServerExtras::default()).unwrap();
        let sha = AttachmentStore::address(without).sha256;
        assert_eq!(
            c.envelope.idempotency_key,
            format!("email:support@example.com:sha256:{sha}")
        );
    }

    #[test]
    fn an_unwritable_store_is_an_error_not_a_lost_mail() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("f");
        std::fs::write(&blocker, b"x").unwrap();
        let ctx = ParseContext::new(
            "support@example.com",
            "mail.example.com",
            AttachmentStore::new(&blocker, 1024),
        );
        let err = parse(b"From: a@b.c\r\n\r\nx", &ctx, &ServerExtras::default()).unwrap_err();
        assert!(switchboard_core::Retryable::retryable(&err));
    }

    #[test]
    fn text_is_cut_at_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = ctx(dir.path());
        ctx.max_text_bytes = 5;
        let mail = "From: a@example.org\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nabcdé\u{e9}fgh\r\n";
        let p = parse(mail.as_bytes(), &ctx, &ServerExtras::default()).unwrap();
        assert!(
            p.envelope.text.starts_with("abcd\n[text cut short"),
            "{}",
            p.envelope.text
        );
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    }
}
