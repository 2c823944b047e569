//! The SQLite history: one file in WAL mode, one writer, readers beside it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};
use switchboard_core::{Channel, Direction, Identity, IdentityKind, ThreadRule};
use uuid::Uuid;

use crate::model::{
    Conversation, ConversationStatus, Cursor, Customer, Erased, LastInbound, MessageRef,
    MessageVersion, Millis, NewMessage, NewVersion, OutboundRecord, OutboundState, StoredMessage,
    Timeline,
};
use crate::{OutboxRecord, Store, StoreError, Tx};

/// Versioned migrations: entry `i` takes the schema from version `i` to
/// `i + 1`. Never edit a released entry; append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE customers (
    id          TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    merged_into TEXT,
    erased_at   INTEGER
);
CREATE TABLE identities (
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    evidence    TEXT NOT NULL,
    linked_at   INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;
CREATE INDEX identities_customer ON identities (customer_id);
CREATE TABLE conversations (
    id                   TEXT PRIMARY KEY,
    customer_id          TEXT NOT NULL,
    channel              TEXT NOT NULL,
    account              TEXT NOT NULL,
    status               TEXT NOT NULL,
    opened_at            INTEGER NOT NULL,
    last_message_at      INTEGER NOT NULL,
    last_inbound_channel TEXT,
    last_inbound_account TEXT,
    resolved_at          INTEGER,
    subject_key          TEXT
);
CREATE INDEX conversations_customer ON conversations (customer_id, last_message_at);
CREATE TABLE messages (
    seq                INTEGER PRIMARY KEY,
    id                 TEXT NOT NULL UNIQUE,
    idempotency_key    TEXT NOT NULL UNIQUE,
    customer_id        TEXT NOT NULL,
    conversation_id    TEXT NOT NULL,
    direction          TEXT NOT NULL,
    channel            TEXT NOT NULL,
    account            TEXT NOT NULL,
    from_kind          TEXT NOT NULL,
    from_value         TEXT NOT NULL,
    to_kind            TEXT NOT NULL,
    to_value           TEXT NOT NULL,
    received_at        INTEGER NOT NULL,
    subject            TEXT,
    text               TEXT NOT NULL,
    header_id          TEXT,
    provider_thread_id TEXT,
    rule               TEXT NOT NULL,
    status             TEXT,
    envelope           TEXT NOT NULL
);
CREATE INDEX messages_conversation ON messages (conversation_id, received_at, seq);
CREATE INDEX messages_customer ON messages (customer_id, seq);
CREATE INDEX messages_header_id ON messages (customer_id, header_id) WHERE header_id IS NOT NULL;
CREATE INDEX messages_provider_thread ON messages (customer_id, channel, provider_thread_id)
    WHERE provider_thread_id IS NOT NULL;
CREATE TABLE message_refs (
    customer_id TEXT NOT NULL,
    ref_id      TEXT NOT NULL,
    message_seq INTEGER NOT NULL
);
CREATE INDEX message_refs_lookup ON message_refs (customer_id, ref_id);
CREATE INDEX message_refs_message ON message_refs (message_seq);
CREATE TABLE merges (
    id         INTEGER PRIMARY KEY,
    survivor   TEXT NOT NULL,
    merged     TEXT NOT NULL,
    evidence   TEXT NOT NULL,
    identities TEXT NOT NULL,
    at         INTEGER NOT NULL
);
CREATE TABLE identity_splits (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    value        TEXT NOT NULL,
    from_customer TEXT NOT NULL,
    to_customer  TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    at           INTEGER NOT NULL
);
CREATE TABLE tombstones (
    customer_id   TEXT PRIMARY KEY,
    erased_at     INTEGER NOT NULL,
    messages      INTEGER NOT NULL,
    identities    INTEGER NOT NULL,
    conversations INTEGER NOT NULL
);
CREATE TABLE applied_commands (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT NOT NULL,
    key     BLOB NOT NULL,
    payload BLOB NOT NULL
);
"#,
    r#"
CREATE TABLE outbound (
    idempotency_key     TEXT PRIMARY KEY,
    message_id          TEXT NOT NULL,
    conversation_id     TEXT NOT NULL,
    customer_id         TEXT NOT NULL,
    channel             TEXT NOT NULL,
    account             TEXT NOT NULL,
    to_kind             TEXT NOT NULL,
    to_value            TEXT NOT NULL,
    state               TEXT NOT NULL,
    attempts            INTEGER NOT NULL,
    provider_message_id TEXT,
    error               TEXT,
    request             TEXT NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX outbound_message ON outbound (message_id);
CREATE INDEX messages_inbound ON messages (customer_id, channel, received_at)
    WHERE direction = 'inbound';
"#,
    r#"
-- Lookups of a customer's (or a conversation's) latest inbound message, which
-- the dispatcher makes for every request.
CREATE INDEX messages_inbound_by_conversation ON messages (conversation_id, received_at, seq)
    WHERE direction = 'inbound';
CREATE INDEX messages_inbound_by_customer ON messages (customer_id, received_at, seq)
    WHERE direction = 'inbound';
"#,
    r#"
-- The conversation-scoped lookup is served by messages_conversation; this
-- index cost about 6 KiB of writes per message (docs/benchmarks.md).
DROP INDEX messages_inbound_by_conversation;
"#,
    r#"
-- IMAP checkpoints: per email account and mailbox, the UIDVALIDITY and the
-- highest UID whose message was durably accepted.
CREATE TABLE mailbox_checkpoints (
    account     TEXT NOT NULL,
    mailbox     TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    last_uid    INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (account, mailbox)
) WITHOUT ROWID;
"#,
    r#"
-- One index on (customer, time) serves the timeline, a customer's latest
-- inbound message, merges and erasure. It replaces two narrower indexes on
-- the customer id: each index keyed by customer dirties a page per message
-- wherever that customer's entries sit (docs/benchmarks.md).
CREATE INDEX messages_customer_time ON messages (customer_id, received_at, seq);
DROP INDEX messages_customer;
DROP INDEX messages_inbound_by_customer;
"#,
    r#"
-- Changes to stored messages (edits, reactions, deletions): each is a
-- version keeping the text it replaced, applied once per idempotency key.
ALTER TABLE messages ADD COLUMN versions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN reactions TEXT;
ALTER TABLE messages ADD COLUMN deleted_at INTEGER;
CREATE TABLE message_versions (
    message_id      TEXT NOT NULL,
    version         INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    by_kind         TEXT NOT NULL,
    by_value        TEXT NOT NULL,
    previous_text   TEXT NOT NULL,
    text            TEXT,
    emoji           TEXT,
    at              INTEGER NOT NULL,
    envelope        TEXT NOT NULL,
    PRIMARY KEY (message_id, version)
) WITHOUT ROWID;
-- A change names its message by the provider's id: the message's own id,
-- or the id the provider gave one of our sends.
CREATE INDEX messages_provider_id ON messages (header_id) WHERE header_id IS NOT NULL;
CREATE INDEX outbound_provider_id ON outbound (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
"#,
    r#"
-- Read watermarks (Messenger, Instagram) name a recipient and a time: our
-- sends to that recipient on the account up to then.
CREATE INDEX outbound_recipient ON outbound (to_value, channel, account, updated_at);
"#,
    r#"
-- (Here PostgreSQL tunes its outbox table's storage; SQLite has nothing to
-- change, and the step is kept so both lists grow together.)
SELECT 1;
"#,
    r#"
-- A message id (header_id) names one message, so the lookup by customer and
-- message id is served by messages_provider_id (header_id) with the customer
-- checked on the row. This index was a second random-keyed b-tree written for
-- every email message (docs/benchmarks.md).
DROP INDEX messages_header_id;
"#,
];

/// The SQLite store. Writes go through one connection, serialized by a lock;
/// reads use another, so the API never waits for a routing batch (WAL).
///
/// Two costs are kept off the writer's path:
/// - WAL checkpoints run on a background thread with its own connection
///   (`wal_autocheckpoint` is off), so a routing transaction never copies
///   the log back into the database itself;
/// - [`Store::outbox_done`] only records how far the outbox was published;
///   the rows are deleted inside the next write transaction, and
///   [`Store::outbox`] never returns them again. After a crash before that
///   transaction commits, those events are published once more: events are
///   at-least-once, and carry ids for consumers that deduplicate.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    outbox: Arc<OutboxTrim>,
    /// Kept for its `Drop`, which stops the thread.
    _checkpointer: Checkpointer,
}

