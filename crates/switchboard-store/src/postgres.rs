//! The PostgreSQL history: the same rows and answers as the SQLite store, in
//! a database that several daemon instances share.
//!
//! Types: ids are native `uuid`, times stay `bigint` milliseconds (the
//! store's [`Millis`]), outbox keys and payloads are `bytea`, everything else
//! `text`. Text columns that are keys or sorted on are `COLLATE "C"`, so they
//! compare and sort by bytes exactly like SQLite's default collation, whatever
//! the database's locale.
//!
//! Transactions:
//! - [`Store::begin`] takes a pooled connection and starts a `SERIALIZABLE`
//!   transaction. SQLite runs one writer at a time, so every invariant the
//!   router keeps there (one customer per new identity, one message per
//!   idempotency key, one application per command, no message left behind
//!   under a merged customer …) holds here because PostgreSQL guarantees the
//!   concurrent transactions behave like some serial order or fail with a
//!   serialization failure, which is [`StoreError::Unavailable`] and makes
//!   the router retry the batch.
//! - Reads that span several statements (`customer*`, `timeline`,
//!   `conversation`) run in one `REPEATABLE READ READ ONLY` transaction, so
//!   they see one committed state; they take no locks and never make a
//!   writer retry.
//! - A statement that fails aborts a PostgreSQL transaction until
//!   [`Tx::rollback_to_savepoint`]; the likely constraint failures
//!   (a duplicate customer, conversation or message) are therefore detected
//!   with `ON CONFLICT DO NOTHING` and reported as [`StoreError::Rejected`]
//!   without aborting, as a failed statement in SQLite does. Committing a
//!   transaction in which a statement failed (and was not rolled back to a
//!   savepoint) reports that failure instead of silently rolling back.
//!
//! The outbox: every row has an `owner`, the instance that wrote it (each
//! [`PgStore`] is one instance, with a fresh id); a transaction's rows are
//! written at its commit, in the order they were pushed. [`Store::outbox`]
//! claims the owner's rows, plus all rows, in order, of an owner that has
//! left one untouched for the outbox lease (a crashed or stuck instance),
//! with `FOR UPDATE SKIP LOCKED`, so two publishers never hold the same row;
//! [`Store::outbox_done`] deletes only rows this instance claimed. See
//! [`PgStore::with_outbox_lease`].

use std::collections::HashMap;
use std::time::Duration;

use postgres::types::{FromSql, ToSql};
use postgres::{Client, NoTls, Row, Statement};
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
    id          uuid PRIMARY KEY,
    created_at  bigint NOT NULL,
    merged_into uuid,
    erased_at   bigint
);
CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;
CREATE TABLE identities (
    kind        text COLLATE "C" NOT NULL,
    value       text COLLATE "C" NOT NULL,
    customer_id uuid NOT NULL,
    evidence    text NOT NULL,
    linked_at   bigint NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX identities_customer ON identities (customer_id);
CREATE TABLE conversations (
    id                   uuid PRIMARY KEY,
    -- Insertion order, which breaks ties between equal times as SQLite's
    -- rowid does.
    pos                  bigint GENERATED ALWAYS AS IDENTITY,
    customer_id          uuid NOT NULL,
    channel              text COLLATE "C" NOT NULL,
    account              text COLLATE "C" NOT NULL,
    status               text NOT NULL,
    opened_at            bigint NOT NULL,
    last_message_at      bigint NOT NULL,
    last_inbound_channel text,
    last_inbound_account text,
    resolved_at          bigint,
    subject_key          text COLLATE "C"
);
CREATE INDEX conversations_customer ON conversations (customer_id, last_message_at, pos);
CREATE TABLE messages (
    seq                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                 uuid NOT NULL UNIQUE,
    idempotency_key    text COLLATE "C" NOT NULL UNIQUE,
    customer_id        uuid NOT NULL,
    conversation_id    uuid NOT NULL,
    direction          text NOT NULL,
    channel            text COLLATE "C" NOT NULL,
    account            text NOT NULL,
    from_kind          text NOT NULL,
    from_value         text NOT NULL,
    to_kind            text NOT NULL,
    to_value           text NOT NULL,
    received_at        bigint NOT NULL,
    subject            text,
    text               text NOT NULL,
    header_id          text COLLATE "C",
    provider_thread_id text COLLATE "C",
    rule               text NOT NULL,
    status             text,
    envelope           text NOT NULL
);
CREATE INDEX messages_conversation ON messages (conversation_id, received_at, seq);
CREATE INDEX messages_customer ON messages (customer_id, received_at, seq);
CREATE INDEX messages_header_id ON messages (customer_id, header_id) WHERE header_id IS NOT NULL;
CREATE INDEX messages_provider_thread ON messages (customer_id, channel, provider_thread_id)
    WHERE provider_thread_id IS NOT NULL;
CREATE INDEX messages_inbound ON messages (customer_id, channel, received_at)
    WHERE direction = 'inbound';
CREATE TABLE message_refs (
    customer_id uuid NOT NULL,
    ref_id      text COLLATE "C" NOT NULL,
    message_seq bigint NOT NULL
);
CREATE INDEX message_refs_lookup ON message_refs (customer_id, ref_id);
CREATE INDEX message_refs_message ON message_refs (message_seq);
CREATE TABLE merges (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    survivor   uuid NOT NULL,
    merged     uuid NOT NULL,
    evidence   text NOT NULL,
    identities text NOT NULL,
    at         bigint NOT NULL
);
CREATE INDEX merges_survivor ON merges (survivor);
CREATE INDEX merges_merged ON merges (merged);
CREATE TABLE identity_splits (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text NOT NULL,
    value         text NOT NULL,
    from_customer uuid NOT NULL,
    to_customer   uuid NOT NULL,
    evidence      text NOT NULL,
    at            bigint NOT NULL
);
CREATE TABLE tombstones (
    customer_id   uuid PRIMARY KEY,
    erased_at     bigint NOT NULL,
    messages      bigint NOT NULL,
    identities    bigint NOT NULL,
    conversations bigint NOT NULL
);
CREATE TABLE applied_commands (
    id uuid PRIMARY KEY,
    at bigint NOT NULL
);
CREATE TABLE outbox (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic      text NOT NULL,
    key        bytea NOT NULL,
    payload    bytea NOT NULL,
    -- The instance that publishes it: its writer, or the one that took it
    -- over after the lease ran out.
    owner      uuid NOT NULL,
    -- Handed out by `outbox()` (only claimed rows are forgotten by
    -- `outbox_done()`).
    claimed    boolean NOT NULL DEFAULT false,
    touched_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_owner ON outbox (owner, seq);
CREATE TABLE outbound (
    idempotency_key     text COLLATE "C" PRIMARY KEY,
    message_id          uuid NOT NULL,
    conversation_id     uuid NOT NULL,
    customer_id         uuid NOT NULL,
    channel             text NOT NULL,
    account             text NOT NULL,
    to_kind             text NOT NULL,
    to_value            text NOT NULL,
    state               text NOT NULL,
    attempts            bigint NOT NULL,
    provider_message_id text,
    error               text,
    request             text NOT NULL,
    created_at          bigint NOT NULL,
    updated_at          bigint NOT NULL
);
CREATE INDEX outbound_message ON outbound (message_id);
"#,
    r#"
-- Lookups of a customer's (or a conversation's) latest inbound message, which
-- the dispatcher makes for every request.
CREATE INDEX messages_inbound_by_conversation ON messages (conversation_id, received_at, seq)
    WHERE direction = 'inbound';
CREATE INDEX messages_inbound_by_customer ON messages (customer_id, received_at, seq)
    WHERE direction = 'inbound';
-- Takeover of outbox rows whose owner let the lease run out.
CREATE INDEX outbox_touched ON outbox (touched_at);
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
    account     text NOT NULL,
    mailbox     text NOT NULL,
    uidvalidity bigint NOT NULL,
    last_uid    bigint NOT NULL,
    updated_at  bigint NOT NULL,
    PRIMARY KEY (account, mailbox)
);
"#,
    r#"
-- Changes to stored messages (edits, reactions, deletions): each is a
-- version keeping the text it replaced, applied once per idempotency key.
ALTER TABLE messages ADD COLUMN versions bigint NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN reactions text;
ALTER TABLE messages ADD COLUMN deleted_at bigint;
CREATE TABLE message_versions (
    message_id      uuid NOT NULL,
    version         bigint NOT NULL,
    idempotency_key text COLLATE "C" NOT NULL UNIQUE,
    kind            text NOT NULL,
    by_kind         text NOT NULL,
    by_value        text NOT NULL,
    previous_text   text NOT NULL,
    text            text,
    emoji           text,
    at              bigint NOT NULL,
    envelope        text NOT NULL,
    PRIMARY KEY (message_id, version)
);
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
-- The outbox is a queue: every row is inserted, claimed (updated) and
-- deleted within seconds. Room on each page keeps claims HOT, and vacuuming
-- after a fixed number of dead rows (not a fraction of a small table) keeps
-- the claim's index scans from wading through dead entries.
ALTER TABLE outbox SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 2000, autovacuum_vacuum_cost_delay = 0);
"#,
    r#"
