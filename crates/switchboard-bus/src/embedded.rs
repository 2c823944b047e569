//! [`EmbeddedBus`]: the log in SQLite, one writer thread, pooled readers.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use switchboard_core::bus::{Bus, BusError, Consumer, Outgoing, Position, Record, partition_for};
use tokio::sync::{oneshot, watch};

mod writer;

use writer::{Pending, Request, Writer};

/// Partitions of a topic created by this build unless configured otherwise.
pub const DEFAULT_PARTITIONS: u32 = 8;

/// Most records the writer puts in one transaction unless configured
/// otherwise (a single larger `publish_batch` still goes in one).
pub const DEFAULT_MAX_BATCH: usize = 1024;

const DB_FILE: &str = "bus.sqlite3";
const LOCK_FILE: &str = "bus.lock";
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_IDLE_READERS: usize = 16;
const STATEMENT_CACHE: usize = 32;

/// Schema migrations; `PRAGMA user_version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the log, the group offsets, the topics.
    r#"
    CREATE TABLE records (
        topic TEXT NOT NULL,
        "partition" INTEGER NOT NULL,
        "offset" INTEGER NOT NULL,
        key BLOB NOT NULL,
        payload BLOB NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (topic, "partition", "offset")
    ) WITHOUT ROWID;
    CREATE TABLE offsets (
        grp TEXT NOT NULL,
        topic TEXT NOT NULL,
        "partition" INTEGER NOT NULL,
        next_offset INTEGER NOT NULL,
        PRIMARY KEY (grp, topic, "partition")
    ) WITHOUT ROWID;
    CREATE TABLE topics (
        name TEXT PRIMARY KEY NOT NULL,
        partitions INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 2: the records in a rowid table, their position in a unique index.
    // WITHOUT ROWID keeps whole rows in the interior pages of its b-tree
    // and spills payloads over ~1 KB to overflow pages, so each group commit
    // rewrote several pages per insertion point: 5 KiB of WAL per routed
    // message against 1.4 KiB of payload (docs/benchmarks.md). Here rows
    // are appended to the table's last page and only the small index entries
    // go to one insertion point per partition.
    r#"
    CREATE TABLE records_v2 (
        seq INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        "partition" INTEGER NOT NULL,
        "offset" INTEGER NOT NULL,
        key BLOB NOT NULL,
        payload BLOB NOT NULL,
        ts INTEGER NOT NULL
    );
    INSERT INTO records_v2 (topic, "partition", "offset", key, payload, ts)
        SELECT topic, "partition", "offset", key, payload, ts FROM records
        ORDER BY ts, topic, "partition", "offset";
    DROP TABLE records;
    ALTER TABLE records_v2 RENAME TO records;
    CREATE UNIQUE INDEX records_position ON records (topic, "partition", "offset");
    "#,
];

const SELECT_RANGE: &str = r#"SELECT "offset", key, payload, ts FROM records
    WHERE topic = ?1 AND "partition" = ?2 AND "offset" >= ?3
    ORDER BY "offset" LIMIT ?4"#;

const SELECT_COMMITTED: &str = r#"SELECT "partition", next_offset FROM offsets
    WHERE grp = ?1 AND topic = ?2"#;

/// How to open an [`EmbeddedBus`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct EmbeddedConfig {
    /// The data directory; created if missing. One process owns it at a time.
    pub dir: PathBuf,
    /// Partitions of a topic when it is first created. A topic keeps the
    /// count it was created with (changing it would break per-key order).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Most records written in one transaction.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How old records are deleted; `None` keeps everything.
    #[serde(skip)]
    pub retention: Option<Retention>,
}

/// Which records the log deletes, and how often it looks.
///
/// A record is deleted once it is older than `max_age` **and** every
/// consumer group that has committed on its partition has committed past
/// it; on a partition no group has committed on, only for the topics in
/// `unconsumed` (those no consumer in this process reads, such as
/// `events.v1`), never for the others, so an accepted message is never
/// deleted before it was routed. A group counts from its first commit: a
/// second group subscribing to a topic another group already consumes
/// reads from the oldest record kept then. The newest record of each
/// partition is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Age past which records may go.
    pub max_age: Duration,
    /// Topics that may be trimmed without a consumer group.
    pub unconsumed: Vec<String>,
    /// How often the writer looks; each look deletes a bounded chunk, and
    /// while more is due the next follows within a fraction of a second.
    pub check_every: Duration,
}

