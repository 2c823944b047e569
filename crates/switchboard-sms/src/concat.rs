//! Vonage concat parts, held durably until their set is complete.
//!
//! A small SQLite file of the SMS channel's own (never the history or the
//! bus): a part is answered 2xx only once its row is committed
//! (`synchronous=FULL`). Rows are keyed by the part's own `messageId`, so a
//! redelivered part is recognised, before and after its set was published.
//! A set is published when its last part arrives, or by the timer once its
//! oldest part is older than `concat_timeout`, flagged incomplete. Published
//! rows are kept [`RETAIN_PUBLISHED`] (longer than Vonage's 24 h of
//! retries), then deleted.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::common::Params;
use crate::vonage::ConcatPart;

/// How long published parts are remembered, to recognise redeliveries.
pub const RETAIN_PUBLISHED: Duration = Duration::from_secs(48 * 3600);

/// Why the part store failed. Always worth a retry by the provider.
#[derive(Debug, thiserror::Error)]
#[error("concat part store: {0}")]
pub struct ConcatError(String);

impl From<rusqlite::Error> for ConcatError {
    fn from(e: rusqlite::Error) -> Self {
        ConcatError(e.to_string())
    }
}

/// What holding a part found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Seen before; its set was published already.
    AlreadyPublished,
    /// Held; the set still misses parts.
    Waiting {
        /// Parts held.
        have: u32,
        /// Parts in the set.
        total: u32,
    },
    /// Held, and the set is complete: publish it.
    Complete,
    /// A pending set already holds this part number under another
    /// `messageId`: the sender reused the concat reference. Publish the
    /// pending set (incomplete), then hold the part again.
    Reused,
}

/// A pending set: account, set key, total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSet {
    /// Account name.
    pub account: String,
    /// The set key.
    pub set_key: String,
    /// Parts in the set.
    pub total: u32,
}

/// The part store.
pub struct ConcatStore {
    conn: Mutex<Connection>,
}