/// How far the outbox was published, and how far it was deleted.
#[derive(Debug, Default)]
struct OutboxTrim {
    published: AtomicI64,
    deleted: AtomicI64,
}

/// The background checkpoint thread.
struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the checkpointer looks at the log.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

impl Checkpointer {
    fn start(path: &Path) -> Result<Self, StoreError> {
        let conn = open_conn(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    // PASSIVE: copies what no reader still needs, never waits
                    // for the writer or blocks it. The log restarts from the
                    // beginning once a checkpoint has caught up.
                    if let Err(error) =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(%error, "wal checkpoint failed");
                    }
                }
                if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(%error, "final wal checkpoint failed");
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start checkpointer: {e}")))?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("the checkpoint thread panicked");
        }
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(ConstraintViolation | TypeMismatch | TooBig | ApiMisuse) => {
            StoreError::Rejected(e.to_string())
        }
        Some(_) => StoreError::Unavailable(e.to_string()),
        None => StoreError::Rejected(e.to_string()),
    }
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(unavailable)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = OFF;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -32768;
         PRAGMA wal_autocheckpoint = 10000;",
    )
    .map_err(unavailable)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// The newest schema version this build knows.
    pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

    /// Opens (creating if needed) the database at `path` and applies pending
    /// migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut writer = open_conn(path)?;
        migrate(&mut writer)?;
        // The checkpointer copies the log back; the writer never does.
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(unavailable)?;
        let reader = open_conn(path)?;
        let checkpointer = Checkpointer::start(path)?;
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            outbox: Arc::default(),
            _checkpointer: checkpointer,
        })
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.read()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(unavailable)
    }

    fn read(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs reads in one read transaction, so they all see the same
    /// committed state (a page never lists a message whose conversation
    /// committed after the conversations were read).
    fn snapshot<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let conn = self.read();
        conn.execute_batch("BEGIN DEFERRED").map_err(unavailable)?;
        let res = f(&conn);
        let end = conn.execute_batch(if res.is_ok() { "COMMIT" } else { "ROLLBACK" });
        let value = res.map_err(unavailable)?;
        end.map_err(unavailable)?;
        Ok(value)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unavailable)?;
    if version > SqliteStore::SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: version,
            supported: SqliteStore::SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(unavailable)?;
        tx.execute_batch(sql).map_err(unavailable)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    Ok(())
}

fn uuid_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    let s: String = row.get(idx)?;
    Uuid::parse_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn parse_col<T>(
    row: &Row<'_>,
    idx: usize,
    parse: impl Fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            format!("unexpected value {s:?}").into(),
        )
    })
}

fn identity_cols(row: &Row<'_>, kind: usize, value: usize) -> rusqlite::Result<Identity> {
    let kind = parse_col(row, kind, |s| s.parse::<IdentityKind>().ok())?;
    Ok(Identity {
        kind,
        value: row.get(value)?,
    })
}

const CONVERSATION_COLS: &str = "id, customer_id, channel, account, status, opened_at, \
    last_message_at, last_inbound_channel, last_inbound_account, resolved_at, subject_key";