fn default_partitions() -> u32 {
    DEFAULT_PARTITIONS
}

fn default_max_batch() -> usize {
    DEFAULT_MAX_BATCH
}

impl EmbeddedConfig {
    /// A configuration for `dir` with the default partitions and batch size.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            dir: dir.into(),
            partitions: DEFAULT_PARTITIONS,
            max_batch: DEFAULT_MAX_BATCH,
            retention: None,
        }
    }
}

/// The embedded, SQLite-backed bus. See the crate docs for the contract.
///
/// Cloning is cheap and shares the bus. The writer thread stops, after
/// writing everything queued, on [`EmbeddedBus::close`] or when the last
/// clone and the last consumer are dropped; the directory lock is released
/// then.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus")
            .field("dir", &self.inner.dir)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A topic as the bus knows it.
pub(crate) struct Topic {
    name: String,
    index: usize,
    partitions: u32,
    /// Committed end offset (next offset to assign) per partition; written
    /// by the writer after each commit.
    ends: Box<[AtomicU64]>,
    /// Bumped after each commit that appended to the topic.
    changed: watch::Sender<u64>,
}

impl Topic {
    fn end_offsets(&self) -> Vec<u64> {
        self.ends
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .collect()
    }

    fn check_partition(&self, partition: u32) -> Result<(), BusError> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(BusError::Config(format!(
                "partition {partition} out of range: topic {:?} has {} partitions",
                self.name, self.partitions
            )))
        }
    }
}