impl ConcatStore {
    /// Opens (creating) the file.
    pub fn open(path: &Path) -> Result<Self, ConcatError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ConcatError(e.to_string()))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS concat_parts (
                account TEXT NOT NULL,
                message_id TEXT NOT NULL,
                set_key TEXT NOT NULL,
                part INTEGER NOT NULL,
                total INTEGER NOT NULL,
                params TEXT NOT NULL,
                received_at INTEGER NOT NULL,
                published_at INTEGER,
                PRIMARY KEY (account, message_id)
            );
            CREATE INDEX IF NOT EXISTS concat_pending
                ON concat_parts (account, set_key) WHERE published_at IS NULL;",
        )?;
        Ok(ConcatStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `part` of `account` (idempotent on its `messageId`).
    pub fn hold(
        &self,
        account: &str,
        part: &ConcatPart,
        params: &Params,
        now_ms: i64,
    ) -> Result<Held, ConcatError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let seen: Option<Option<i64>> = tx
            .query_row(
                "SELECT published_at FROM concat_parts WHERE account = ?1 AND message_id = ?2",
                params![account, part.message_id],
                |r| r.get(0),
            )
            .optional()?;
        match seen {
            Some(Some(_)) => return Ok(Held::AlreadyPublished),
            Some(None) => {}
            None => {
                let clash: Option<String> = tx
                    .query_row(
                        "SELECT message_id FROM concat_parts
                         WHERE account = ?1 AND set_key = ?2 AND part = ?3 AND published_at IS NULL",
                        params![account, part.set_key, part.part],
                        |r| r.get(0),
                    )
                    .optional()?;
                if clash.is_some() {
                    return Ok(Held::Reused);
                }
                let json = serde_json::to_string(params).map_err(|e| ConcatError(e.to_string()))?;
                tx.execute(
                    "INSERT INTO concat_parts
                     (account, message_id, set_key, part, total, params, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        account,
                        part.message_id,
                        part.set_key,
                        part.part,
                        part.total,
                        json,
                        now_ms
                    ],
                )?;
            }
        }
        let have: u32 = tx.query_row(
            "SELECT COUNT(DISTINCT part) FROM concat_parts
             WHERE account = ?1 AND set_key = ?2 AND published_at IS NULL",
            params![account, part.set_key],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(if have >= part.total {
            Held::Complete
        } else {
            Held::Waiting {
                have,
                total: part.total,
            }
        })
    }

    /// The pending parts of a set: (part number, parameters).
    pub fn parts(&self, account: &str, set_key: &str) -> Result<Vec<(u32, Params)>, ConcatError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT part, params FROM concat_parts
             WHERE account = ?1 AND set_key = ?2 AND published_at IS NULL ORDER BY part",
        )?;
        let rows = stmt.query_map(params![account, set_key], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (n, json) = row?;
            let p: Params = serde_json::from_str(&json).map_err(|e| ConcatError(e.to_string()))?;
            out.push((n, p));
        }
        Ok(out)
    }

    /// Marks a set's pending parts published.
    pub fn mark_published(
        &self,
        account: &str,
        set_key: &str,
        now_ms: i64,
    ) -> Result<(), ConcatError> {
        self.conn().execute(
            "UPDATE concat_parts SET published_at = ?3
             WHERE account = ?1 AND set_key = ?2 AND published_at IS NULL",
            params![account, set_key, now_ms],
        )?;
        Ok(())
    }

    /// Pending sets whose oldest part arrived before `cutoff_ms`.
    pub fn expired(&self, cutoff_ms: i64) -> Result<Vec<PendingSet>, ConcatError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT account, set_key, MAX(total) FROM concat_parts WHERE published_at IS NULL
             GROUP BY account, set_key HAVING MIN(received_at) < ?1",
        )?;
        let rows = stmt.query_map(params![cutoff_ms], |r| {
            Ok(PendingSet {
                account: r.get(0)?,
                set_key: r.get(1)?,
                total: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes parts published before `cutoff_ms`; returns how many.
    pub fn purge(&self, cutoff_ms: i64) -> Result<usize, ConcatError> {
        Ok(self.conn().execute(
            "DELETE FROM concat_parts WHERE published_at IS NOT NULL AND published_at < ?1",
            params![cutoff_ms],
        )?)
    }

    /// Parts not yet published, for metrics and tests.
    pub fn pending(&self) -> Result<u64, ConcatError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM concat_parts WHERE published_at IS NULL",
            [],
            |r| r.get(0),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(n: u32, id: &str) -> (ConcatPart, Params) {
        (
            ConcatPart {
                set_key: "447700900001|447700900999|A1|3".into(),
                part: n,
                total: 3,
                message_id: id.into(),
            },
            vec![("text".into(), format!("p{n}"))],
        )
    }

    #[test]
    fn a_set_completes_once_and_redeliveries_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite3");
        let store = ConcatStore::open(&path).unwrap();
        let (p2, q2) = part(2, "m2");
        assert_eq!(
            store.hold("eu", &p2, &q2, 1).unwrap(),
            Held::Waiting { have: 1, total: 3 }
        );
        // The same part again: still one held.
        assert_eq!(
            store.hold("eu", &p2, &q2, 2).unwrap(),
            Held::Waiting { have: 1, total: 3 }
        );
        let (p1, q1) = part(1, "m1");
        store.hold("eu", &p1, &q1, 3).unwrap();
        // Survives a reopen (the part was answered 2xx already).
        drop(store);
        let store = ConcatStore::open(&path).unwrap();
        let (p3, q3) = part(3, "m3");
        assert_eq!(store.hold("eu", &p3, &q3, 4).unwrap(), Held::Complete);
        let parts = store.parts("eu", &p3.set_key).unwrap();
        assert_eq!(
            parts.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        store.mark_published("eu", &p3.set_key, 5).unwrap();
        assert_eq!(store.pending().unwrap(), 0);
        assert_eq!(
            store.hold("eu", &p2, &q2, 6).unwrap(),
            Held::AlreadyPublished
        );
        // A new message reusing the reference starts a new set.
        let (n1, r1) = part(1, "n1");
        assert_eq!(
            store.hold("eu", &n1, &r1, 7).unwrap(),
            Held::Waiting { have: 1, total: 3 }
        );
        let (x1, y1) = part(1, "x1");
        assert_eq!(store.hold("eu", &x1, &y1, 8).unwrap(), Held::Reused);
        assert_eq!(store.purge(6).unwrap(), 3);
    }

    #[test]
    fn expired_sets_are_found_by_their_oldest_part() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConcatStore::open(&dir.path().join("c.sqlite3")).unwrap();
        let (p1, q1) = part(1, "m1");
        store.hold("eu", &p1, &q1, 100).unwrap();
        let (p3, q3) = part(3, "m3");
        store.hold("eu", &p3, &q3, 500).unwrap();
        assert!(store.expired(100).unwrap().is_empty());
        let sets = store.expired(101).unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].total, 3);
        assert_eq!(store.parts("eu", &sets[0].set_key).unwrap().len(), 2);
    }
}