-- A message id (header_id) names one message, so the lookup by customer and
-- message id is served by messages_provider_id (header_id) with the customer
-- checked on the row. This index was a second random-keyed b-tree written for
-- every email message (docs/benchmarks.md).
DROP INDEX messages_header_id;
"#,
];

/// How long an outbox row may go untouched by its owner before another
/// instance takes it over, unless [`PgStore::with_outbox_lease`] says
/// otherwise.
pub const DEFAULT_OUTBOX_LEASE: Duration = Duration::from_secs(60);

/// How long a caller waits for a pooled connection (or for a new one).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL store: a pool of connections, each a session of its own.
/// Write transactions run concurrently (up to the pool size) at
/// `SERIALIZABLE`; see the module documentation.
pub struct PgStore {
    /// Always `Some` until dropped (see `Drop`).
    pool: Option<r2d2::Pool<Manager>>,
    instance: Uuid,
    outbox_lease: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("instance", &self.instance)
            .field("outbox_lease", &self.outbox_lease)
            .finish_non_exhaustive()
    }
}

/// Opens connections for the pool.
struct Manager {
    config: postgres::Config,
}

/// A pooled session with its prepared statements.
struct PgConn {
    client: Client,
    statements: HashMap<String, Statement>,
    /// Set when the session's state is unknown (a failed COMMIT or
    /// ROLLBACK); the pool then discards it.
    broken: bool,
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.config.connect(NoTls)?,
            statements: HashMap::new(),
            broken: false,
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(drop)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.broken || conn.client.is_closed()
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgConn {
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Forgets prepared statements the server no longer knows or whose
    /// result shape changed (another instance migrated the schema).
    fn check(&mut self, e: postgres::Error) -> postgres::Error {
        let stale = e.code().is_some_and(|c| {
            *c == postgres::error::SqlState::FEATURE_NOT_SUPPORTED
                || *c == postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME
        });
        if stale {
            self.statements.clear();
        }
        e
    }

    fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        let stmt = self.statement(sql).map_err(|e| self.check(e))?;
        self.client.query(&stmt, params).map_err(|e| self.check(e))
    }

    fn query_first(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64, postgres::Error> {
        let stmt = self.statement(sql).map_err(|e| self.check(e))?;
        self.client
            .execute(&stmt, params)
            .map_err(|e| self.check(e))
    }

    /// Runs transaction control; the session is discarded if it fails, as
    /// its transaction state is then unknown.
    fn control(&mut self, sql: &str) -> Result<(), StoreError> {
        self.client.batch_execute(sql).map_err(|e| {
            self.broken = true;
            pg_err(e)
        })
    }
}

/// Maps a PostgreSQL error to the store's: by SQLSTATE class, what a retry
/// may fix (connection, resources, serialization failures, deadlocks, a
/// server shutting down, a standby that cannot write) is `Unavailable`;
/// constraint, data and statement errors are `Rejected`.
fn pg_err(e: postgres::Error) -> StoreError {
    let Some(code) = e.code() else {
        // No SQLSTATE: the client failed. A parameter or column that does
        // not convert is a bug and fails again; anything else is the
        // connection.
        let msg = e.to_string();
        return if msg.starts_with("error serializing") || msg.starts_with("error deserializing") {
            StoreError::Rejected(msg)
        } else {
            StoreError::Unavailable(msg)
        };
    };
    let code = code.code();
    let retryable = match &code[..2] {
        // Connection exception; transaction rollback (serialization failure,
        // deadlock, statement completion unknown); insufficient resources;
        // operator intervention (shutdown, cancel, statement timeout); system
        // error; internal error (as SQLite's I/O and corruption errors are).
        "08" | "53" | "57" | "58" | "XX" => true,
        "40" => code != "40002",
        // Lock not available, object in use.
        "55" => code == "55P03" || code == "55006",
        // Read-only transaction (a standby after failover), idle-in-transaction
        // timeout, a transaction aborted by an earlier failure.
        "25" => matches!(code, "25006" | "25P03" | "25P02"),
        // A prepared statement the server lost or whose result changed
        // (another instance migrated); the cache was cleared, so a retry
        // prepares it again.
        "26" => true,
        "0A" => e
            .as_db_error()
            .is_some_and(|db| db.message().starts_with("cached plan must not change")),
        _ => false,
    };
    let msg = match e.as_db_error() {
        Some(db) => format!("{} ({code}): {}", db.severity(), db.message()),
        None => e.to_string(),
    };
    if retryable {
        StoreError::Unavailable(msg)
    } else {
        StoreError::Rejected(msg)
    }
}

fn pool_err(e: r2d2::Error) -> StoreError {
    StoreError::Unavailable(format!("no database connection: {e}"))
}

/// PostgreSQL text cannot hold NUL characters; SQLite's can. A value with
/// one is refused before it reaches the server, so the transaction goes on
/// (as after a failed statement in SQLite).
fn check_text<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> Result<(), StoreError> {
    for v in values.into_iter().flatten() {
        if v.contains('\0') {
            return Err(StoreError::Rejected(format!(
                "text with a NUL character cannot be stored: {v:?}"
            )));
        }
    }
    Ok(())
}

/// A lookup by a value with a NUL character finds nothing: none is stored.
fn has_nul(values: &[&str]) -> bool {
    values.iter().any(|v| v.contains('\0'))
}

/// Runs `f` on a thread outside any tokio runtime: the synchronous client
/// blocks on a runtime of its own, which tokio refuses inside another one
/// (dropping a client does too).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl PgStore {
    /// The newest schema version this build knows.
    pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

    /// Connects to the database at `url` (a `postgres://` URL or a
    /// `key=value` connection string) with a pool of at most `pool_size`
    /// connections, and applies pending migrations. Several instances may
    /// open the same database at once: migrations run in one transaction
    /// under an advisory lock, and the version is kept in `schema_version`.
    ///
    /// Call it off the async runtime (`spawn_blocking`), like every method.
    pub fn open(url: &str, pool_size: u32) -> Result<PgStore, StoreError> {
        if pool_size == 0 {
            return Err(StoreError::Rejected(
                "the connection pool needs at least one connection".into(),
            ));
        }
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Rejected(format!("bad PostgreSQL URL: {e}")))?;
        if config.get_application_name().is_none() {
            config.application_name("switchboard");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECTION_TIMEOUT);
        }
        let pool = r2d2::Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(1))
            .connection_timeout(CONNECTION_TIMEOUT)
            .error_handler(Box::new(LogErrors))
            .build(Manager { config })
            .map_err(pool_err)?;
        let store = PgStore {
            pool: Some(pool),
            instance: Uuid::now_v7(),
            outbox_lease: DEFAULT_OUTBOX_LEASE,
        };
        let mut conn = store.conn()?;
        migrate(&mut conn)?;
        drop(conn);
        Ok(store)
    }

    /// Sets how long outbox rows may stay untouched by their owner (not
    /// listed by its [`Store::outbox`], not yet published) before another
    /// instance takes them over. An instance that stalls longer than this
    /// while publishing may see its events published twice (consumers
    /// deduplicate on event ids); one that crashed has its events published
    /// by the others after this long.
    pub fn with_outbox_lease(mut self, lease: Duration) -> Self {
        self.outbox_lease = lease;
        self
    }

    /// Sets this instance's id, the owner of the outbox rows it writes
    /// (by default a new one at every open). A stable id lets a restarted
    /// instance publish what it left in the outbox at once instead of
    /// after the lease; two instances running at the same time must never
    /// share one.
    pub fn with_instance_id(mut self, id: Uuid) -> Self {
        self.instance = id;
        self
    }

    /// This instance's id, the owner of the outbox rows it writes.
    pub fn instance_id(&self) -> Uuid {
        self.instance
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let mut conn = self.conn()?;
        let row = conn
            .query_first("SELECT COALESCE(max(version), 0) FROM schema_version", &[])
            .map_err(pg_err)?;
        row.map_or(Ok(0), |r| col(&r, 0))
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        match &self.pool {
            Some(pool) => pool.get().map_err(pool_err),
            None => Err(StoreError::Unavailable("the store is closed".into())),
        }
    }

    /// Runs reads in one `REPEATABLE READ READ ONLY` transaction, so they
    /// all see the same committed state.
    fn snapshot<T>(
        &self,
        f: impl FnOnce(&mut PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn()?;
        conn.control("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        let res = f(&mut conn);
        let end = conn.control(if res.is_ok() { "COMMIT" } else { "ROLLBACK" });
        let value = res?;
        end?;
        Ok(value)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing a connection blocks on the client's own runtime: do it
        // where that is allowed even when the store is dropped in async code.
        if let Some(pool) = self.pool.take() {
            off_runtime(move || drop(pool));
        }
    }
}

/// Logs connection failures the pool meets while filling itself.
#[derive(Debug)]
struct LogErrors;

impl r2d2::HandleError<postgres::Error> for LogErrors {
    fn handle_error(&self, error: postgres::Error) {
        tracing::warn!(%error, "cannot open a PostgreSQL connection");
    }
}

fn migrate(conn: &mut PgConn) -> Result<(), StoreError> {
    conn.control("BEGIN")?;
    let res = apply_migrations(conn);
    match res {
        Ok(applied) => {
            conn.control("COMMIT")?;
            for v in applied {
                tracing::info!(version = v, "applied store migration");
            }
            Ok(())
        }
        Err(e) => {
            if let Err(error) = conn.control("ROLLBACK") {
                tracing::warn!(%error, "rollback of a failed migration failed");
            }
            Err(e)
        }
    }
}

fn apply_migrations(conn: &mut PgConn) -> Result<Vec<i64>, StoreError> {
    // One migrator at a time per schema; the others wait and then find the
    // schema current. The lock ends with the transaction.
    conn.client
        .batch_execute(
            "SELECT pg_advisory_xact_lock(hashtext('switchboard.migrate'), \
                                          hashtext(current_schema()));
             CREATE TABLE IF NOT EXISTS schema_version (
                 version    bigint PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .map_err(pg_err)?;
    let version: i64 = conn
        .client
        .query_one("SELECT COALESCE(max(version), 0) FROM schema_version", &[])
        .map_err(pg_err)
        .and_then(|r| col(&r, 0))?;
    if version > PgStore::SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: version,
            supported: PgStore::SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let v = i as i64 + 1;
        conn.client.batch_execute(sql).map_err(pg_err)?;
        conn.client
            .execute("INSERT INTO schema_version (version) VALUES ($1)", &[&v])
            .map_err(pg_err)?;
        applied.push(v);
    }
    Ok(applied)
}

fn col<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| StoreError::Rejected(format!("column {idx}: {e}")))
}