fn conversation_row(row: &Row<'_>) -> rusqlite::Result<Conversation> {
    let last_inbound: Option<String> = row.get(7)?;
    Ok(Conversation {
        id: uuid_col(row, 0)?,
        customer_id: uuid_col(row, 1)?,
        channel: parse_col(row, 2, |s| s.parse().ok())?,
        account: row.get(3)?,
        status: ConversationStatus::parse(&row.get::<_, String>(4)?),
        opened_at: row.get(5)?,
        last_message_at: row.get(6)?,
        last_inbound_channel: last_inbound.and_then(|s| s.parse().ok()),
        last_inbound_account: row.get(8)?,
        resolved_at: row.get(9)?,
        subject_key: row.get(10)?,
    })
}

const OUTBOUND_COLS: &str = "idempotency_key, message_id, conversation_id, customer_id, channel, \
    account, to_kind, to_value, state, attempts, provider_message_id, error, created_at, updated_at";

fn outbound_row(row: &Row<'_>) -> rusqlite::Result<OutboundRecord> {
    Ok(OutboundRecord {
        idempotency_key: row.get(0)?,
        message_id: uuid_col(row, 1)?,
        conversation_id: uuid_col(row, 2)?,
        customer_id: uuid_col(row, 3)?,
        channel: parse_col(row, 4, |s| s.parse::<Channel>().ok())?,
        account: row.get(5)?,
        to: identity_cols(row, 6, 7)?,
        state: parse_col(row, 8, OutboundState::parse)?,
        attempts: row.get(9)?,
        provider_message_id: row.get(10)?,
        error: row.get(11)?,
        created_at: row.get(12)?,
        updated_at: row.get(13)?,
    })
}

const MESSAGE_COLS: &str = "id, seq, idempotency_key, customer_id, conversation_id, direction, \
    channel, account, from_kind, from_value, to_kind, to_value, received_at, subject, text, rule, \
    status, header_id, versions, reactions, deleted_at";

fn message_row(row: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: uuid_col(row, 0)?,
        seq: row.get(1)?,
        idempotency_key: row.get(2)?,
        customer_id: uuid_col(row, 3)?,
        conversation_id: uuid_col(row, 4)?,
        direction: parse_col(row, 5, |s| match s {
            "inbound" => Some(Direction::Inbound),
            "outbound" => Some(Direction::Outbound),
            _ => None,
        })?,
        channel: parse_col(row, 6, |s| s.parse::<Channel>().ok())?,
        account: row.get(7)?,
        from: identity_cols(row, 8, 9)?,
        to: identity_cols(row, 10, 11)?,
        received_at: row.get(12)?,
        subject: row.get(13)?,
        text: row.get(14)?,
        rule: parse_col(row, 15, ThreadRule::parse)?,
        status: row.get(16)?,
        message_id: row.get(17)?,
        versions: row.get(18)?,
        reactions: crate::model::parse_reactions(row.get::<_, Option<String>>(19)?.as_deref()),
        deleted_at: row.get(20)?,
    })
}

