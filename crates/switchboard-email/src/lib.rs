//! The email channel: IMAP in, SMTP out, mail parsed into envelopes.
//!
//! Contract: `parse` turns raw RFC 5322 bytes into an envelope and never
//! fails (mail it cannot parse lands as raw bytes with the parse error).
//! [`imap::ImapPoller`] reads one mailbox and acknowledges a mail (`\Seen`,
//! or a move) and advances its checkpoint only after
//! [`switchboard_core::Intake::accept`] returned `Ok` for it, so nothing is
//! lost to a crash and nothing is skipped after downtime, another client's
//! reading, or a UIDVALIDITY change; a redelivered mail is deduplicated by
//! its envelope's idempotency key. [`smtp::SmtpOutbound`] makes one SMTP
//! attempt per `send` and says by the error's variant whether a retry can
//! help. [`config::RawEmailChannel`] is the `[channels.email]` section.

pub mod config;
pub mod imap;
pub mod parse;
pub mod smtp;
pub mod tls;

pub use config::{EmailConfig, RawEmailChannel};
pub use imap::{Checkpoints, ImapPoller, MemoryCheckpoints, StoreCheckpoints};
pub use parse::{
    AttachmentStore, Automated, AutomatedFlag, ParseContext, Parsed, ServerExtras, StoreError,
    our_message_id, parse_our_message_id,
};
pub use smtp::SmtpOutbound;
