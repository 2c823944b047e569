//! The writer thread: owns the only write connection and group-commits
//! everything queued in one transaction.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior, params};
use switchboard_core::bus::{BusError, Position};
use tokio::sync::oneshot;

use super::{Topic, load_ends};

/// A record on its way to the writer, its partition already chosen.
pub(super) struct Pending {
    pub(super) topic: usize,
    pub(super) partition: u32,
    pub(super) key: Vec<u8>,
    pub(super) payload: Vec<u8>,
}

/// What the writer is asked to do.
pub(super) enum Request {
    /// Append records, in order, atomically.
    Publish {
        records: Vec<Pending>,
        reply: oneshot::Sender<Result<Vec<Position>, BusError>>,
    },
    /// Store a group's next offsets.
    Commit {
        group: String,
        topic: usize,
        offsets: Vec<(u32, u64)>,
        reply: oneshot::Sender<Result<(), BusError>>,
    },
    /// Answer if alive and the database answers.
    Ping {
        reply: oneshot::Sender<Result<(), BusError>>,
    },
    /// Write everything still queued, close the connection and stop.
    Shutdown { reply: Option<oneshot::Sender<()>> },
}

/// What one request in a batch came to: the positions of a publish (empty
/// for other requests) or why it was refused.
type Outcome = Result<Vec<Position>, BusError>;

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) topics: Vec<Arc<Topic>>,
    /// Next offset per topic (by index) and partition; mirrors what is
    /// committed in the database.
    pub(super) next: Vec<Vec<u64>>,
    pub(super) max_batch: usize,
    /// How old records are deleted, if they are.
    pub(super) retention: Option<super::Retention>,
    /// When the next trimming step is due.
    pub(super) next_trim: std::time::Instant,
}

/// Records deleted in one trimming step, so a publish never waits long
/// behind a trim; while there is more to delete, the next step follows
/// after [`TRIM_PAUSE`].
const TRIM_CHUNK: i64 = 5000;
const TRIM_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

const DELETE_OLD: &str = r#"DELETE FROM records WHERE rowid IN (
    SELECT rowid FROM records WHERE topic = ?1 AND "partition" = ?2 AND "offset" < ?3 AND ts < ?4
    ORDER BY "offset" LIMIT ?5)"#;

const MIN_COMMITTED: &str = r#"SELECT MIN(next_offset) FROM offsets
    WHERE topic = ?1 AND "partition" = ?2"#;

const INSERT_RECORD: &str = r#"INSERT INTO records (topic, "partition", "offset", key, payload, ts)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#;

const UPSERT_OFFSET: &str = r#"INSERT INTO offsets (grp, topic, "partition", next_offset)
    VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (grp, topic, "partition") DO UPDATE SET next_offset = excluded.next_offset"#;