fn load_customer(conn: &Connection, id: Uuid) -> rusqlite::Result<Option<Customer>> {
    let Some(id) = follow_merges(conn, id)? else {
        return Ok(None);
    };
    let Some((created_at, erased_at)) = conn
        .prepare_cached("SELECT created_at, erased_at FROM customers WHERE id = ?1")?
        .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
    else {
        return Ok(None);
    };
    let identities = conn
        .prepare_cached(
            "SELECT kind, value FROM identities WHERE customer_id = ?1 ORDER BY kind, value",
        )?
        .query_map([id.to_string()], |r| identity_cols(r, 0, 1))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let merged_from = conn
        .prepare_cached("SELECT merged FROM merges WHERE survivor = ?1 ORDER BY id")?
        .query_map([id.to_string()], |r| uuid_col(r, 0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(Customer {
        id,
        created_at,
        identities,
        merged_from,
        erased_at,
    }))
}

fn follow_merges(conn: &Connection, mut id: Uuid) -> rusqlite::Result<Option<Uuid>> {
    let mut stmt = conn.prepare_cached("SELECT merged_into FROM customers WHERE id = ?1")?;
    // A merge chain is short; the bound guards against a cycle in bad data.
    for _ in 0..64 {
        let next: Option<Option<String>> =
            stmt.query_row([id.to_string()], |r| r.get(0)).optional()?;
        match next {
            None => return Ok(None),
            Some(None) => return Ok(Some(id)),
            Some(Some(s)) => {
                id = Uuid::parse_str(&s).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?;
            }
        }
    }
    Ok(Some(id))
}

impl Store for SqliteStore {
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError> {
        let conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch("BEGIN IMMEDIATE").map_err(unavailable)?;
        let mut tx = SqliteTx {
            conn,
            open: true,
            savepoints: 0,
            trimmed: None,
        };
        // Published outbox rows go with this transaction (see SqliteStore).
        let published = self.outbox.published.load(Ordering::Acquire);
        if published > self.outbox.deleted.load(Ordering::Acquire) {
            tx.exec("DELETE FROM outbox WHERE seq <= ?1", [published])?;
            tx.trimmed = Some((&*self.outbox, published));
        }
        Ok(Box::new(tx))
    }

    fn customer(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        self.snapshot(|conn| load_customer(conn, id))
    }

    fn customer_by_identity(&self, identity: &Identity) -> Result<Option<Customer>, StoreError> {
        self.snapshot(|conn| {
            let owner: Option<Uuid> = conn
                .prepare_cached(
                    "SELECT customer_id FROM identities WHERE kind = ?1 AND value = ?2",
                )?
                .query_row(params![identity.kind.as_str(), identity.value], |r| {
                    uuid_col(r, 0)
                })
                .optional()?;
            match owner {
                Some(id) => load_customer(conn, id),
                None => Ok(None),
            }
        })
    }

    fn timeline(
        &self,
        customer: Uuid,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Option<Timeline>, StoreError> {
        self.snapshot(|conn| -> rusqlite::Result<Option<Timeline>> {
            let Some(customer_id) = follow_merges(conn, customer)? else {
                return Ok(None);
            };
            let cid = customer_id.to_string();
            let conversations = conn
                .prepare_cached(&format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = ?1 \
                     ORDER BY last_message_at DESC, id"
                ))?
                .query_map([&cid], conversation_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            // Keyset pagination on (message time, arrival): pages never skip
            // or repeat, and each costs the same however deep it is.
            let (after_at, after_seq) =
                after.map_or((i64::MIN, i64::MIN), |c| (c.received_at, c.seq));
            let mut messages = conn
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLS} FROM messages WHERE customer_id = ?1 \
                     AND (received_at, seq) > (?2, ?3) ORDER BY received_at, seq LIMIT ?4"
                ))?
                .query_map(
                    params![cid, after_at, after_seq, limit as i64 + 1],
                    message_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let next_cursor = if messages.len() > limit {
                messages.truncate(limit);
                messages.last().map(|m| Cursor {
                    received_at: m.received_at,
                    seq: m.seq,
                })
            } else {
                None
            };
            Ok(Some(Timeline {
                customer_id,
                conversations,
                messages,
                next_cursor,
            }))
        })
    }

    fn conversation(
        &self,
        id: Uuid,
    ) -> Result<Option<(Conversation, Vec<StoredMessage>)>, StoreError> {
        self.snapshot(
            |conn| -> rusqlite::Result<Option<(Conversation, Vec<StoredMessage>)>> {
                let Some(conv) = conn
                    .prepare_cached(&format!(
                        "SELECT {CONVERSATION_COLS} FROM conversations WHERE id = ?1"
                    ))?
                    .query_row([id.to_string()], conversation_row)
                    .optional()?
                else {
                    return Ok(None);
                };
                let messages = conn
                    .prepare_cached(&format!(
                        "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = ?1 \
                     ORDER BY received_at, seq"
                    ))?
                    .query_map([id.to_string()], message_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Some((conv, messages)))
            },
        )
    }

    fn message_versions(&self, message_id: Uuid) -> Result<Vec<MessageVersion>, StoreError> {
        self.read()
            .prepare_cached(
                "SELECT version, kind, by_kind, by_value, previous_text, text, emoji, at \
                 FROM message_versions WHERE message_id = ?1 ORDER BY version",
            )
            .and_then(|mut s| {
                s.query_map([message_id.to_string()], |r| {
                    Ok(MessageVersion {
                        version: r.get(0)?,
                        kind: parse_col(r, 1, switchboard_core::MessageChangeKind::parse)?,
                        by: identity_cols(r, 2, 3)?,
                        previous_text: r.get(4)?,
                        text: r.get(5)?,
                        emoji: r.get(6)?,
                        at: r.get(7)?,
                    })
                })?
                .collect()
            })
            .map_err(unavailable)
    }

    fn outbound_by_key(&self, key: &str) -> Result<Option<OutboundRecord>, StoreError> {
        self.read()
            .prepare_cached(&format!(
                "SELECT {OUTBOUND_COLS} FROM outbound WHERE idempotency_key = ?1"
            ))
            .and_then(|mut s| s.query_row([key], outbound_row).optional())
            .map_err(unavailable)
    }

    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError> {
        let conn = self.read();
        let published = self.outbox.published.load(Ordering::Acquire);
        conn.prepare_cached(
            "SELECT seq, topic, key, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .and_then(|mut s| {
            s.query_map([published, limit as i64], |r| {
                Ok(OutboxRecord {
                    seq: r.get(0)?,
                    topic: r.get(1)?,
                    key: r.get(2)?,
                    payload: r.get(3)?,
                })
            })?
            .collect()
        })
        .map_err(unavailable)
    }

    fn outbox_done(&self, seq: i64) -> Result<(), StoreError> {
        // Deleted by the next write transaction (see SqliteStore).
        self.outbox.published.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        self.snapshot(|conn| {
            conn.query_row(
                "SELECT NOT EXISTS (SELECT 1 FROM customers) AND NOT EXISTS (SELECT 1 FROM messages)",
                [],
                |r| r.get(0),
            )
        })
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.read()
            .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map(drop)
            .map_err(unavailable)
    }

    fn mailbox_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<crate::MailboxCheckpoint>, StoreError> {
        self.read()
            .prepare_cached(
                "SELECT uidvalidity, last_uid FROM mailbox_checkpoints \
                 WHERE account = ?1 AND mailbox = ?2",
            )
            .and_then(|mut s| {
                s.query_row([account, mailbox], |r| {
                    Ok(crate::MailboxCheckpoint {
                        uidvalidity: r.get(0)?,
                        last_uid: r.get(1)?,
                    })
                })
                .optional()
            })
            .map_err(unavailable)
    }

    fn set_mailbox_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
        cp: crate::MailboxCheckpoint,
    ) -> Result<(), StoreError> {
        let conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        conn.prepare_cached(
            "INSERT INTO mailbox_checkpoints (account, mailbox, uidvalidity, last_uid, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (account, mailbox) DO UPDATE SET \
             uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, \
             updated_at = excluded.updated_at",
        )
        .and_then(|mut s| {
            s.execute(params![
                account,
                mailbox,
                cp.uidvalidity,
                cp.last_uid,
                chrono::Utc::now().timestamp_millis()
            ])
        })
        .map(drop)
        .map_err(unavailable)
    }
}

struct SqliteTx<'a> {
    conn: MutexGuard<'a, Connection>,
    open: bool,
    savepoints: usize,
    /// Published outbox rows this transaction deletes: recorded on commit.
    trimmed: Option<(&'a OutboxTrim, i64)>,
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open
            && let Err(error) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::warn!(%error, "rollback failed");
        }
    }
}

impl SqliteTx<'_> {
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map_err(unavailable)
    }

    fn conversation_of_seq_query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<Uuid>, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row(params, |r| uuid_col(r, 0)).optional())
            .map_err(unavailable)
    }
}