fn parse_col<T>(row: &Row, idx: usize, parse: impl Fn(&str) -> Option<T>) -> Result<T, StoreError> {
    let s: &str = col(row, idx)?;
    parse(s).ok_or_else(|| StoreError::Rejected(format!("column {idx}: unexpected value {s:?}")))
}

/// A message's id, conversation and customer from three columns from `at`.
fn message_ref_cols(row: &Row, at: usize) -> Result<MessageRef, StoreError> {
    Ok(MessageRef {
        id: col(row, at)?,
        conversation_id: col(row, at + 1)?,
        customer_id: col(row, at + 2)?,
    })
}

fn identity_cols(row: &Row, kind: usize, value: usize) -> Result<Identity, StoreError> {
    Ok(Identity {
        kind: parse_col(row, kind, |s| s.parse::<IdentityKind>().ok())?,
        value: col(row, value)?,
    })
}

const CONVERSATION_COLS: &str = "id, customer_id, channel, account, status, opened_at, \
    last_message_at, last_inbound_channel, last_inbound_account, resolved_at, subject_key";

fn conversation_row(row: &Row) -> Result<Conversation, StoreError> {
    let last_inbound: Option<&str> = col(row, 7)?;
    Ok(Conversation {
        id: col(row, 0)?,
        customer_id: col(row, 1)?,
        channel: parse_col(row, 2, |s| s.parse().ok())?,
        account: col(row, 3)?,
        status: ConversationStatus::parse(col(row, 4)?),
        opened_at: col(row, 5)?,
        last_message_at: col(row, 6)?,
        last_inbound_channel: last_inbound.and_then(|s| s.parse().ok()),
        last_inbound_account: col(row, 8)?,
        resolved_at: col(row, 9)?,
        subject_key: col(row, 10)?,
    })
}

const OUTBOUND_COLS: &str = "idempotency_key, message_id, conversation_id, customer_id, channel, \
    account, to_kind, to_value, state, attempts, provider_message_id, error, created_at, updated_at";

fn outbound_row(row: &Row) -> Result<OutboundRecord, StoreError> {
    let attempts: i64 = col(row, 9)?;
    Ok(OutboundRecord {
        idempotency_key: col(row, 0)?,
        message_id: col(row, 1)?,
        conversation_id: col(row, 2)?,
        customer_id: col(row, 3)?,
        channel: parse_col(row, 4, |s| s.parse::<Channel>().ok())?,
        account: col(row, 5)?,
        to: identity_cols(row, 6, 7)?,
        state: parse_col(row, 8, OutboundState::parse)?,
        attempts: u32::try_from(attempts)
            .map_err(|_| StoreError::Rejected(format!("attempts out of range: {attempts}")))?,
        provider_message_id: col(row, 10)?,
        error: col(row, 11)?,
        created_at: col(row, 12)?,
        updated_at: col(row, 13)?,
    })
}

const MESSAGE_COLS: &str = "id, seq, idempotency_key, customer_id, conversation_id, direction, \
    channel, account, from_kind, from_value, to_kind, to_value, received_at, subject, text, rule, \
    status, header_id, versions, reactions, deleted_at";

fn message_row(row: &Row) -> Result<StoredMessage, StoreError> {
    Ok(StoredMessage {
        id: col(row, 0)?,
        seq: col(row, 1)?,
        idempotency_key: col(row, 2)?,
        customer_id: col(row, 3)?,
        conversation_id: col(row, 4)?,
        direction: parse_col(row, 5, |s| match s {
            "inbound" => Some(Direction::Inbound),
            "outbound" => Some(Direction::Outbound),
            _ => None,
        })?,
        channel: parse_col(row, 6, |s| s.parse::<Channel>().ok())?,
        account: col(row, 7)?,
        from: identity_cols(row, 8, 9)?,
        to: identity_cols(row, 10, 11)?,
        received_at: col(row, 12)?,
        subject: col(row, 13)?,
        text: col(row, 14)?,
        rule: parse_col(row, 15, ThreadRule::parse)?,
        status: col(row, 16)?,
        message_id: col(row, 17)?,
        versions: col(row, 18)?,
        reactions: crate::model::parse_reactions(col::<Option<&str>>(row, 19)?),
        deleted_at: col(row, 20)?,
    })
}

fn rows<T>(
    rows: Vec<Row>,
    f: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(f).collect()
}

fn follow_merges(conn: &mut PgConn, mut id: Uuid) -> Result<Option<Uuid>, StoreError> {
    // A merge chain is short; the bound guards against a cycle in bad data.
    for _ in 0..64 {
        let row = conn
            .query_first("SELECT merged_into FROM customers WHERE id = $1", &[&id])
            .map_err(pg_err)?;
        match row {
            None => return Ok(None),
            Some(r) => match col::<Option<Uuid>>(&r, 0)? {
                None => return Ok(Some(id)),
                Some(next) => id = next,
            },
        }
    }
    Ok(Some(id))
}