struct Inner {
    dir: PathBuf,
    db_path: PathBuf,
    topics: HashMap<String, Arc<Topic>>,
    requests: mpsc::Sender<Request>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    lock: Mutex<Option<File>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn io_err(what: &str, e: &rusqlite::Error) -> BusError {
    BusError::Io(format!("{what}: {e}"))
}

impl EmbeddedBus {
    /// Opens (creating if needed) the bus in `config.dir` and registers
    /// `topics`. Blocking: it locks the directory, migrates the schema and
    /// loads the end offsets, then starts the writer thread.
    ///
    /// Fails with [`BusError::Config`] when another process (or another open
    /// bus in this one) holds the directory.
    pub fn open(config: EmbeddedConfig, topics: &[&str]) -> Result<EmbeddedBus, BusError> {
        if config.partitions == 0 {
            return Err(BusError::Config("partitions must be at least 1".into()));
        }
        if config.max_batch == 0 {
            return Err(BusError::Config("max_batch must be at least 1".into()));
        }
        let dir = config.dir.clone();
        fs::create_dir_all(&dir)
            .map_err(|e| BusError::Io(format!("create data directory {}: {e}", dir.display())))?;
        let lock_file = lock_dir(&dir)?;
        let db_path = dir.join(DB_FILE);
        let mut conn = open_writer(&db_path)?;
        migrate(&mut conn)?;
        let registered = register_topics(&mut conn, topics, config.partitions)?;

        let mut by_name = HashMap::new();
        let mut list = Vec::with_capacity(registered.len());
        for (index, (name, partitions)) in registered.into_iter().enumerate() {
            let topic = Arc::new(Topic {
                name: name.clone(),
                index,
                partitions,
                ends: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
                changed: watch::Sender::new(0),
            });
            by_name.insert(name, Arc::clone(&topic));
            list.push(topic);
        }
        let next = load_ends(&conn, &list).map_err(|e| io_err("load end offsets", &e))?;
        for (topic, ends) in list.iter().zip(&next) {
            for (slot, end) in topic.ends.iter().zip(ends) {
                slot.store(*end, Ordering::Release);
            }
        }

        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            topics: list,
            next,
            max_batch: config.max_batch,
            next_trim: std::time::Instant::now()
                + config
                    .retention
                    .as_ref()
                    .map_or(Duration::ZERO, |r| r.check_every),
            retention: config.retention.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("switchboard-bus-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| BusError::Io(format!("start bus writer thread: {e}")))?;
        tracing::info!(
            dir = %dir.display(),
            topics = by_name.len(),
            max_batch = config.max_batch,
            "embedded bus open"
        );
        Ok(EmbeddedBus {
            inner: Arc::new(Inner {
                dir,
                db_path,
                topics: by_name,
                requests: tx,
                closed: AtomicBool::new(false),
                writer: Mutex::new(Some(handle)),
                readers: Mutex::new(Vec::new()),
                lock: Mutex::new(Some(lock_file)),
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The partition count of `topic`.
    pub fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        Ok(self.inner.topic(topic)?.partitions)
    }

    /// The end offset (the offset the next record will get) of each partition
    /// of `topic`, indexed by partition.
    pub fn end_offsets(&self, topic: &str) -> Result<Vec<u64>, BusError> {
        Ok(self.inner.topic(topic)?.end_offsets())
    }

    /// Reads up to `max` records of one partition starting at `from_offset`,
    /// in offset order, without touching any group's offsets.
    pub async fn read_range(
        &self,
        topic: &str,
        partition: u32,
        from_offset: u64,
        max: usize,
    ) -> Result<Vec<Record>, BusError> {
        let t = Arc::clone(self.inner.topic(topic)?);
        t.check_partition(partition)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        self.inner
            .with_reader("read records", move |conn| {
                let mut out = Vec::new();
                read_partition(conn, &t.name, partition, from_offset, max, &mut out)?;
                Ok(out)
            })
            .await
    }

    /// Stops the bus: writes every request already queued, stops the writer
    /// thread, closes the connections and releases the directory lock.
    /// Afterwards every operation fails with [`BusError::Closed`]. Dropping
    /// the last handle does the same.
    pub async fn close(&self) {
        let inner = &self.inner;
        if !inner.closed.swap(true, Ordering::AcqRel) {
            let (tx, rx) = oneshot::channel();
            if inner
                .requests
                .send(Request::Shutdown { reply: Some(tx) })
                .is_ok()
                && rx.await.is_err()
            {
                tracing::warn!("bus writer stopped without answering close");
            }
        }
        let handle = lock(&inner.writer).take();
        if let Some(handle) = handle {
            match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!("bus writer thread panicked"),
                Err(e) => tracing::error!(error = %e, "joining bus writer failed"),
            }
        }
        lock(&inner.readers).clear();
        drop(lock(&inner.lock).take());
        for topic in inner.topics.values() {
            topic.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        tracing::info!(dir = %inner.dir.display(), "embedded bus closed");
    }

    fn pending(&self, topic: &str, key: &[u8], payload: Vec<u8>) -> Result<Pending, BusError> {
        let t = self.inner.topic(topic)?;
        Ok(Pending {
            topic: t.index,
            partition: partition_for(key, t.partitions),
            key: key.to_vec(),
            payload,
        })
    }
}

impl Inner {
    fn topic(&self, name: &str) -> Result<&Arc<Topic>, BusError> {
        self.topics
            .get(name)
            .ok_or_else(|| BusError::UnknownTopic(name.to_owned()))
    }

    fn check_open(&self) -> Result<(), BusError> {
        if self.closed.load(Ordering::Acquire) {
            Err(BusError::Closed)
        } else {
            Ok(())
        }
    }

    /// Sends a request to the writer and waits for its answer.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, BusError>>) -> Request,
    ) -> Result<T, BusError> {
        self.check_open()?;
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx)).map_err(|_| BusError::Closed)?;
        // The writer drops the reply unanswered only when it stops before
        // seeing the request.
        rx.await.map_err(|_| BusError::Closed)?
    }

    /// Runs `f` on a pooled read-only connection on the blocking pool.
    async fn with_reader<T, F>(self: &Arc<Self>, what: &'static str, f: F) -> Result<T, BusError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.check_open()?;
        let inner = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = inner.take_reader()?;
            let out = f(&conn);
            inner.return_reader(conn);
            out.map_err(|e| io_err(what, &e))
        })
        .await
        .map_err(|e| BusError::Io(format!("{what}: reader task failed: {e}")))?
    }

    fn take_reader(&self) -> Result<Connection, BusError> {
        self.check_open()?;
        if let Some(conn) = lock(&self.readers).pop() {
            return Ok(conn);
        }
        open_reader(&self.db_path)
    }

    fn return_reader(&self, conn: Connection) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut pool = lock(&self.readers);
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
    }

