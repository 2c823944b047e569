//! The channel's own small SQLite file: what it must remember between a
//! send and the platform's later reports.
//!
//! - `sent`: provider message id → Switchboard's message id and request key,
//!   written by the outbound adapters after a send, read when a status
//!   (Messenger `delivery`/`read`, a WhatsApp status without
//!   `biz_opaque_callback_data`) or an echo names the provider id.
//! - `unreachable`: recipients a platform refuses for good (a Telegram user
//!   who blocked the bot); sends to them fail at once until they write
//!   again.
//! - `migrations`: Telegram groups that became supergroups (old chat id →
//!   new), so a group's conversation keeps its thread id.
//!
//! One file per instance: on several instances behind a load balancer a
//! report may reach an instance that did not send; it is then acknowledged
//! and logged (see the crate's contract).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

/// A message we sent, as remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// Switchboard's id.
    pub message_id: Uuid,
    /// The outbound request's idempotency key.
    pub idempotency_key: String,
    /// The provider id.
    pub provider_message_id: String,
}

/// The store.
pub struct State {
    conn: Mutex<Connection>,
}

fn err(e: rusqlite::Error) -> String {
    e.to_string()
}

impl State {
    /// Opens (creating) the file.
    pub fn open(path: &Path) -> Result<Self, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS sent (
                 channel TEXT NOT NULL,
                 account TEXT NOT NULL,
                 provider_message_id TEXT NOT NULL,
                 recipient TEXT NOT NULL,
                 message_id TEXT NOT NULL,
                 idempotency_key TEXT NOT NULL,
                 sent_at INTEGER NOT NULL,
                 read INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (channel, provider_message_id)
             );
             CREATE INDEX IF NOT EXISTS sent_recipient ON sent (channel, account, recipient, sent_at);
             CREATE TABLE IF NOT EXISTS unreachable (
                 channel TEXT NOT NULL,
                 account TEXT NOT NULL,
                 recipient TEXT NOT NULL,
                 reason TEXT NOT NULL,
                 since INTEGER NOT NULL,
                 PRIMARY KEY (channel, account, recipient)
             );
             CREATE TABLE IF NOT EXISTS migrations (
                 account TEXT NOT NULL,
                 from_chat INTEGER NOT NULL,
                 to_chat INTEGER NOT NULL,
                 PRIMARY KEY (account, to_chat)
             );",
        )
        .map_err(err)?;
        Ok(State {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, String> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| "state lock poisoned".to_owned())?;
        f(&conn).map_err(err)
    }

    /// Remembers a send.
    #[allow(clippy::too_many_arguments)]
    pub fn record_sent(
        &self,
        channel: &str,
        account: &str,
        provider_message_id: &str,
        recipient: &str,
        message_id: Uuid,
        idempotency_key: &str,
        sent_at_ms: i64,
    ) -> Result<(), String> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO sent (channel, account, provider_message_id, recipient, message_id, idempotency_key, sent_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![channel, account, provider_message_id, recipient, message_id.to_string(), idempotency_key, sent_at_ms],
            )
            .map(|_| ())
        })
    }

    /// The send of a provider id.
    pub fn sent(
        &self,
        channel: &str,
        provider_message_id: &str,
    ) -> Result<Option<SentMessage>, String> {
        self.with(|c| {
            c.query_row(
                "SELECT message_id, idempotency_key, provider_message_id FROM sent WHERE channel = ?1 AND provider_message_id = ?2",
                params![channel, provider_message_id],
                |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                },
            )
            .optional()
        })
        .map(|row| {
            row.and_then(|(m, k, p)| {
                Some(SentMessage {
                    message_id: Uuid::parse_str(&m).ok()?,
                    idempotency_key: k,
                    provider_message_id: p,
                })
            })
        })
    }

    /// Every message to `recipient` sent at or before `watermark_ms` and not
    /// marked read yet (see [`State::mark_read`]).
    pub fn unread_up_to(
        &self,
        channel: &str,
        account: &str,
        recipient: &str,
        watermark_ms: i64,
    ) -> Result<Vec<SentMessage>, String> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT message_id, idempotency_key, provider_message_id FROM sent
                 WHERE channel = ?1 AND account = ?2 AND recipient = ?3 AND sent_at <= ?4 AND read = 0
                 ORDER BY sent_at",
            )?;
            let rows = stmt
                .query_map(params![channel, account, recipient, watermark_ms], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .map(|rows| {
            rows.into_iter()
                .filter_map(|(m, k, p)| {
                    Some(SentMessage {
                        message_id: Uuid::parse_str(&m).ok()?,
                        idempotency_key: k,
                        provider_message_id: p,
                    })
                })
                .collect()
        })
    }

    /// Marks every message to `recipient` up to `watermark_ms` read, once
    /// their statuses are durably on the stream.
    pub fn mark_read(
        &self,
        channel: &str,
        account: &str,
        recipient: &str,
        watermark_ms: i64,
    ) -> Result<(), String> {
        self.with(|c| {
            c.execute(
                "UPDATE sent SET read = 1 WHERE channel = ?1 AND account = ?2 AND recipient = ?3 AND sent_at <= ?4",
                params![channel, account, recipient, watermark_ms],
            )
            .map(|_| ())
        })
    }

    /// Marks a recipient unreachable.
    pub fn mark_unreachable(
        &self,
        channel: &str,
        account: &str,
        recipient: &str,
        reason: &str,
        since_ms: i64,
    ) -> Result<(), String> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO unreachable (channel, account, recipient, reason, since) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![channel, account, recipient, reason, since_ms],
            )
            .map(|_| ())
        })
    }

    /// Why a recipient is unreachable, if it is.
    pub fn unreachable(
        &self,
        channel: &str,
        account: &str,
        recipient: &str,
    ) -> Result<Option<String>, String> {
        self.with(|c| {
            c.query_row(
                "SELECT reason FROM unreachable WHERE channel = ?1 AND account = ?2 AND recipient = ?3",
                params![channel, account, recipient],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Forgets that a recipient was unreachable (they wrote again).
    pub fn reachable(&self, channel: &str, account: &str, recipient: &str) -> Result<bool, String> {
        self.with(|c| {
            c.execute(
                "DELETE FROM unreachable WHERE channel = ?1 AND account = ?2 AND recipient = ?3",
                params![channel, account, recipient],
            )
            .map(|n| n > 0)
        })
    }

    /// Records that a Telegram group became a supergroup.
    pub fn record_migration(
        &self,
        account: &str,
        from_chat: i64,
        to_chat: i64,
    ) -> Result<(), String> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO migrations (account, from_chat, to_chat) VALUES (?1, ?2, ?3)",
                params![account, from_chat, to_chat],
            )
            .map(|_| ())
        })
    }

    /// The chat a supergroup was migrated from, if it was.
    pub fn migrated_from(&self, account: &str, to_chat: i64) -> Result<Option<i64>, String> {
        self.with(|c| {
            c.query_row(
                "SELECT from_chat FROM migrations WHERE account = ?1 AND to_chat = ?2",
                params![account, to_chat],
                |r| r.get(0),
            )
            .optional()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_found_by_id_and_by_watermark_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("s.sqlite3")).unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        s.record_sent("messenger", "p", "m_1", "u", a, "k1", 1000)
            .unwrap();
        s.record_sent("messenger", "p", "m_2", "u", b, "k2", 2000)
            .unwrap();
        assert_eq!(s.sent("messenger", "m_2").unwrap().unwrap().message_id, b);
        assert!(s.sent("instagram", "m_2").unwrap().is_none());
        let read = s.unread_up_to("messenger", "p", "u", 1500).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].message_id, a);
        s.mark_read("messenger", "p", "u", 1500).unwrap();
        let read = s.unread_up_to("messenger", "p", "u", 5000).unwrap();
        assert_eq!(
            read.iter().map(|r| r.message_id).collect::<Vec<_>>(),
            vec![b]
        );
        s.mark_read("messenger", "p", "u", 5000).unwrap();
        assert!(
            s.unread_up_to("messenger", "p", "u", 5000)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn unreachable_until_they_write_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("s.sqlite3")).unwrap();
        s.mark_unreachable("telegram", "1", "42", "blocked", 1)
            .unwrap();
        assert_eq!(
            s.unreachable("telegram", "1", "42").unwrap().as_deref(),
            Some("blocked")
        );
        assert!(s.reachable("telegram", "1", "42").unwrap());
        assert!(s.unreachable("telegram", "1", "42").unwrap().is_none());
        s.record_migration("1", -5, -1005).unwrap();
        assert_eq!(s.migrated_from("1", -1005).unwrap(), Some(-5));
    }
}