impl Writer {
    /// Serves requests until shut down (or every sender is gone), then closes
    /// the connection and answers the shutdown requests.
    pub(super) fn run(mut self, requests: mpsc::Receiver<Request>) {
        let mut stopping = false;
        let mut shutdown_replies = Vec::new();
        loop {
            let mut batch = Vec::new();
            let mut records = 0usize;
            self.maybe_trim();
            if !stopping {
                let next = match &self.retention {
                    Some(_) => requests
                        .recv_timeout(
                            self.next_trim
                                .saturating_duration_since(std::time::Instant::now()),
                        )
                        .map_err(|e| e == mpsc::RecvTimeoutError::Disconnected),
                    None => requests.recv().map_err(|_| true),
                };
                match next {
                    Err(false) => continue,
                    Err(true) => break,
                    Ok(req) => admit(
                        req,
                        &mut batch,
                        &mut records,
                        &mut stopping,
                        &mut shutdown_replies,
                    ),
                }
            }
            while records < self.max_batch {
                match requests.try_recv() {
                    Ok(req) => admit(
                        req,
                        &mut batch,
                        &mut records,
                        &mut stopping,
                        &mut shutdown_replies,
                    ),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                if stopping {
                    break;
                }
                continue;
            }
            self.process(batch);
        }
        drop(self);
        tracing::debug!("bus writer stopped");
        for reply in shutdown_replies {
            if reply.send(()).is_err() {
                tracing::trace!("close waiter went away");
            }
        }
    }

    /// Deletes records past the retention when a step is due: at most
    /// [`TRIM_CHUNK`] in all, each older than `max_age` and below the lowest
    /// offset any group has committed on its partition (topics no group
    /// reads here, listed in `unconsumed`, need none). The newest record of
    /// a partition is always kept: it fixes the end offset when the log is
    /// opened again.
    fn maybe_trim(&mut self) {
        let Some(r) = &self.retention else { return };
        let now_instant = std::time::Instant::now();
        if now_instant < self.next_trim {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let cutoff = now.saturating_sub(i64::try_from(r.max_age.as_millis()).unwrap_or(i64::MAX));
        let mut budget = TRIM_CHUNK;
        'topics: for (ti, topic) in self.topics.iter().enumerate() {
            let unconsumed = r.unconsumed.iter().any(|t| *t == topic.name);
            for p in 0..topic.partitions {
                if budget == 0 {
                    break 'topics;
                }
                let end = self.next[ti][p as usize];
                if end <= 1 {
                    continue;
                }
                let committed: rusqlite::Result<Option<i64>> = self
                    .conn
                    .prepare_cached(MIN_COMMITTED)
                    .and_then(|mut s| s.query_row(params![topic.name, p], |row| row.get(0)));
                let below = match committed {
                    Ok(Some(c)) => (c as u64).min(end - 1),
                    Ok(None) if unconsumed => end - 1,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, topic = %topic.name, "cannot read committed offsets; not trimming");
                        continue;
                    }
                };
                match self.conn.prepare_cached(DELETE_OLD).and_then(|mut s| {
                    s.execute(params![topic.name, p, below as i64, cutoff, budget])
                }) {
                    Ok(n) => budget -= n as i64,
                    Err(e) => {
                        tracing::warn!(error = %e, topic = %topic.name, "trimming the log failed; will try again");
                    }
                }
            }
        }
        let deleted = TRIM_CHUNK - budget;
        if deleted > 0 {
            tracing::debug!(deleted, "old records trimmed from the embedded log");
        }
        // More may be waiting: come back soon, between publishes.
        self.next_trim = now_instant
            + if budget == 0 {
                TRIM_PAUSE
            } else {
                r.check_every
            };
    }

    /// Writes one batch in one transaction and answers every request in it.
    fn process(&mut self, batch: Vec<Request>) {
        let outcome = self.apply(&batch);
        let results = match outcome {
            Ok((results, next)) => {
                self.publish_ends(next);
                results
            }
            Err(e) => {
                let requests = batch.len();
                tracing::error!(error = %e, requests, "bus write failed; batch rolled back");
                // A failed COMMIT may or may not have reached the disk: trust
                // the database, not memory, for the next offsets.
                match load_ends(&self.conn, &self.topics) {
                    Ok(next) => self.publish_ends(next),
                    Err(e) => {
                        tracing::error!(error = %e, "reloading bus end offsets failed");
                    }
                }
                let msg = format!("write batch: {e}");
                batch
                    .iter()
                    .map(|_| Err(BusError::Io(msg.clone())))
                    .collect()
            }
        };
        for (req, result) in batch.into_iter().zip(results) {
            let delivered = match req {
                Request::Publish { reply, .. } => reply.send(result).is_ok(),
                Request::Commit { reply, .. } | Request::Ping { reply } => {
                    reply.send(result.map(|_| ())).is_ok()
                }
                Request::Shutdown { .. } => true,
            };
            if !delivered {
                tracing::trace!("bus caller went away before its reply");
            }
        }
    }

    /// Runs the batch inside `BEGIN IMMEDIATE … COMMIT`. Returns one result
    /// per request and the next offsets after the commit; memory is untouched
    /// unless the transaction committed.
    fn apply(&mut self, batch: &[Request]) -> rusqlite::Result<(Vec<Outcome>, Vec<Vec<u64>>)> {
        let ts = now_ms();
        let mut next = self.next.clone();
        let mut results = Vec::with_capacity(batch.len());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for req in batch {
            match req {
                Request::Publish { records, .. } => {
                    let mut insert = tx.prepare_cached(INSERT_RECORD)?;
                    let mut positions = Vec::with_capacity(records.len());
                    for r in records {
                        let topic = &self.topics[r.topic];
                        let slot = &mut next[r.topic][r.partition as usize];
                        insert.execute(params![
                            topic.name,
                            r.partition,
                            *slot,
                            r.key,
                            r.payload,
                            ts
                        ])?;
                        positions.push(Position {
                            partition: r.partition,
                            offset: *slot,
                        });
                        *slot += 1;
                    }
                    results.push(Ok(positions));
                }
                Request::Commit {
                    group,
                    topic,
                    offsets,
                    ..
                } => {
                    let t = &self.topics[*topic];
                    let ends = &next[*topic];
                    let past_end = offsets
                        .iter()
                        .find(|(p, o)| ends.get(*p as usize).is_none_or(|end| *o > *end));
                    if let Some((p, o)) = past_end {
                        let end = ends.get(*p as usize).copied().unwrap_or(0);
                        results.push(Err(BusError::Config(format!(
                            "cannot commit offset {o} on {}/{p}: the partition ends at {end}",
                            t.name
                        ))));
                        continue;
                    }
                    let mut upsert = tx.prepare_cached(UPSERT_OFFSET)?;
                    for (p, o) in offsets {
                        upsert.execute(params![group, t.name, p, o])?;
                    }
                    results.push(Ok(Vec::new()));
                }
                Request::Ping { .. } => {
                    tx.query_row("SELECT count(*) FROM topics", [], |row| {
                        row.get::<_, i64>(0)
                    })?;
                    results.push(Ok(Vec::new()));
                }
                Request::Shutdown { .. } => results.push(Ok(Vec::new())),
            }
        }
        tx.commit()?;
        Ok((results, next))
    }

    /// Makes new end offsets visible to readers and wakes the consumers of
    /// every topic that grew.
    fn publish_ends(&mut self, next: Vec<Vec<u64>>) {
        for (topic, (old, new)) in self.topics.iter().zip(self.next.iter().zip(&next)) {
            if old == new {
                continue;
            }
            for (end, value) in topic.ends.iter().zip(new) {
                end.store(*value, Ordering::Release);
            }
            topic.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        self.next = next;
    }
}

fn admit(
    req: Request,
    batch: &mut Vec<Request>,
    records: &mut usize,
    stopping: &mut bool,
    shutdown_replies: &mut Vec<oneshot::Sender<()>>,
) {
    match req {
        Request::Shutdown { reply } => {
            *stopping = true;
            shutdown_replies.extend(reply);
        }
        Request::Publish { records: ref r, .. } => {
            *records += r.len();
            batch.push(req);
        }
        other => {
            *records += 1;
            batch.push(other);
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