    async fn committed(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        group: &str,
    ) -> Result<Vec<u64>, BusError> {
        let t = Arc::clone(topic);
        let group = group.to_owned();
        self.with_reader("read committed offsets", move |conn| {
            let mut offsets = vec![0u64; t.partitions as usize];
            let mut stmt = conn.prepare_cached(SELECT_COMMITTED)?;
            let rows = stmt.query_map(params![group, t.name], |row| {
                Ok((row.get::<_, u32>(0)?, row.get::<_, u64>(1)?))
            })?;
            for row in rows {
                let (p, next) = row?;
                if let Some(slot) = offsets.get_mut(p as usize) {
                    *slot = next;
                }
            }
            Ok(offsets)
        })
        .await
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel)
            && self
                .requests
                .send(Request::Shutdown { reply: None })
                .is_err()
        {
            tracing::debug!("bus writer already stopped");
        }
        let handle = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("bus writer thread panicked");
        }
        self.readers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        drop(
            self.lock
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(
        &self,
        topic: &str,
        key: &[u8],
        payload: Vec<u8>,
    ) -> Result<Position, BusError> {
        let pending = self.pending(topic, key, payload)?;
        let positions = self
            .inner
            .call(|reply| Request::Publish {
                records: vec![pending],
                reply,
            })
            .await?;
        positions
            .into_iter()
            .next()
            .ok_or_else(|| BusError::Io("writer returned no position".into()))
    }

    async fn publish_batch(&self, records: Vec<Outgoing>) -> Result<Vec<Position>, BusError> {
        let pending = records
            .into_iter()
            .map(|r| self.pending(&r.topic, &r.key, r.payload))
            .collect::<Result<Vec<_>, _>>()?;
        if pending.is_empty() {
            self.inner.check_open()?;
            return Ok(Vec::new());
        }
        self.inner
            .call(|reply| Request::Publish {
                records: pending,
                reply,
            })
            .await
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError> {
        let t = Arc::clone(self.inner.topic(topic)?);
        if group.is_empty() {
            return Err(BusError::Config("consumer group name is empty".into()));
        }
        // Subscribe to wake-ups before reading the offsets, so no append
        // between the two goes unnoticed.
        let changed = t.changed.subscribe();
        let positions = self.inner.committed(&t, group).await?;
        tracing::debug!(topic = %t.name, group, ?positions, "consumer joined");
        Ok(Box::new(EmbeddedConsumer {
            inner: Arc::clone(&self.inner),
            topic: t,
            group: group.to_owned(),
            positions,
            changed,
            start: 0,
        }))
    }

    async fn ready(&self) -> Result<(), BusError> {
        self.inner.call(|reply| Request::Ping { reply }).await
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Vec<(u32, u64)>, BusError> {
        let t = Arc::clone(self.inner.topic(topic)?);
        let committed = self.inner.committed(&t, group).await?;
        Ok(t.end_offsets()
            .into_iter()
            .zip(committed)
            .zip(0u32..)
            .map(|((end, done), p)| (p, end.saturating_sub(done)))
            .collect())
    }

    async fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        Ok(self.inner.topic(topic)?.partitions)
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, BusError> {
        let t = Arc::clone(self.inner.topic(topic)?);
        if partition >= t.partitions {
            return Err(BusError::Config(format!(
                "{topic} has {} partitions; there is no partition {partition}",
                t.partitions
            )));
        }
        self.inner
            .with_reader("read records", move |conn| {
                let mut out = Vec::new();
                read_partition(conn, &t.name, partition, from, max, &mut out)?;
                Ok(out)
            })
            .await
    }
}

/// A consumer over every partition of one topic.
struct EmbeddedConsumer {
    inner: Arc<Inner>,
    topic: Arc<Topic>,
    group: String,
    /// Next offset to read, per partition.
    positions: Vec<u64>,
    changed: watch::Receiver<u64>,
    /// The partition read first on the next poll (rotates for fairness).
    start: usize,
}

impl EmbeddedConsumer {
    /// Reads what is available now, without waiting.
    async fn fetch(&mut self, max: usize) -> Result<Vec<Record>, BusError> {
        let ends = self.topic.end_offsets();
        let n = self.positions.len();
        let ready: Vec<(u32, u64)> = (0..n)
            .map(|i| (self.start + i) % n)
            .filter(|p| self.positions[*p] < ends[*p])
            .map(|p| (p as u32, self.positions[p]))
            .collect();
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        self.start = (self.start + 1) % n;
        let t = Arc::clone(&self.topic);
        let records = self
            .inner
            .with_reader("read records", move |conn| {
                // A fair share per partition first, then fill up from the
                // partitions that had more.
                let quota = max.div_ceil(ready.len());
                let mut out = Vec::new();
                let mut more = Vec::new();
                for (p, from) in ready {
                    let want = quota.min(max - out.len());
                    if want == 0 {
                        break;
                    }
                    let got = read_partition(conn, &t.name, p, from, want, &mut out)?;
                    if got == want {
                        more.push((p, from + got as u64));
                    }
                }
                for (p, from) in more {
                    let want = max - out.len();
                    if want == 0 {
                        break;
                    }
                    read_partition(conn, &t.name, p, from, want, &mut out)?;
                }
                Ok(out)
            })
            .await?;
        for r in &records {
            let slot = &mut self.positions[r.partition as usize];
            *slot = (*slot).max(r.offset + 1);
        }
        Ok(records)
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, BusError> {
        // `None`: a wait too long to represent, i.e. until records come.
        let deadline = tokio::time::Instant::now().checked_add(wait);
        loop {
            self.inner.check_open()?;
            if max == 0 {
                return Ok(Vec::new());
            }
            // Mark the current version seen before looking, so an append
            // after the look wakes the wait below.
            self.changed.borrow_and_update();
            let records = self.fetch(max).await?;
            if !records.is_empty() {
                return Ok(records);
            }
            let woken = match deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                        Ok(woken) => woken,
                        Err(_elapsed) => return Ok(Vec::new()),
                    }
                }
                None => self.changed.changed().await,
            };
            if woken.is_err() {
                return Err(BusError::Closed);
            }
        }
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), BusError> {
        for (p, _) in offsets {
            self.topic.check_partition(*p)?;
        }
        if offsets.is_empty() {
            return self.inner.check_open();
        }
        let group = self.group.clone();
        let topic = self.topic.index;
        let offsets = offsets.to_vec();
        self.inner
            .call(|reply| Request::Commit {
                group,
                topic,
                offsets,
                reply,
            })
            .await
    }
}