impl Tx for SqliteTx<'_> {
    fn message_by_key(&mut self, key: &str) -> Result<Option<MessageRef>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT id, conversation_id, customer_id FROM messages WHERE idempotency_key = ?1",
            )
            .and_then(|mut s| {
                s.query_row([key], |r| {
                    Ok(MessageRef {
                        id: uuid_col(r, 0)?,
                        conversation_id: uuid_col(r, 1)?,
                        customer_id: uuid_col(r, 2)?,
                    })
                })
                .optional()
            })
            .map_err(unavailable)
    }

    fn owner_of(&mut self, identity: &Identity) -> Result<Option<Uuid>, StoreError> {
        self.conversation_of_seq_query(
            "SELECT customer_id FROM identities WHERE kind = ?1 AND value = ?2",
            params![identity.kind.as_str(), identity.value],
        )
    }

    fn resolve_customer(&mut self, id: Uuid) -> Result<Option<Uuid>, StoreError> {
        follow_merges(&self.conn, id).map_err(unavailable)
    }

    fn is_erased(&mut self, id: Uuid) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT erased_at IS NOT NULL FROM customers WHERE id = ?1")
            .and_then(|mut s| s.query_row([id.to_string()], |r| r.get(0)).optional())
            .map(|v| v.unwrap_or(false))
            .map_err(unavailable)
    }

    fn create_customer(&mut self, id: Uuid, at: Millis) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO customers (id, created_at) VALUES (?1, ?2)",
            params![id.to_string(), at],
        )
        .map(drop)
    }

    fn attach_identity(
        &mut self,
        identity: &Identity,
        customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO identities (kind, value, customer_id, evidence, linked_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (kind, value) DO UPDATE SET customer_id = excluded.customer_id, \
             evidence = excluded.evidence, linked_at = excluded.linked_at",
            params![
                identity.kind.as_str(),
                identity.value,
                customer.to_string(),
                evidence,
                at
            ],
        )
        .map(drop)
    }

    fn identities_of(&mut self, customer: Uuid) -> Result<Vec<Identity>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT kind, value FROM identities WHERE customer_id = ?1 ORDER BY kind, value",
            )
            .and_then(|mut s| {
                s.query_map([customer.to_string()], |r| identity_cols(r, 0, 1))?
                    .collect()
            })
            .map_err(unavailable)
    }

    fn conversation(&mut self, id: Uuid) -> Result<Option<Conversation>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {CONVERSATION_COLS} FROM conversations WHERE id = ?1"
            ))
            .and_then(|mut s| s.query_row([id.to_string()], conversation_row).optional())
            .map_err(unavailable)
    }

    fn conversation_by_message_id(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.conversation_of_seq_query(
            "SELECT conversation_id FROM messages WHERE customer_id = ?1 AND header_id = ?2 \
             ORDER BY seq DESC LIMIT 1",
            params![customer.to_string(), message_id],
        )
    }

    fn conversation_referencing(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.conversation_of_seq_query(
            "SELECT m.conversation_id FROM message_refs r JOIN messages m ON m.seq = r.message_seq \
             WHERE r.customer_id = ?1 AND r.ref_id = ?2 ORDER BY m.seq LIMIT 1",
            params![customer.to_string(), message_id],
        )
    }

    fn conversation_by_provider_thread(
        &mut self,
        customer: Uuid,
        channel: Channel,
        thread_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.conversation_of_seq_query(
            "SELECT conversation_id FROM messages WHERE customer_id = ?1 AND channel = ?2 \
             AND provider_thread_id = ?3 ORDER BY seq DESC LIMIT 1",
            params![customer.to_string(), channel.as_str(), thread_id],
        )
    }

    fn latest_conversation(
        &mut self,
        customer: Uuid,
        channel_account: Option<(Channel, &str)>,
        subject_key: Option<&str>,
    ) -> Result<Option<Conversation>, StoreError> {
        let cid = customer.to_string();
        let res = match (channel_account, subject_key) {
            (None, _) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = ?1 \
                     ORDER BY last_message_at DESC LIMIT 1"
                ))
                .and_then(|mut s| s.query_row([cid], conversation_row).optional()),
            (Some((channel, account)), None) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = ?1 \
                     AND channel = ?2 AND account = ?3 ORDER BY last_message_at DESC LIMIT 1"
                ))
                .and_then(|mut s| {
                    s.query_row(params![cid, channel.as_str(), account], conversation_row)
                        .optional()
                }),
            (Some((channel, account)), Some(subject)) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = ?1 \
                     AND channel = ?2 AND account = ?3 AND subject_key = ?4 \
                     ORDER BY last_message_at DESC LIMIT 1"
                ))
                .and_then(|mut s| {
                    s.query_row(
                        params![cid, channel.as_str(), account, subject],
                        conversation_row,
                    )
                    .optional()
                }),
        };
        res.map_err(unavailable)
    }

    fn insert_conversation(&mut self, c: &Conversation) -> Result<(), StoreError> {
        self.exec(
            &format!("INSERT INTO conversations ({CONVERSATION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![
                c.id.to_string(),
                c.customer_id.to_string(),
                c.channel.as_str(),
                c.account,
                c.status.as_str(),
                c.opened_at,
                c.last_message_at,
                c.last_inbound_channel.map(Channel::as_str),
                c.last_inbound_account,
                c.resolved_at,
                c.subject_key,
            ],
        )
        .map(drop)
    }

    fn update_conversation(&mut self, c: &Conversation) -> Result<(), StoreError> {
        self.exec(
            "UPDATE conversations SET status = ?2, opened_at = ?3, last_message_at = ?4, \
             last_inbound_channel = ?5, last_inbound_account = ?6, resolved_at = ?7, \
             customer_id = ?8 WHERE id = ?1",
            params![
                c.id.to_string(),
                c.status.as_str(),
                c.opened_at,
                c.last_message_at,
                c.last_inbound_channel.map(Channel::as_str),
                c.last_inbound_account,
                c.resolved_at,
                c.customer_id.to_string(),
            ],
        )
        .map(drop)
    }

    fn insert_message(&mut self, m: &NewMessage<'_>) -> Result<i64, StoreError> {
        let e = m.envelope;
        let envelope = serde_json::to_string(e).map_err(|e| StoreError::Rejected(e.to_string()))?;
        let cid = m.customer_id.to_string();
        self.exec(
            "INSERT INTO messages (id, idempotency_key, customer_id, conversation_id, direction, \
             channel, account, from_kind, from_value, to_kind, to_value, received_at, subject, \
             text, header_id, provider_thread_id, rule, status, envelope) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            params![
                e.id.to_string(),
                e.idempotency_key,
                cid,
                m.conversation_id.to_string(),
                e.direction.as_str(),
                e.channel.as_str(),
                e.account,
                e.from.kind.as_str(),
                e.from.value,
                e.to.kind.as_str(),
                e.to.value,
                e.received_at.timestamp_millis(),
                e.subject,
                e.text,
                e.thread_hints.message_id,
                e.thread_hints.provider_thread_id,
                m.rule.as_str(),
                m.status,
                envelope,
            ],
        )?;
        let seq = self.conn.last_insert_rowid();
        let hints = &e.thread_hints;
        for r in hints.in_reply_to.iter().chain(&hints.references) {
            self.exec(
                "INSERT INTO message_refs (customer_id, ref_id, message_seq) VALUES (?1, ?2, ?3)",
                params![cid, r, seq],
            )?;
        }
        Ok(seq)
    }

    fn outbound(&mut self, key: &str) -> Result<Option<OutboundRecord>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {OUTBOUND_COLS} FROM outbound WHERE idempotency_key = ?1"
            ))
            .and_then(|mut s| s.query_row([key], outbound_row).optional())
            .map_err(unavailable)
    }

    fn put_outbound(&mut self, r: &OutboundRecord, request: &str) -> Result<(), StoreError> {
        self.exec(
            &format!(
                "INSERT INTO outbound ({OUTBOUND_COLS}, request) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
                 ON CONFLICT (idempotency_key) DO UPDATE SET state = excluded.state, \
                 attempts = excluded.attempts, provider_message_id = excluded.provider_message_id, \
                 error = excluded.error, updated_at = excluded.updated_at"
            ),
            params![
                r.idempotency_key,
                r.message_id.to_string(),
                r.conversation_id.to_string(),
                r.customer_id.to_string(),
                r.channel.as_str(),
                r.account,
                r.to.kind.as_str(),
                r.to.value,
                r.state.as_str(),
                r.attempts,
                r.provider_message_id,
                r.error,
                r.created_at,
                r.updated_at,
                request,
            ],
        )
        .map(drop)
    }

    fn outbound_by_message(
        &mut self,
        message_id: Uuid,
    ) -> Result<Option<OutboundRecord>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {OUTBOUND_COLS} FROM outbound WHERE message_id = ?1"
            ))
            .and_then(|mut s| {
                s.query_row([message_id.to_string()], outbound_row)
                    .optional()
            })
            .map_err(unavailable)
    }

    fn message_status(&mut self, message_id: Uuid) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT status FROM messages WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([message_id.to_string()], |r| r.get(0))
                    .optional()
            })
            .map(Option::flatten)
            .map_err(unavailable)
    }

    fn outbound_request(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT request FROM outbound WHERE idempotency_key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(unavailable)
    }

    fn last_inbound(
        &mut self,
        customer: Uuid,
        conversation: Option<Uuid>,
        channel: Option<Channel>,
    ) -> Result<Option<LastInbound>, StoreError> {
        let cols = "conversation_id, channel, account, from_kind, from_value, received_at";
        let row = |r: &Row<'_>| {
            Ok(LastInbound {
                conversation_id: uuid_col(r, 0)?,
                channel: parse_col(r, 1, |s| s.parse::<Channel>().ok())?,
                account: r.get(2)?,
                from: identity_cols(r, 3, 4)?,
                at: r.get(5)?,
            })
        };
        let cid = customer.to_string();
        let res = match (conversation, channel) {
            (Some(conv), Some(ch)) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {cols} FROM messages WHERE conversation_id = ?1 AND channel = ?2 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ))
                .and_then(|mut s| {
                    s.query_row(params![conv.to_string(), ch.as_str()], row)
                        .optional()
                }),
            (Some(conv), None) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {cols} FROM messages WHERE conversation_id = ?1 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ))
                .and_then(|mut s| s.query_row([conv.to_string()], row).optional()),
            (None, Some(ch)) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {cols} FROM messages WHERE customer_id = ?1 AND channel = ?2 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ))
                .and_then(|mut s| s.query_row(params![cid, ch.as_str()], row).optional()),
            (None, None) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {cols} FROM messages WHERE customer_id = ?1 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ))
                .and_then(|mut s| s.query_row([cid], row).optional()),
        };
        res.map_err(unavailable)
    }

    fn set_message_status(&mut self, id: Uuid, status: &str) -> Result<(), StoreError> {
        self.exec(
            "UPDATE messages SET status = ?2 WHERE id = ?1",
            params![id.to_string(), status],
        )
        .map(drop)
    }

    fn merge_customers(
        &mut self,
        survivor: Uuid,
        merged: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        let (s, m) = (survivor.to_string(), merged.to_string());
        let moved = self.identities_of(merged)?;
        let moved =
            serde_json::to_string(&moved).map_err(|e| StoreError::Rejected(e.to_string()))?;
        self.exec(
            "INSERT INTO merges (survivor, merged, evidence, identities, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![s, m, evidence, moved, at],
        )?;
        self.exec(
            "UPDATE identities SET customer_id = ?1 WHERE customer_id = ?2",
            params![s, m],
        )?;
        self.exec(
            "UPDATE conversations SET customer_id = ?1 WHERE customer_id = ?2",
            params![s, m],
        )?;
        self.exec(
            "UPDATE messages SET customer_id = ?1 WHERE customer_id = ?2",
            params![s, m],
        )?;
        self.exec(
            "UPDATE message_refs SET customer_id = ?1 WHERE customer_id = ?2",
            params![s, m],
        )?;
        self.exec(
            "UPDATE customers SET merged_into = ?1 WHERE merged_into = ?2",
            params![s, m],
        )?;
        self.exec(
            "UPDATE customers SET merged_into = ?1 WHERE id = ?2",
            params![s, m],
        )
        .map(drop)
    }

    fn split_identity(
        &mut self,
        identity: &Identity,
        new_customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        let Some(old) = self.owner_of(identity)? else {
            return Ok(());
        };
        let (old_s, new_s) = (old.to_string(), new_customer.to_string());
        let (kind, value) = (identity.kind.as_str(), identity.value.as_str());
        self.exec(
            "INSERT INTO identity_splits (kind, value, from_customer, to_customer, evidence, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![kind, value, old_s, new_s, evidence, at],
        )?;
        self.attach_identity(identity, new_customer, evidence, at)?;
        // A conversation moves when every customer-side message in it is this
        // identity's: those are the ones the merge brought.
        let side = "CASE m.direction WHEN 'inbound' THEN m.from_kind || ':' || m.from_value \
                    ELSE m.to_kind || ':' || m.to_value END";
        let key = identity.key();
        let moving: Vec<String> = self
            .conn
            .prepare_cached(&format!(
                "SELECT c.id FROM conversations c WHERE c.customer_id = ?1 \
                 AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id) \
                 AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id \
                                 AND {side} <> ?2)"
            ))
            .and_then(|mut s| s.query_map(params![old_s, key], |r| r.get(0))?.collect())
            .map_err(unavailable)?;
        for conv in moving {
            self.exec(
                "UPDATE conversations SET customer_id = ?1 WHERE id = ?2",
                params![new_s, conv],
            )?;
            self.exec(
                "UPDATE message_refs SET customer_id = ?1 WHERE message_seq IN \
                 (SELECT seq FROM messages WHERE conversation_id = ?2)",
                params![new_s, conv],
            )?;
            self.exec(
                "UPDATE messages SET customer_id = ?1 WHERE conversation_id = ?2",
                params![new_s, conv],
            )?;
        }
        Ok(())
    }

    fn erase_customer(&mut self, id: Uuid, at: Millis) -> Result<Erased, StoreError> {
        let ids: Vec<String> = self
            .conn
            .prepare_cached(
                "WITH RECURSIVE family(id) AS (SELECT ?1 UNION \
                 SELECT c.id FROM customers c JOIN family f ON c.merged_into = f.id) \
                 SELECT id FROM family",
            )
            .and_then(|mut s| s.query_map([id.to_string()], |r| r.get(0))?.collect())
            .map_err(unavailable)?;
        let mut erased = Erased {
            messages: 0,
            identities: 0,
            conversations: 0,
        };
        for cid in &ids {
            self.exec("DELETE FROM message_refs WHERE customer_id = ?1", [cid])?;
            self.exec(
                "DELETE FROM message_versions WHERE message_id IN \
                 (SELECT id FROM messages WHERE customer_id = ?1)",
                [cid],
            )?;
            erased.messages +=
                self.exec("DELETE FROM messages WHERE customer_id = ?1", [cid])? as u64;
            erased.conversations +=
                self.exec("DELETE FROM conversations WHERE customer_id = ?1", [cid])? as u64;
            erased.identities +=
                self.exec("DELETE FROM identities WHERE customer_id = ?1", [cid])? as u64;
            // Merge records name identities; they are personal data too.
            self.exec(
                "UPDATE merges SET identities = '[]', evidence = 'erased' WHERE survivor = ?1 OR merged = ?1",
                [cid],
            )?;
            self.exec(
                "DELETE FROM identity_splits WHERE from_customer = ?1 OR to_customer = ?1",
                [cid],
            )?;
            self.exec(
                "UPDATE customers SET erased_at = ?2 WHERE id = ?1",
                params![cid, at],
            )?;
        }
        self.exec(
            "INSERT INTO tombstones (customer_id, erased_at, messages, identities, conversations) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (customer_id) DO UPDATE SET erased_at = excluded.erased_at",
            params![
                id.to_string(),
                at,
                erased.messages as i64,
                erased.identities as i64,
                erased.conversations as i64
            ],
        )?;
        Ok(erased)
    }

    fn first_application(&mut self, command_id: Uuid, at: Millis) -> Result<bool, StoreError> {
        self.exec(
            "INSERT INTO applied_commands (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
            params![command_id.to_string(), at],
        )
        .map(|n| n == 1)
    }

    fn push_outbox(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO outbox (topic, key, payload) VALUES (?1, ?2, ?3)",
            params![topic, key, payload],
        )
        .map(drop)
    }

    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.savepoints += 1;
        self.conn
            .execute_batch(&format!("SAVEPOINT sp{}", self.savepoints))
            .map_err(unavailable)
    }

    fn release_savepoint(&mut self) -> Result<(), StoreError> {
        let n = self.savepoints;
        self.savepoints = n.saturating_sub(1);
        self.conn
            .execute_batch(&format!("RELEASE sp{n}"))
            .map_err(unavailable)
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        let n = self.savepoints;
        self.savepoints = n.saturating_sub(1);
        self.conn
            .execute_batch(&format!("ROLLBACK TO sp{n}; RELEASE sp{n}"))
            .map_err(unavailable)
    }

    fn first_reply(
        &mut self,
        conversation: Uuid,
    ) -> Result<(Option<Uuid>, Option<Millis>), StoreError> {
        let id = conversation.to_string();
        let reply: Option<Uuid> = self
            .conn
            .prepare_cached(
                "SELECT id FROM messages WHERE conversation_id = ?1 AND direction = 'outbound' \
                 AND status IN ('sent', 'delivered', 'read') ORDER BY received_at, seq LIMIT 1",
            )
            .and_then(|mut s| s.query_row([&id], |r| uuid_col(r, 0)).optional())
            .map_err(unavailable)?;
        let first_inbound: Option<Millis> = self
            .conn
            .prepare_cached(
                "SELECT MIN(received_at) FROM messages WHERE conversation_id = ?1 \
                 AND direction = 'inbound'",
            )
            .and_then(|mut s| s.query_row([&id], |r| r.get(0)))
            .map_err(unavailable)?;
        Ok((reply, first_inbound))
    }

    fn thread_message_ids(
        &mut self,
        conversation: Uuid,
        limit: usize,
    ) -> Result<Vec<(Direction, String)>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT direction, header_id FROM messages WHERE conversation_id = ?1 \
                 AND header_id IS NOT NULL ORDER BY received_at DESC, seq DESC LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![conversation.to_string(), limit as i64], |r| {
                    let direction = parse_col(r, 0, |s| match s {
                        "inbound" => Some(Direction::Inbound),
                        "outbound" => Some(Direction::Outbound),
                        _ => None,
                    })?;
                    Ok((direction, r.get(1)?))
                })?
                .collect()
            })
            .map_err(unavailable)
    }

    fn sent_unread_up_to(
        &mut self,
        channel: Channel,
        account: &str,
        to: &Identity,
        up_to: Millis,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT o.message_id FROM outbound o JOIN messages m ON m.id = o.message_id \
                 WHERE o.to_value = ?1 AND o.channel = ?2 AND o.account = ?3 AND o.to_kind = ?4 \
                 AND o.updated_at <= ?5 AND o.state = 'sent' \
                 AND m.status IN ('sent', 'delivered') \
                 ORDER BY o.updated_at LIMIT ?6",
            )
            .and_then(|mut s| {
                s.query_map(
                    params![
                        to.value,
                        channel.as_str(),
                        account,
                        to.kind.as_str(),
                        up_to,
                        limit as i64
                    ],
                    |r| parse_col(r, 0, |s| Uuid::parse_str(s).ok()),
                )?
                .collect()
            })
            .map_err(unavailable)
    }

    fn latest_provider_thread(
        &mut self,
        conversation: Uuid,
        channel: Channel,
    ) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT provider_thread_id FROM messages WHERE conversation_id = ?1 \
                 AND direction = 'inbound' AND channel = ?2 \
                 ORDER BY received_at DESC, seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![conversation.to_string(), channel.as_str()], |r| {
                    r.get::<_, Option<String>>(0)
                })
                .optional()
            })
            .map(Option::flatten)
            .map_err(unavailable)
    }

    fn message_by_provider_id(
        &mut self,
        channel: Channel,
        account: &str,
        provider_id: &str,
    ) -> Result<Option<MessageRef>, StoreError> {
        let by_ref = |r: &Row<'_>| {
            Ok(MessageRef {
                id: uuid_col(r, 0)?,
                conversation_id: uuid_col(r, 1)?,
                customer_id: uuid_col(r, 2)?,
            })
        };
        let own = self
            .conn
            .prepare_cached(
                "SELECT id, conversation_id, customer_id FROM messages \
                 WHERE header_id = ?1 AND channel = ?2 AND account = ?3 ORDER BY seq LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![provider_id, channel.as_str(), account], by_ref)
                    .optional()
            })
            .map_err(unavailable)?;
        if own.is_some() {
            return Ok(own);
        }
        self.conn
            .prepare_cached(
                "SELECT m.id, m.conversation_id, m.customer_id FROM outbound o \
                 JOIN messages m ON m.id = o.message_id \
                 WHERE o.provider_message_id = ?1 AND o.channel = ?2 AND o.account = ?3 \
                 ORDER BY m.seq LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![provider_id, channel.as_str(), account], by_ref)
                    .optional()
            })
            .map_err(unavailable)
    }

    fn apply_change(&mut self, v: &NewVersion<'_>) -> Result<Option<i64>, StoreError> {
        let seen = self
            .conn
            .prepare_cached("SELECT 1 FROM message_versions WHERE idempotency_key = ?1")
            .and_then(|mut s| s.exists([v.idempotency_key]))
            .map_err(unavailable)?;
        if seen {
            return Ok(None);
        }
        let id = v.message_id.to_string();
        let current: Option<(String, Option<String>, i64)> = self
            .conn
            .prepare_cached("SELECT text, reactions, versions FROM messages WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })
            .map_err(unavailable)?;
        let Some((text, reactions, versions)) = current else {
            return Err(StoreError::Rejected(format!("no message {}", v.message_id)));
        };
        let (new_text, new_reactions, deleted) =
            crate::model::apply_version(&text, reactions.as_deref(), v);
        let version = versions + 1;
        self.exec(
            "INSERT INTO message_versions (message_id, version, idempotency_key, kind, by_kind, \
             by_value, previous_text, text, emoji, at, envelope) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                id,
                version,
                v.idempotency_key,
                v.kind.as_str(),
                v.by.kind.as_str(),
                v.by.value,
                text,
                v.text,
                v.emoji,
                v.at,
                v.envelope
            ],
        )?;
        self.exec(
            "UPDATE messages SET text = ?1, reactions = ?2, versions = ?3, \
             deleted_at = CASE WHEN ?4 THEN COALESCE(deleted_at, ?5) ELSE deleted_at END \
             WHERE id = ?6",
            params![new_text, new_reactions, version, deleted, v.at, id],
        )?;
        Ok(Some(version))
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT").map_err(unavailable)?;
        self.open = false;
        if let Some((trim, seq)) = self.trimmed {
            trim.deleted.fetch_max(seq, Ordering::AcqRel);
        }
        Ok(())
    }
}
