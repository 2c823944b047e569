//! The channel's own small SQLite file: what it must remember between a
//! send and the platform's later reports.
//!
//! - `unreachable`: recipients a platform refuses for good (a Telegram user
//!   who blocked the bot); sends to them fail at once until they write
//!   again.
//! - `migrations`: Telegram groups that became supergroups (old chat id →
//!   new), so a group's conversation keeps its thread id.
//!
//! One file per instance, and nothing in it is needed for correctness
//! across instances: statuses and echoes are matched by the router against
//! the shared history (`message.provider_status`, provider ids recorded
//! with each send). An instance that does not know a user is unreachable
//! calls Telegram and gets the same 403; one that missed a group's
//! migration starts a conversation under the supergroup's id.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

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

    /// The supergroup a group became, if it did: where a reply to the
    /// group's conversation goes.
    pub fn migrated_to(&self, account: &str, from_chat: i64) -> Result<Option<i64>, String> {
        self.with(|c| {
            c.query_row(
                "SELECT to_chat FROM migrations WHERE account = ?1 AND from_chat = ?2",
                params![account, from_chat],
                |r| r.get(0),
            )
            .optional()
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
        assert_eq!(s.migrated_to("1", -5).unwrap(), Some(-1005));
        assert_eq!(s.migrated_to("1", -6).unwrap(), None);
    }
}