/// Appends to `out` up to `max` records of one partition from `from`;
/// returns how many.
fn read_partition(
    conn: &Connection,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
    out: &mut Vec<Record>,
) -> rusqlite::Result<usize> {
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(SELECT_RANGE)?;
    let rows = stmt.query_map(params![topic, partition, from, limit], |row| {
        Ok(Record {
            topic: topic.to_owned(),
            partition,
            offset: row.get(0)?,
            key: row.get(1)?,
            payload: row.get(2)?,
            timestamp_ms: row.get(3)?,
        })
    })?;
    let before = out.len();
    for row in rows {
        out.push(row?);
    }
    Ok(out.len() - before)
}

/// Loads the next offset of every partition of every topic from the log.
pub(crate) fn load_ends(
    conn: &Connection,
    topics: &[Arc<Topic>],
) -> rusqlite::Result<Vec<Vec<u64>>> {
    let mut stmt = conn.prepare_cached(
        r#"SELECT MAX("offset") FROM records WHERE topic = ?1 AND "partition" = ?2"#,
    )?;
    topics
        .iter()
        .map(|t| {
            (0..t.partitions)
                .map(|p| {
                    let max: Option<u64> = stmt.query_row(params![t.name, p], |row| row.get(0))?;
                    Ok(max.map_or(0, |m| m + 1))
                })
                .collect()
        })
        .collect()
}

/// A read-only view of an embedded log that another process may own: it
/// takes no lock and never writes, so the tools (`switchboard dlq list`) can
/// read while the daemon runs. SQLite's WAL mode lets it read committed
/// records beside the owner's writer.
pub struct LogReader {
    conn: Mutex<Connection>,
}

