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

#[cfg(feature = "net")]
pub mod config;
#[cfg(feature = "net")]
pub mod imap;
pub mod parse;
#[cfg(feature = "net")]
pub mod smtp;
#[cfg(feature = "net")]
pub mod tls;

#[cfg(feature = "net")]
pub use config::{EmailConfig, RawEmailChannel};
#[cfg(feature = "net")]
pub use imap::{Checkpoints, ImapPoller, MemoryCheckpoints, StoreCheckpoints};
pub use parse::{
    AttachmentStore, Automated, AutomatedFlag, ParseContext, Parsed, ServerExtras, StoreError,
    our_message_id, parse_our_message_id,
};
#[cfg(feature = "net")]
pub use smtp::SmtpOutbound;