fn load_customer(conn: &mut PgConn, id: Uuid) -> Result<Option<Customer>, StoreError> {
    let Some(id) = follow_merges(conn, id)? else {
        return Ok(None);
    };
    let Some(row) = conn
        .query_first(
            "SELECT created_at, erased_at FROM customers WHERE id = $1",
            &[&id],
        )
        .map_err(pg_err)?
    else {
        return Ok(None);
    };
    let identities = conn
        .query(
            "SELECT kind, value FROM identities WHERE customer_id = $1 ORDER BY kind, value",
            &[&id],
        )
        .map_err(pg_err)?;
    let merged_from = conn
        .query(
            "SELECT merged FROM merges WHERE survivor = $1 ORDER BY id",
            &[&id],
        )
        .map_err(pg_err)?;
    Ok(Some(Customer {
        id,
        created_at: col(&row, 0)?,
        identities: rows(identities, |r| identity_cols(r, 0, 1))?,
        merged_from: rows(merged_from, |r| col(r, 0))?,
        erased_at: col(&row, 1)?,
    }))
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Store for PgStore {
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError> {
        let mut conn = self.conn()?;
        conn.control("BEGIN ISOLATION LEVEL SERIALIZABLE")?;
        Ok(Box::new(PgTx {
            conn,
            instance: self.instance,
            open: true,
            savepoints: 0,
            failed: None,
            outbox: Vec::new(),
            outbox_marks: Vec::new(),
            known: Known::default(),
        }))
    }

    fn customer(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        self.snapshot(|conn| load_customer(conn, id))
    }

    fn customer_by_identity(&self, identity: &Identity) -> Result<Option<Customer>, StoreError> {
        if has_nul(&[&identity.value]) {
            return Ok(None);
        }
        self.snapshot(|conn| {
            let owner = conn
                .query_first(
                    "SELECT customer_id FROM identities WHERE kind = $1 AND value = $2",
                    &[&identity.kind.as_str(), &identity.value],
                )
                .map_err(pg_err)?;
            match owner {
                Some(r) => load_customer(conn, col(&r, 0)?),
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
        self.snapshot(|conn| {
            let Some(customer_id) = follow_merges(conn, customer)? else {
                return Ok(None);
            };
            let conversations = conn
                .query(
                    &format!(
                        "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = $1 \
                         ORDER BY last_message_at DESC, id"
                    ),
                    &[&customer_id],
                )
                .map_err(pg_err)?;
            let conversations = rows(conversations, conversation_row)?;
            // Keyset pagination on (message time, arrival): pages never skip
            // or repeat, and each costs the same however deep it is.
            let (after_at, after_seq) =
                after.map_or((i64::MIN, i64::MIN), |c| (c.received_at, c.seq));
            let messages = conn
                .query(
                    &format!(
                        "SELECT {MESSAGE_COLS} FROM messages WHERE customer_id = $1 \
                         AND (received_at, seq) > ($2, $3) ORDER BY received_at, seq LIMIT $4"
                    ),
                    &[
                        &customer_id,
                        &after_at,
                        &after_seq,
                        &limit_param(limit).saturating_add(1),
                    ],
                )
                .map_err(pg_err)?;
            let mut messages = rows(messages, message_row)?;
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
        self.snapshot(|conn| {
            let Some(conv) = conn
                .query_first(
                    &format!("SELECT {CONVERSATION_COLS} FROM conversations WHERE id = $1"),
                    &[&id],
                )
                .map_err(pg_err)?
            else {
                return Ok(None);
            };
            let messages = conn
                .query(
                    &format!(
                        "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = $1 \
                         ORDER BY received_at, seq"
                    ),
                    &[&id],
                )
                .map_err(pg_err)?;
            Ok(Some((
                conversation_row(&conv)?,
                rows(messages, message_row)?,
            )))
        })
    }

    fn message_versions(&self, message_id: Uuid) -> Result<Vec<MessageVersion>, StoreError> {
        let mut conn = self.conn()?;
        let found = conn
            .query(
                "SELECT version, kind, by_kind, by_value, previous_text, text, emoji, at \
                 FROM message_versions WHERE message_id = $1 ORDER BY version",
                &[&message_id],
            )
            .map_err(pg_err)?;
        rows(found, |r| {
            Ok(MessageVersion {
                version: col(r, 0)?,
                kind: parse_col(r, 1, switchboard_core::MessageChangeKind::parse)?,
                by: identity_cols(r, 2, 3)?,
                previous_text: col(r, 4)?,
                text: col(r, 5)?,
                emoji: col(r, 6)?,
                at: col(r, 7)?,
            })
        })
    }

    fn outbound_by_key(&self, key: &str) -> Result<Option<OutboundRecord>, StoreError> {
        if has_nul(&[key]) {
            return Ok(None);
        }
        let mut conn = self.conn()?;
        conn.query_first(
            &format!("SELECT {OUTBOUND_COLS} FROM outbound WHERE idempotency_key = $1"),
            &[&key],
        )
        .map_err(pg_err)?
        .map(|r| outbound_row(&r))
        .transpose()
    }

    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError> {
        let lease_ms = i64::try_from(self.outbox_lease.as_millis()).unwrap_or(i64::MAX);
        let mut conn = self.conn()?;
        // Own rows first, on the (owner, seq) index; then, if there is
        // room, the rows of owners that let the lease run out on one of
        // them. One OR over both made the planner walk the whole table.
        // Each statement is atomic: it skips rows another publisher is
        // claiming right now. Claiming renews the lease of a row touched
        // more than a quarter lease ago; a fresher row keeps its time, so
        // the update changes no indexed column and stays on its page (a HOT
        // update, no new index entries to wade through). A publisher
        // looking for lapsed owners after another took them over finds the
        // rows owned and touched anew and leaves them. The claimed seqs are
        // matched with `= ANY(ARRAY(…))`, never a join: a join's cached
        // plan, made while the table was nearly empty, could become a
        // sequential scan of the whole (bloated) outbox, about 0.9 s a
        // claim (docs/benchmarks.md, fourth session).
        let mut claimed = conn
            .query(
                "UPDATE outbox o SET claimed = true, \
                     touched_at = CASE WHEN o.touched_at < clock_timestamp() - $3::bigint * interval '1 millisecond' \
                                  THEN clock_timestamp() ELSE o.touched_at END \
                 WHERE o.seq = ANY(ARRAY(SELECT seq FROM outbox WHERE owner = $1 \
                       ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)) \
                 RETURNING o.seq, o.topic, o.key, o.payload",
                &[&self.instance, &limit_param(limit), &(lease_ms / 4)],
            )
            .map_err(pg_err)?;
        if claimed.len() < limit {
            // Owners with a row past the lease (found on the touched_at
            // index) are taken over whole, in seq order, so one owner's
            // events keep their order even when some of its rows were
            // renewed more recently than others.
            let lapsed: Vec<Uuid> = conn
                .query(
                    "SELECT DISTINCT owner FROM outbox \
                     WHERE touched_at < clock_timestamp() - $2::bigint * interval '1 millisecond' \
                       AND owner <> $1 \
                     LIMIT 16",
                    &[&self.instance, &lease_ms],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| col(r, 0))
                .collect::<Result<_, _>>()?;
            for dead in lapsed {
                let room = limit - claimed.len();
                if room == 0 {
                    break;
                }
                claimed.extend(
                    conn.query(
                        "UPDATE outbox o SET owner = $1, claimed = true, touched_at = clock_timestamp() \
                         WHERE o.seq = ANY(ARRAY(SELECT seq FROM outbox WHERE owner = $2 \
                               ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)) \
                         RETURNING o.seq, o.topic, o.key, o.payload",
                        &[&self.instance, &dead, &limit_param(room)],
                    )
                    .map_err(pg_err)?,
                );
            }
        }
        let mut records = rows(claimed, |r| {
            Ok(OutboxRecord {
                seq: col(r, 0)?,
                topic: col(r, 1)?,
                key: col(r, 2)?,
                payload: col(r, 3)?,
            })
        })?;
        records.sort_by_key(|r| r.seq);
        Ok(records)
    }

    fn outbox_done(&self, seq: i64) -> Result<(), StoreError> {
        // Only rows this instance claimed: a row with a lower seq that
        // committed after `outbox()` read (sequence order is not commit
        // order here) was not published and stays.
        let mut conn = self.conn()?;
        conn.execute(
            "DELETE FROM outbox WHERE owner = $1 AND claimed AND seq <= $2",
            &[&self.instance, &seq],
        )
        .map(drop)
        .map_err(pg_err)
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let row = conn
            .query_first(
                "SELECT NOT EXISTS (SELECT 1 FROM customers) \
                 AND NOT EXISTS (SELECT 1 FROM messages)",
                &[],
            )
            .map_err(pg_err)?;
        row.map_or(Ok(true), |r| col(&r, 0))
    }

    fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        conn.query_first("SELECT 1", &[]).map(drop).map_err(pg_err)
    }

    fn mailbox_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<crate::MailboxCheckpoint>, StoreError> {
        if has_nul(&[account, mailbox]) {
            return Ok(None);
        }
        {
            let mut conn = self.conn()?;
            let row = conn
                .query_first(
                    "SELECT uidvalidity, last_uid FROM mailbox_checkpoints \
                     WHERE account = $1 AND mailbox = $2",
                    &[&account, &mailbox],
                )
                .map_err(pg_err)?;
            row.map(|r| {
                let uidvalidity: i64 = col(&r, 0)?;
                let last_uid: i64 = col(&r, 1)?;
                let u32_of = |v: i64| {
                    u32::try_from(v).map_err(|_| {
                        StoreError::Rejected(format!("stored uid {v} is out of range"))
                    })
                };
                Ok(crate::MailboxCheckpoint {
                    uidvalidity: u32_of(uidvalidity)?,
                    last_uid: u32_of(last_uid)?,
                })
            })
            .transpose()
        }
    }

    fn set_mailbox_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
        cp: crate::MailboxCheckpoint,
    ) -> Result<(), StoreError> {
        check_text([Some(account), Some(mailbox)])?;
        {
            let mut conn = self.conn()?;
            conn.execute(
                "INSERT INTO mailbox_checkpoints (account, mailbox, uidvalidity, last_uid, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account, mailbox) DO UPDATE SET \
                 uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, \
                 updated_at = excluded.updated_at",
                &[
                    &account,
                    &mailbox,
                    &i64::from(cp.uidvalidity),
                    &i64::from(cp.last_uid),
                    &chrono::Utc::now().timestamp_millis(),
                ],
            )
            .map(drop)
            .map_err(pg_err)
        }
    }
}

struct PgTx {
    conn: r2d2::PooledConnection<Manager>,
    instance: Uuid,
    open: bool,
    savepoints: usize,
    /// The first server-side failure not yet rolled back to a savepoint:
    /// PostgreSQL refuses everything but a rollback after it.
    failed: Option<StoreError>,
    /// Outbox rows pushed in this transaction, written by one statement at
    /// commit (nothing reads them before): a round trip per event saved.
    outbox: Vec<(String, Vec<u8>, Vec<u8>)>,
    /// The outbox length at each open savepoint, to undo pushes with it.
    outbox_marks: Vec<usize>,
    /// Lookups answered ahead by [`Tx::prefetch`].
    known: Known,
}

/// Idempotency keys and identity owners read for a whole batch at once
/// ([`Tx::prefetch`]): one round trip instead of one per message. This
/// transaction's own writes keep them current (a stored message, an
/// attached identity); anything else that could change them (a merge, a
/// split, an erasure, a rollback to a savepoint) forgets them all, and
/// later lookups go to the database again. Reading a set of rows at
/// `SERIALIZABLE` takes the same predicate locks as reading each, so a
/// concurrent writer still conflicts as before.
#[derive(Default)]
struct Known {
    keys: HashMap<String, Option<MessageRef>>,
    owners: HashMap<Identity, Option<Uuid>>,
}

impl Known {
    fn forget(&mut self) {
        self.keys.clear();
        self.owners.clear();
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if self.open
            && let Err(error) = self.conn.control("ROLLBACK")
        {
            tracing::warn!(%error, "rollback failed");
        }
    }
}

fn copy_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Rejected(m) => StoreError::Rejected(m.clone()),
        StoreError::TooNew { found, supported } => StoreError::TooNew {
            found: *found,
            supported: *supported,
        },
    }
}

impl PgTx {
    fn fail(&mut self, e: postgres::Error) -> StoreError {
        let e = pg_err(e);
        if self.failed.is_none() {
            self.failed = Some(copy_err(&e));
        }
        e
    }

    fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        match self.conn.query(sql, params) {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn query_first(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn exec(&mut self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        match self.conn.execute(sql, params) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn control(&mut self, sql: &str) -> Result<(), StoreError> {
        match self.conn.client.batch_execute(sql) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn uuid_query(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Uuid>, StoreError> {
        self.query_first(sql, params)?
            .map(|r| col(&r, 0))
            .transpose()
    }

    fn conversation_query(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Conversation>, StoreError> {
        self.query_first(sql, params)?
            .map(|r| conversation_row(&r))
            .transpose()
    }

    fn inbound_query(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<LastInbound>, StoreError> {
        let Some(r) = self.query_first(sql, params)? else {
            return Ok(None);
        };
        Ok(Some(LastInbound {
            conversation_id: col(&r, 0)?,
            channel: parse_col(&r, 1, |s| s.parse::<Channel>().ok())?,
            account: col(&r, 2)?,
            from: identity_cols(&r, 3, 4)?,
            at: col(&r, 5)?,
        }))
    }
}

impl Tx for PgTx {
    fn prefetch(&mut self, keys: &[&str], identities: &[&Identity]) -> Result<(), StoreError> {
        let keys: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !has_nul(&[k]) && !self.known.keys.contains_key(*k))
            .collect();
        if !keys.is_empty() {
            let found = self.query(
                "SELECT idempotency_key, id, conversation_id, customer_id FROM messages \
                 WHERE idempotency_key = ANY($1)",
                &[&keys],
            )?;
            for k in &keys {
                self.known.keys.insert((*k).to_owned(), None);
            }
            for r in found {
                let key: String = col(&r, 0)?;
                self.known.keys.insert(key, Some(message_ref_cols(&r, 1)?));
            }
        }
        let wanted: Vec<&Identity> = identities
            .iter()
            .copied()
            .filter(|i| !has_nul(&[&i.value]) && !self.known.owners.contains_key(*i))
            .collect();
        if !wanted.is_empty() {
            let kinds: Vec<&str> = wanted.iter().map(|i| i.kind.as_str()).collect();
            let values: Vec<&str> = wanted.iter().map(|i| i.value.as_str()).collect();
            let found = self.query(
                "SELECT i.kind, i.value, i.customer_id FROM identities i \
                 JOIN unnest($1::text[], $2::text[]) AS w(kind, value) \
                 ON i.kind = w.kind COLLATE \"C\" AND i.value = w.value COLLATE \"C\"",
                &[&kinds, &values],
            )?;
            for i in wanted {
                self.known.owners.insert(i.clone(), None);
            }
            for r in found {
                let identity = identity_cols(&r, 0, 1)?;
                self.known.owners.insert(identity, Some(col(&r, 2)?));
            }
        }
        Ok(())
    }

    fn message_by_key(&mut self, key: &str) -> Result<Option<MessageRef>, StoreError> {
        if has_nul(&[key]) {
            return Ok(None);
        }
        if let Some(known) = self.known.keys.get(key) {
            return Ok(*known);
        }
        let Some(r) = self.query_first(
            "SELECT id, conversation_id, customer_id FROM messages WHERE idempotency_key = $1",
            &[&key],
        )?
        else {
            return Ok(None);
        };
        message_ref_cols(&r, 0).map(Some)
    }

    fn owner_of(&mut self, identity: &Identity) -> Result<Option<Uuid>, StoreError> {
        if has_nul(&[&identity.value]) {
            return Ok(None);
        }
        if let Some(known) = self.known.owners.get(identity) {
            return Ok(*known);
        }
        self.uuid_query(
            "SELECT customer_id FROM identities WHERE kind = $1 AND value = $2",
            &[&identity.kind.as_str(), &identity.value],
        )
    }

    fn resolve_customer(&mut self, mut id: Uuid) -> Result<Option<Uuid>, StoreError> {
        // As `follow_merges`, through the transaction's failure tracking.
        for _ in 0..64 {
            let row =
                self.query_first("SELECT merged_into FROM customers WHERE id = $1", &[&id])?;
            match row {
                None => return Ok(None),
                Some(r) => match col::<Option<Uuid>>(&r, 0)? {
                    None => return Ok(Some(id)),
                    Some(next) => id = next,
                },
            }
        }
        Ok(Some(id))
    }

    fn is_erased(&mut self, id: Uuid) -> Result<bool, StoreError> {
        match self.query_first(
            "SELECT erased_at IS NOT NULL FROM customers WHERE id = $1",
            &[&id],
        )? {
            Some(r) => col(&r, 0),
            None => Ok(false),
        }
    }

    fn create_customer(&mut self, id: Uuid, at: Millis) -> Result<(), StoreError> {
        // A second customer with the same id is refused without aborting the
        // transaction. A concurrent transaction creating it makes this one
        // fail to serialize (retryable) instead.
        let n = self.exec(
            "INSERT INTO customers (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            &[&id, &at],
        )?;
        if n == 0 {
            return Err(StoreError::Rejected(format!(
                "customer {id} exists already"
            )));
        }
        Ok(())
    }

    fn attach_identity(
        &mut self,
        identity: &Identity,
        customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        check_text([Some(identity.value.as_str()), Some(evidence)])?;
        // The primary key keeps one owner per identity. Two transactions
        // that both found the identity unowned and race to attach it cannot
        // both commit: at SERIALIZABLE the second fails to serialize and is
        // retried, then finds the first one's owner.
        self.exec(
            "INSERT INTO identities (kind, value, customer_id, evidence, linked_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (kind, value) DO UPDATE SET customer_id = excluded.customer_id, \
             evidence = excluded.evidence, linked_at = excluded.linked_at",
            &[
                &identity.kind.as_str(),
                &identity.value,
                &customer,
                &evidence,
                &at,
            ],
        )?;
        self.known.owners.insert(identity.clone(), Some(customer));
        Ok(())
    }

    fn identities_of(&mut self, customer: Uuid) -> Result<Vec<Identity>, StoreError> {
        let found = self.query(
            "SELECT kind, value FROM identities WHERE customer_id = $1 ORDER BY kind, value",
            &[&customer],
        )?;
        rows(found, |r| identity_cols(r, 0, 1))
    }

    fn conversation(&mut self, id: Uuid) -> Result<Option<Conversation>, StoreError> {
        self.conversation_query(
            &format!("SELECT {CONVERSATION_COLS} FROM conversations WHERE id = $1"),
            &[&id],
        )
    }

    fn conversation_by_message_id(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        if has_nul(&[message_id]) {
            return Ok(None);
        }
        self.uuid_query(
            "SELECT conversation_id FROM messages WHERE customer_id = $1 AND header_id = $2 \
             ORDER BY seq DESC LIMIT 1",
            &[&customer, &message_id],
        )
    }

    fn conversation_referencing(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        if has_nul(&[message_id]) {
            return Ok(None);
        }
        self.uuid_query(
            "SELECT m.conversation_id FROM message_refs r JOIN messages m ON m.seq = r.message_seq \
             WHERE r.customer_id = $1 AND r.ref_id = $2 ORDER BY m.seq LIMIT 1",
            &[&customer, &message_id],
        )
    }

    fn conversation_by_provider_thread(
        &mut self,
        customer: Uuid,
        channel: Channel,
        thread_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        if has_nul(&[thread_id]) {
            return Ok(None);
        }
        self.uuid_query(
            "SELECT conversation_id FROM messages WHERE customer_id = $1 AND channel = $2 \
             AND provider_thread_id = $3 ORDER BY seq DESC LIMIT 1",
            &[&customer, &channel.as_str(), &thread_id],
        )
    }

    fn latest_conversation(
        &mut self,
        customer: Uuid,
        channel_account: Option<(Channel, &str)>,
        subject_key: Option<&str>,
    ) -> Result<Option<Conversation>, StoreError> {
        // Ties on time go to the conversation stored last, as in SQLite
        // (whose index scan runs backwards over rowids).
        match (channel_account, subject_key) {
            (None, _) => self.conversation_query(
                &format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = $1 \
                     ORDER BY last_message_at DESC, pos DESC LIMIT 1"
                ),
                &[&customer],
            ),
            (Some((_, account)), None) if has_nul(&[account]) => Ok(None),
            (Some((channel, account)), None) => self.conversation_query(
                &format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = $1 \
                     AND channel = $2 AND account = $3 \
                     ORDER BY last_message_at DESC, pos DESC LIMIT 1"
                ),
                &[&customer, &channel.as_str(), &account],
            ),
            (Some((_, account)), Some(subject)) if has_nul(&[account, subject]) => Ok(None),
            (Some((channel, account)), Some(subject)) => self.conversation_query(
                &format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE customer_id = $1 \
                     AND channel = $2 AND account = $3 AND subject_key = $4 \
                     ORDER BY last_message_at DESC, pos DESC LIMIT 1"
                ),
                &[&customer, &channel.as_str(), &account, &subject],
            ),
        }
    }

    fn insert_conversation(&mut self, c: &Conversation) -> Result<(), StoreError> {
        check_text([
            Some(c.account.as_str()),
            c.last_inbound_account.as_deref(),
            c.subject_key.as_deref(),
        ])?;
        let n = self.exec(
            &format!(
                "INSERT INTO conversations ({CONVERSATION_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING"
            ),
            &[
                &c.id,
                &c.customer_id,
                &c.channel.as_str(),
                &c.account,
                &c.status.as_str(),
                &c.opened_at,
                &c.last_message_at,
                &c.last_inbound_channel.map(Channel::as_str),
                &c.last_inbound_account,
                &c.resolved_at,
                &c.subject_key,
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Rejected(format!(
                "conversation {} exists already",
                c.id
            )));
        }
        Ok(())
    }

    fn update_conversation(&mut self, c: &Conversation) -> Result<(), StoreError> {
        check_text([c.last_inbound_account.as_deref()])?;
        self.exec(
            "UPDATE conversations SET status = $2, opened_at = $3, last_message_at = $4, \
             last_inbound_channel = $5, last_inbound_account = $6, resolved_at = $7, \
             customer_id = $8 WHERE id = $1",
            &[
                &c.id,
                &c.status.as_str(),
                &c.opened_at,
                &c.last_message_at,
                &c.last_inbound_channel.map(Channel::as_str),
                &c.last_inbound_account,
                &c.resolved_at,
                &c.customer_id,
            ],
        )
        .map(drop)
    }

    fn insert_message(&mut self, m: &NewMessage<'_>) -> Result<i64, StoreError> {
        let e = m.envelope;
        let hints = &e.thread_hints;
        check_text(
            [
                Some(e.idempotency_key.as_str()),
                Some(e.account.as_str()),
                Some(e.from.value.as_str()),
                Some(e.to.value.as_str()),
                e.subject.as_deref(),
                Some(e.text.as_str()),
                hints.message_id.as_deref(),
                hints.provider_thread_id.as_deref(),
                m.status,
            ]
            .into_iter()
            .chain(hints.in_reply_to.iter().map(|s| Some(s.as_str())))
            .chain(hints.references.iter().map(|s| Some(s.as_str()))),
        )?;
        let envelope = serde_json::to_string(e).map_err(|e| StoreError::Rejected(e.to_string()))?;
        // A second message with the same id or idempotency key is refused
        // without aborting the transaction; one a concurrent transaction is
        // storing makes this one fail to serialize (retryable), and the
        // retry finds it as a duplicate.
        let row = self.query_first(
            "INSERT INTO messages (id, idempotency_key, customer_id, conversation_id, direction, \
             channel, account, from_kind, from_value, to_kind, to_value, received_at, subject, \
             text, header_id, provider_thread_id, rule, status, envelope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
             ON CONFLICT DO NOTHING RETURNING seq",
            &[
                &e.id,
                &e.idempotency_key,
                &m.customer_id,
                &m.conversation_id,
                &e.direction.as_str(),
                &e.channel.as_str(),
                &e.account,
                &e.from.kind.as_str(),
                &e.from.value,
                &e.to.kind.as_str(),
                &e.to.value,
                &e.received_at.timestamp_millis(),
                &e.subject,
                &e.text,
                &hints.message_id,
                &hints.provider_thread_id,
                &m.rule.as_str(),
                &m.status,
                &envelope,
            ],
        )?;
        let Some(row) = row else {
            return Err(StoreError::Rejected(format!(
                "a message with id {} or idempotency key {:?} is stored already",
                e.id, e.idempotency_key
            )));
        };
        let seq: i64 = col(&row, 0)?;
        self.known.keys.insert(
            e.idempotency_key.clone(),
            Some(MessageRef {
                id: e.id,
                conversation_id: m.conversation_id,
                customer_id: m.customer_id,
            }),
        );
        let refs: Vec<&str> = hints
            .in_reply_to
            .iter()
            .chain(&hints.references)
            .map(String::as_str)
            .collect();
        if !refs.is_empty() {
            self.exec(
                "INSERT INTO message_refs (customer_id, ref_id, message_seq) \
                 SELECT $1::uuid, r, $3::bigint FROM unnest($2::text[]) AS r",
                &[&m.customer_id, &refs, &seq],
            )?;
        }
        Ok(seq)
    }

    fn outbound(&mut self, key: &str) -> Result<Option<OutboundRecord>, StoreError> {
        if has_nul(&[key]) {
            return Ok(None);
        }
        self.query_first(
            &format!("SELECT {OUTBOUND_COLS} FROM outbound WHERE idempotency_key = $1"),
            &[&key],
        )?
        .map(|r| outbound_row(&r))
        .transpose()
    }

    fn put_outbound(&mut self, r: &OutboundRecord, request: &str) -> Result<(), StoreError> {
        check_text([
            Some(r.idempotency_key.as_str()),
            Some(r.account.as_str()),
            Some(r.to.value.as_str()),
            r.provider_message_id.as_deref(),
            r.error.as_deref(),
            Some(request),
        ])?;
        self.exec(
            &format!(
                "INSERT INTO outbound ({OUTBOUND_COLS}, request) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT (idempotency_key) DO UPDATE SET state = excluded.state, \
                 attempts = excluded.attempts, provider_message_id = excluded.provider_message_id, \
                 error = excluded.error, updated_at = excluded.updated_at"
            ),
            &[
                &r.idempotency_key,
                &r.message_id,
                &r.conversation_id,
                &r.customer_id,
                &r.channel.as_str(),
                &r.account,
                &r.to.kind.as_str(),
                &r.to.value,
                &r.state.as_str(),
                &i64::from(r.attempts),
                &r.provider_message_id,
                &r.error,
                &r.created_at,
                &r.updated_at,
                &request,
            ],
        )
        .map(drop)
    }

    fn outbound_by_message(
        &mut self,
        message_id: Uuid,
    ) -> Result<Option<OutboundRecord>, StoreError> {
        self.query_first(
            &format!(
                "SELECT {OUTBOUND_COLS} FROM outbound WHERE message_id = $1 \
                 ORDER BY idempotency_key LIMIT 1"
            ),
            &[&message_id],
        )?
        .map(|r| outbound_row(&r))
        .transpose()
    }

    fn message_status(&mut self, message_id: Uuid) -> Result<Option<String>, StoreError> {
        match self.query_first("SELECT status FROM messages WHERE id = $1", &[&message_id])? {
            Some(r) => col(&r, 0),
            None => Ok(None),
        }
    }

    fn outbound_request(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        if has_nul(&[key]) {
            return Ok(None);
        }
        self.query_first(
            "SELECT request FROM outbound WHERE idempotency_key = $1",
            &[&key],
        )?
        .map(|r| col(&r, 0))
        .transpose()
    }

    fn last_inbound(
        &mut self,
        customer: Uuid,
        conversation: Option<Uuid>,
        channel: Option<Channel>,
    ) -> Result<Option<LastInbound>, StoreError> {
        const COLS: &str = "conversation_id, channel, account, from_kind, from_value, received_at";
        match (conversation, channel) {
            (Some(conv), Some(ch)) => self.inbound_query(
                &format!(
                    "SELECT {COLS} FROM messages WHERE conversation_id = $1 AND channel = $2 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ),
                &[&conv, &ch.as_str()],
            ),
            (Some(conv), None) => self.inbound_query(
                &format!(
                    "SELECT {COLS} FROM messages WHERE conversation_id = $1 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ),
                &[&conv],
            ),
            (None, Some(ch)) => self.inbound_query(
                &format!(
                    "SELECT {COLS} FROM messages WHERE customer_id = $1 AND channel = $2 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ),
                &[&customer, &ch.as_str()],
            ),
            (None, None) => self.inbound_query(
                &format!(
                    "SELECT {COLS} FROM messages WHERE customer_id = $1 \
                     AND direction = 'inbound' ORDER BY received_at DESC, seq DESC LIMIT 1"
                ),
                &[&customer],
            ),
        }
    }

    fn set_message_status(&mut self, id: Uuid, status: &str) -> Result<(), StoreError> {
        check_text([Some(status)])?;
        self.exec(
            "UPDATE messages SET status = $2 WHERE id = $1",
            &[&id, &status],
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
        self.known.forget();
        check_text([Some(evidence)])?;
        let (s, m) = (&survivor, &merged);
        let moved = self.identities_of(merged)?;
        let moved =
            serde_json::to_string(&moved).map_err(|e| StoreError::Rejected(e.to_string()))?;
        self.exec(
            "INSERT INTO merges (survivor, merged, evidence, identities, at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[s, m, &evidence, &moved, &at],
        )?;
        for sql in [
            "UPDATE identities SET customer_id = $1 WHERE customer_id = $2",
            "UPDATE conversations SET customer_id = $1 WHERE customer_id = $2",
            "UPDATE messages SET customer_id = $1 WHERE customer_id = $2",
            "UPDATE message_refs SET customer_id = $1 WHERE customer_id = $2",
            "UPDATE customers SET merged_into = $1 WHERE merged_into = $2",
            "UPDATE customers SET merged_into = $1 WHERE id = $2",
        ] {
            self.exec(sql, &[s, m])?;
        }
        Ok(())
    }

    fn split_identity(
        &mut self,
        identity: &Identity,
        new_customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        self.known.forget();
        check_text([Some(evidence)])?;
        let Some(old) = self.owner_of(identity)? else {
            return Ok(());
        };
        let (kind, value) = (identity.kind.as_str(), identity.value.as_str());
        self.exec(
            "INSERT INTO identity_splits (kind, value, from_customer, to_customer, evidence, at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&kind, &value, &old, &new_customer, &evidence, &at],
        )?;
        self.attach_identity(identity, new_customer, evidence, at)?;
        // A conversation moves when every customer-side message in it is this
        // identity's: those are the ones the merge brought.
        let side = "CASE m.direction WHEN 'inbound' THEN m.from_kind || ':' || m.from_value \
                    ELSE m.to_kind || ':' || m.to_value END";
        let key = identity.key();
        let moving = self.query(
            &format!(
                "SELECT c.id FROM conversations c WHERE c.customer_id = $1 \
                 AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id) \
                 AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id \
                                 AND {side} <> $2)"
            ),
            &[&old, &key],
        )?;
        let moving: Vec<Uuid> = rows(moving, |r| col(r, 0))?;
        for conv in moving {
            self.exec(
                "UPDATE conversations SET customer_id = $1 WHERE id = $2",
                &[&new_customer, &conv],
            )?;
            self.exec(
                "UPDATE message_refs SET customer_id = $1 WHERE message_seq IN \
                 (SELECT seq FROM messages WHERE conversation_id = $2)",
                &[&new_customer, &conv],
            )?;
            self.exec(
                "UPDATE messages SET customer_id = $1 WHERE conversation_id = $2",
                &[&new_customer, &conv],
            )?;
        }
        Ok(())
    }

    fn erase_customer(&mut self, id: Uuid, at: Millis) -> Result<Erased, StoreError> {
        self.known.forget();
        let family = self.query(
            "WITH RECURSIVE family(id) AS (SELECT $1::uuid UNION \
             SELECT c.id FROM customers c JOIN family f ON c.merged_into = f.id) \
             SELECT id FROM family",
            &[&id],
        )?;
        let family: Vec<Uuid> = rows(family, |r| col(r, 0))?;
        let mut erased = Erased {
            messages: 0,
            identities: 0,
            conversations: 0,
        };
        for cid in &family {
            self.exec("DELETE FROM message_refs WHERE customer_id = $1", &[cid])?;
            self.exec(
                "DELETE FROM message_versions WHERE message_id IN \
                 (SELECT id FROM messages WHERE customer_id = $1)",
                &[cid],
            )?;
            erased.messages += self.exec("DELETE FROM messages WHERE customer_id = $1", &[cid])?;
            erased.conversations +=
                self.exec("DELETE FROM conversations WHERE customer_id = $1", &[cid])?;
            erased.identities +=
                self.exec("DELETE FROM identities WHERE customer_id = $1", &[cid])?;
            // Merge records name identities; they are personal data too.
            self.exec(
                "UPDATE merges SET identities = '[]', evidence = 'erased' \
                 WHERE survivor = $1 OR merged = $1",
                &[cid],
            )?;
            self.exec(
                "DELETE FROM identity_splits WHERE from_customer = $1 OR to_customer = $1",
                &[cid],
            )?;
            self.exec(
                "UPDATE customers SET erased_at = $2 WHERE id = $1",
                &[cid, &at],
            )?;
        }
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.exec(
            "INSERT INTO tombstones (customer_id, erased_at, messages, identities, conversations) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (customer_id) DO UPDATE SET erased_at = excluded.erased_at",
            &[
                &id,
                &at,
                &count(erased.messages),
                &count(erased.identities),
                &count(erased.conversations),
            ],
        )?;
        Ok(erased)
    }

    fn first_application(&mut self, command_id: Uuid, at: Millis) -> Result<bool, StoreError> {
        self.exec(
            "INSERT INTO applied_commands (id, at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            &[&command_id, &at],
        )
        .map(|n| n == 1)
    }

    fn push_outbox(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), StoreError> {
        check_text([Some(topic)])?;
        self.outbox
            .push((topic.to_owned(), key.to_vec(), payload.to_vec()));
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.outbox_marks.push(self.outbox.len());
        self.savepoints += 1;
        let sql = format!("SAVEPOINT sp{}", self.savepoints);
        self.control(&sql)
    }

    fn release_savepoint(&mut self) -> Result<(), StoreError> {
        self.outbox_marks.pop();
        let n = self.savepoints;
        self.savepoints = n.saturating_sub(1);
        self.control(&format!("RELEASE SAVEPOINT sp{n}"))
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        self.known.forget();
        if let Some(mark) = self.outbox_marks.pop() {
            self.outbox.truncate(mark);
        }
        let n = self.savepoints;
        self.savepoints = n.saturating_sub(1);
        match self.conn.client.batch_execute(&format!(
            "ROLLBACK TO SAVEPOINT sp{n}; RELEASE SAVEPOINT sp{n}"
        )) {
            Ok(()) => {
                // Every savepoint predates a failure (none can be set after
                // one), so this undid it.
                self.failed = None;
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn first_reply(
        &mut self,
        conversation: Uuid,
    ) -> Result<(Option<Uuid>, Option<Millis>), StoreError> {
        let reply = self.query(
            "SELECT id FROM messages WHERE conversation_id = $1 AND direction = 'outbound' \
             AND status IN ('sent', 'delivered', 'read') ORDER BY received_at, seq LIMIT 1",
            &[&conversation],
        )?;
        let reply: Option<Uuid> = match reply.first() {
            Some(r) => Some(col(r, 0)?),
            None => None,
        };
        let first = self.query(
            "SELECT MIN(received_at) FROM messages WHERE conversation_id = $1 \
             AND direction = 'inbound'",
            &[&conversation],
        )?;
        let first_inbound: Option<Millis> = match first.first() {
            Some(r) => col(r, 0)?,
            None => None,
        };
        Ok((reply, first_inbound))
    }

    fn thread_message_ids(
        &mut self,
        conversation: Uuid,
        limit: usize,
    ) -> Result<Vec<(Direction, String)>, StoreError> {
        let found = self.query(
            "SELECT direction, header_id FROM messages WHERE conversation_id = $1 \
             AND header_id IS NOT NULL ORDER BY received_at DESC, seq DESC LIMIT $2",
            &[&conversation, &limit_param(limit)],
        )?;
        rows(found, |r| {
            let direction = parse_col(r, 0, |s| match s {
                "inbound" => Some(Direction::Inbound),
                "outbound" => Some(Direction::Outbound),
                _ => None,
            })?;
            Ok((direction, col(r, 1)?))
        })
    }

    fn sent_unread_up_to(
        &mut self,
        channel: Channel,
        account: &str,
        to: &Identity,
        up_to: Millis,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        if has_nul(&[account, &to.value]) {
            return Ok(Vec::new());
        }
        let limit = limit as i64;
        let params: [&(dyn ToSql + Sync); 6] = [
            &to.value,
            &channel.as_str(),
            &account,
            &to.kind.as_str(),
            &up_to,
            &limit,
        ];
        self.query(
            "SELECT o.message_id FROM outbound o JOIN messages m ON m.id = o.message_id \
             WHERE o.to_value = $1 AND o.channel = $2 AND o.account = $3 AND o.to_kind = $4 \
             AND o.updated_at <= $5 AND o.state = 'sent' \
             AND m.status IN ('sent', 'delivered') \
             ORDER BY o.updated_at LIMIT $6",
            &params,
        )?
        .iter()
        .map(|r| col(r, 0))
        .collect()
    }

    fn latest_provider_thread(
        &mut self,
        conversation: Uuid,
        channel: Channel,
    ) -> Result<Option<String>, StoreError> {
        let params: [&(dyn ToSql + Sync); 2] = [&conversation, &channel.as_str()];
        match self.query_first(
            "SELECT provider_thread_id FROM messages WHERE conversation_id = $1 \
             AND direction = 'inbound' AND channel = $2 \
             ORDER BY received_at DESC, seq DESC LIMIT 1",
            &params,
        )? {
            Some(r) => col(&r, 0),
            None => Ok(None),
        }
    }

    fn message_by_provider_id(
        &mut self,
        channel: Channel,
        account: &str,
        provider_id: &str,
    ) -> Result<Option<MessageRef>, StoreError> {
        if has_nul(&[account, provider_id]) {
            return Ok(None);
        }
        let params: [&(dyn ToSql + Sync); 3] = [&provider_id, &channel.as_str(), &account];
        let found = match self.query_first(
            "SELECT id, conversation_id, customer_id FROM messages \
             WHERE header_id = $1 AND channel = $2 AND account = $3 ORDER BY seq LIMIT 1",
            &params,
        )? {
            Some(r) => Some(r),
            None => self.query_first(
                "SELECT m.id, m.conversation_id, m.customer_id FROM outbound o \
                 JOIN messages m ON m.id = o.message_id \
                 WHERE o.provider_message_id = $1 AND o.channel = $2 AND o.account = $3 \
                 ORDER BY m.seq LIMIT 1",
                &params,
            )?,
        };
        found.map(|r| message_ref_cols(&r, 0)).transpose()
    }

    fn apply_change(&mut self, v: &NewVersion<'_>) -> Result<Option<i64>, StoreError> {
        let strings = [
            v.idempotency_key,
            v.by.value.as_str(),
            v.text.unwrap_or_default(),
            v.emoji.unwrap_or_default(),
            v.envelope,
        ];
        if has_nul(&strings) {
            return Err(StoreError::Rejected(
                "a change holds a NUL character".into(),
            ));
        }
        if self
            .query_first(
                "SELECT 1 FROM message_versions WHERE idempotency_key = $1",
                &[&v.idempotency_key],
            )?
            .is_some()
        {
            return Ok(None);
        }
        // FOR UPDATE: two instances changing one message take turns.
        let Some(r) = self.query_first(
            "SELECT text, reactions, versions FROM messages WHERE id = $1 FOR UPDATE",
            &[&v.message_id],
        )?
        else {
            return Err(StoreError::Rejected(format!("no message {}", v.message_id)));
        };
        let text: String = col(&r, 0)?;
        let reactions: Option<String> = col(&r, 1)?;
        let versions: i64 = col(&r, 2)?;
        let (new_text, new_reactions, deleted) =
            crate::model::apply_version(&text, reactions.as_deref(), v);
        let version = versions + 1;
        self.exec(
            "INSERT INTO message_versions (message_id, version, idempotency_key, kind, by_kind, \
             by_value, previous_text, text, emoji, at, envelope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &v.message_id,
                &version,
                &v.idempotency_key,
                &v.kind.as_str(),
                &v.by.kind.as_str(),
                &v.by.value,
                &text,
                &v.text,
                &v.emoji,
                &v.at,
                &v.envelope,
            ],
        )?;
        self.exec(
            "UPDATE messages SET text = $1, reactions = $2, versions = $3, \
             deleted_at = CASE WHEN $4 THEN COALESCE(deleted_at, $5) ELSE deleted_at END \
             WHERE id = $6",
            &[
                &new_text,
                &new_reactions,
                &version,
                &deleted,
                &v.at,
                &v.message_id,
            ],
        )?;
        Ok(Some(version))
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if let Some(e) = self.failed.take() {
            // PostgreSQL would answer COMMIT with a silent rollback.
            self.open = false;
            self.conn.control("ROLLBACK")?;
            return Err(match e {
                StoreError::Rejected(m) => StoreError::Rejected(format!(
                    "transaction rolled back: a statement in it failed: {m}"
                )),
                other => other,
            });
        }
        if !self.outbox.is_empty() {
            let rows = std::mem::take(&mut self.outbox);
            let mut topics = Vec::with_capacity(rows.len());
            let mut keys = Vec::with_capacity(rows.len());
            let mut payloads = Vec::with_capacity(rows.len());
            for (t, k, p) in rows {
                topics.push(t);
                keys.push(k);
                payloads.push(p);
            }
            let owner = self.instance;
            // In push order: `seq` is assigned as the rows come, ordered.
            if let Err(e) = self.exec(
                "INSERT INTO outbox (topic, key, payload, owner) \
                 SELECT t, k, p, $4 FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
                 WITH ORDINALITY AS u(t, k, p, n) ORDER BY n",
                &[&topics, &keys, &payloads, &owner],
            ) {
                self.open = false;
                self.conn.control("ROLLBACK")?;
                return Err(e);
            }
        }
        self.open = false;
        self.conn.control("COMMIT")
    }
}

/// A schema of its own in a test database, created empty and dropped with
/// everything in it when this is dropped, so tests run in parallel and
/// never see each other's rows. For tests only.
#[derive(Debug)]
pub struct PgTestSchema {
    base_url: String,
    name: String,
}

/// The environment variable naming the test database.
pub const TEST_DATABASE_ENV: &str = "SWITCHBOARD_TEST_POSTGRES";

impl PgTestSchema {
    /// A fresh schema in the database named by `SWITCHBOARD_TEST_POSTGRES`.
    /// When that is not set: under CI (`CI` set) this panics, since CI
    /// provides PostgreSQL; elsewhere it prints a notice naming `test` and
    /// returns `None`, and the caller skips.
    pub fn from_env(test: &str) -> Option<PgTestSchema> {
        match std::env::var(TEST_DATABASE_ENV) {
            Ok(url) if !url.trim().is_empty() => match PgTestSchema::create(url.trim()) {
                Ok(s) => Some(s),
                Err(e) => panic!("{TEST_DATABASE_ENV}: cannot create a test schema: {e}"),
            },
            _ if std::env::var_os("CI").is_some() => panic!(
                "{TEST_DATABASE_ENV} is not set, but CI is: the test script must provide \
                 PostgreSQL (e.g. postgres://postgres@127.0.0.1:54329/switchboard)"
            ),
            _ => {
                eprintln!(
                    "SKIPPED {test} on PostgreSQL: set {TEST_DATABASE_ENV} to a database URL \
                     (e.g. postgres://postgres@127.0.0.1:54329/switchboard) to run it"
                );
                None
            }
        }
    }

    /// Creates a fresh schema `t_<random>` in the database at `url`.
    pub fn create(url: &str) -> Result<PgTestSchema, StoreError> {
        let name = format!("t_{}", Uuid::now_v7().simple());
        let schema = PgTestSchema {
            base_url: url.to_owned(),
            name,
        };
        schema.admin(&format!("CREATE SCHEMA {}", schema.name))?;
        Ok(schema)
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL whose sessions use only this schema (`search_path`).
    pub fn url(&self) -> String {
        let u = &self.base_url;
        if u.starts_with("postgres://") || u.starts_with("postgresql://") {
            let sep = if u.contains('?') { '&' } else { '?' };
            format!("{u}{sep}options=-csearch_path%3D{}", self.name)
        } else {
            format!("{u} options='-csearch_path={}'", self.name)
        }
    }

    /// Opens a store on this schema.
    pub fn open(&self, pool_size: u32) -> Result<PgStore, StoreError> {
        PgStore::open(&self.url(), pool_size)
    }

    /// Runs SQL in this schema outside any store (to arrange a test).
    pub fn execute(&self, sql: &str) -> Result<(), StoreError> {
        let url = self.url();
        off_runtime(|| {
            let mut client = url
                .parse::<postgres::Config>()
                .map_err(|e| StoreError::Rejected(e.to_string()))?
                .connect(NoTls)
                .map_err(pg_err)?;
            client.batch_execute(sql).map_err(pg_err)
        })
    }

    fn admin(&self, sql: &str) -> Result<(), StoreError> {
        let url = self.base_url.clone();
        off_runtime(|| {
            let mut client = url
                .parse::<postgres::Config>()
                .map_err(|e| StoreError::Rejected(e.to_string()))?
                .connect(NoTls)
                .map_err(pg_err)?;
            client.batch_execute(sql).map_err(pg_err)
        })
    }
}

impl Drop for PgTestSchema {
    fn drop(&mut self) {
        if let Err(error) = self.admin(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)) {
            eprintln!("cannot drop test schema {}: {error}", self.name);
        }
    }
}