impl LogReader {
    /// Opens the log in `dir` (the daemon's `data_dir/bus`) for reading.
    pub fn open(dir: &Path) -> Result<LogReader, BusError> {
        let path = dir.join(DB_FILE);
        if !path.exists() {
            return Err(BusError::Config(format!(
                "no embedded log at {} (has the daemon run with this data_dir?)",
                path.display()
            )));
        }
        Ok(LogReader {
            conn: Mutex::new(open_reader(&path)?),
        })
    }

    /// How many partitions `topic` has.
    pub fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        lock(&self.conn)
            .query_row(
                "SELECT partitions FROM topics WHERE name = ?1",
                [topic],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| io_err("read topics", &e))?
            .ok_or_else(|| BusError::UnknownTopic(topic.to_owned()))
    }

    /// Up to `max` records of one partition from offset `from`, in order.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, BusError> {
        let mut out = Vec::new();
        read_partition(&lock(&self.conn), topic, partition, from, max, &mut out)
            .map_err(|e| io_err("read records", &e))?;
        Ok(out)
    }
}

/// Takes the exclusive lock on the data directory, held while the file is
/// open.
fn lock_dir(dir: &Path) -> Result<File, BusError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| BusError::Io(format!("open lock file {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(BusError::Config(format!(
            "data directory {} is in use by another process",
            dir.display()
        ))),
        Err(TryLockError::Error(e)) => Err(BusError::Io(format!(
            "lock data directory {}: {e}",
            dir.display()
        ))),
    }
}

fn open_writer(path: &Path) -> Result<Connection, BusError> {
    let what = "open bus database";
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| io_err(what, &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| io_err(what, &e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| io_err(what, &e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(BusError::Io(format!(
            "{what}: journal mode is {mode}, wal is required"
        )));
    }
    // WAL + FULL: every commit fsyncs the WAL, so an acknowledged publish
    // survives power loss. Checkpoints rewind the WAL; the size limit keeps
    // the file from staying at its high-water mark after a burst.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA journal_size_limit = 67108864;")
        .map_err(|e| io_err(what, &e))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection, BusError> {
    let what = "open bus reader";
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| io_err(what, &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| io_err(what, &e))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Brings the schema to the newest version, one migration per transaction.
fn migrate(conn: &mut Connection) -> Result<(), BusError> {
    let what = "migrate bus schema";
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| io_err(what, &e))?;
    let known = MIGRATIONS.len() as u32;
    if version > known {
        return Err(BusError::Config(format!(
            "bus database schema version {version} is newer than this build knows ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let to = i + 1;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| io_err(what, &e))?;
        tx.execute_batch(sql).map_err(|e| io_err(what, &e))?;
        tx.execute_batch(&format!("PRAGMA user_version = {to};"))
            .map_err(|e| io_err(what, &e))?;
        tx.commit().map_err(|e| io_err(what, &e))?;
        tracing::info!(version = to, "bus schema migrated");
    }
    Ok(())
}

/// Registers the topics, keeping the partition count of those already
/// stored. Returns each distinct topic with its partition count.
fn register_topics(
    conn: &mut Connection,
    topics: &[&str],
    partitions: u32,
) -> Result<Vec<(String, u32)>, BusError> {
    let what = "register topics";
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| io_err(what, &e))?;
    let mut out: Vec<(String, u32)> = Vec::with_capacity(topics.len());
    for name in topics {
        if name.is_empty() {
            return Err(BusError::Config("topic name is empty".into()));
        }
        if out.iter().any(|(n, _)| n == name) {
            continue;
        }
        let stored: Option<u32> = tx
            .query_row(
                "SELECT partitions FROM topics WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| io_err(what, &e))?;
        let count = match stored {
            Some(0) => {
                return Err(BusError::Config(format!(
                    "topic {name:?} is stored with 0 partitions"
                )));
            }
            Some(stored) => {
                if stored != partitions {
                    tracing::warn!(
                        topic = %name,
                        stored,
                        configured = partitions,
                        "topic keeps its stored partition count; changing it would break per-key order"
                    );
                }
                stored
            }
            None => {
                tx.execute(
                    "INSERT INTO topics (name, partitions) VALUES (?1, ?2)",
                    params![name, partitions],
                )
                .map_err(|e| io_err(what, &e))?;
                partitions
            }
        };
        out.push(((*name).to_owned(), count));
    }
    tx.commit().map_err(|e| io_err(what, &e))?;
    Ok(out)
}

#[cfg(test)]
mod tests;
