//! `switchboard dlq`: the dead letters on `dlq.v1`, listed, shown and
//! redriven, on either backend.
//!
//! A dead letter's id is its position on `dlq.v1`, `PARTITION:OFFSET`. Reads
//! go outside any consumer group, so listing commits and moves nothing. On
//! the embedded log, `list` and `show` read the file while the daemon runs;
//! `redrive` appends, and the embedded log has one writer, so it needs the
//! daemon stopped (it says so). On Kafka all three work beside the daemon.
//!
//! Redrive republishes each original record, byte for byte and under its
//! original key, to the topic it came from, for the consumers to try again
//! once its cause is fixed. A record that still fails is dead-lettered again,
//! under a new id. Redriving one that had been processed after all changes
//! nothing: routing is idempotent on the envelope's key, commands on their
//! id, outbound requests on theirs.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;
use switchboard_bus::LogReader;
use switchboard_core::bus::Outgoing;
use switchboard_core::records::DeadLetterSchema;
use switchboard_core::{Bus, DeadLetter, Record, Topics, decode};

use crate::config::{BusBackend, Config};
use crate::daemon::{BusHandle, open_bus};

/// Where a dead letter sits on `dlq.v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DlqId {
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
}

impl fmt::Display for DlqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

impl FromStr for DlqId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a dead letter id (PARTITION:OFFSET, e.g. 3:1042)");
        let (p, o) = s.split_once(':').ok_or_else(bad)?;
        Ok(DlqId {
            partition: p.trim().parse().map_err(|_| bad())?,
            offset: o.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// One record of `dlq.v1`.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its id.
    pub id: DlqId,
    /// The dead letter, or why the record on `dlq.v1` is not one.
    pub letter: Result<DeadLetter, String>,
}

/// Which dead letters a command is about. Every given condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The topic the original record came from: a full name, or a name
    /// without the deployment's prefix (`inbound.v1`).
    pub topic: Option<String>,
    /// The consumer group that gave up on it.
    pub group: Option<String>,
    /// A piece of the reason (case-insensitive).
    pub reason: Option<String>,
    /// These ids only.
    pub ids: Vec<DlqId>,
}

impl Filter {
    /// Whether no condition is set.
    pub fn is_empty(&self) -> bool {
        self.topic.is_none() && self.group.is_none() && self.reason.is_none() && self.ids.is_empty()
    }

    fn matches(&self, e: &Entry, prefix: &str) -> bool {
        if !self.ids.is_empty() && !self.ids.contains(&e.id) {
            return false;
        }
        let Ok(letter) = &e.letter else {
            // Not a dead letter: it has no topic, group or reason to match.
            return self.topic.is_none() && self.group.is_none() && self.reason.is_none();
        };
        if let Some(t) = &self.topic
            && letter.topic != *t
            && letter.topic != format!("{prefix}{t}")
        {
            return false;
        }
        if let Some(g) = &self.group
            && letter.group != *g
        {
            return false;
        }
        if let Some(r) = &self.reason
            && !letter.error.to_lowercase().contains(&r.to_lowercase())
        {
            return false;
        }
        true
    }
}

/// What the tools read `dlq.v1` through.
pub enum Source {
    /// The bus itself (Kafka, or the embedded log opened as its writer).
    Bus(Arc<dyn Bus>),
    /// The embedded log, read beside the daemon that owns it.
    Log(LogReader),
}

impl Source {
    async fn partitions(&self, topic: &str) -> anyhow::Result<u32> {
        Ok(match self {
            Source::Bus(b) => b.partitions(topic).await?,
            Source::Log(l) => l.partitions(topic)?,
        })
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> anyhow::Result<Vec<Record>> {
        Ok(match self {
            Source::Bus(b) => b.read(topic, partition, from, max).await?,
            Source::Log(l) => l.read(topic, partition, from, max)?,
        })
    }
}

/// Opens what the tools read through: for `write` (redrive) the bus as
/// the daemon opens it; otherwise, on the embedded log, a read-only view.
pub async fn open(cfg: &Config, write: bool) -> anyhow::Result<(Source, Option<BusHandle>)> {
    let topics = Topics::with_prefix(&cfg.topic_prefix);
    if matches!(cfg.bus, BusBackend::Embedded) && !write {
        let dir = cfg.data_dir.join("bus");
        return Ok((Source::Log(LogReader::open(&dir)?), None));
    }
    let (bus, handle) = open_bus(cfg, &topics).await.map_err(|e| {
        if matches!(cfg.bus, BusBackend::Embedded) && format!("{e:#}").contains("in use") {
            e.context(
                "redrive appends to the embedded log, which has one writer: stop the daemon \
                 first (list and show work while it runs)",
            )
        } else {
            e
        }
    })?;
    Ok((Source::Bus(bus), Some(handle)))
}

/// Every record of `dlq.v1` that `filter` selects, oldest first within each
/// partition, partitions in order; at most `limit`.
pub async fn scan(
    source: &Source,
    topics: &Topics,
    prefix: &str,
    filter: &Filter,
    limit: usize,
) -> anyhow::Result<Vec<Entry>> {
    const CHUNK: usize = 1000;
    let partitions = source
        .partitions(&topics.dlq)
        .await
        .with_context(|| format!("cannot read {}", topics.dlq))?;
    let mut out = Vec::new();
    for p in 0..partitions {
        let mut from = 0;
        loop {
            let records = source.read(&topics.dlq, p, from, CHUNK).await?;
            let Some(last) = records.last().map(|r| r.offset) else {
                break;
            };
            for r in records {
                let entry = Entry {
                    id: DlqId {
                        partition: p,
                        offset: r.offset,
                    },
                    letter: decode::<DeadLetter>(&r.payload, DeadLetterSchema::NAME)
                        .map_err(|e| e.to_string()),
                };
                if filter.matches(&entry, prefix) {
                    out.push(entry);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            from = last + 1;
        }
    }
    Ok(out)
}

/// The dead letter with this id.
pub async fn show(source: &Source, topics: &Topics, id: DlqId) -> anyhow::Result<Entry> {
    let records = source.read(&topics.dlq, id.partition, id.offset, 1).await?;
    let record = records
        .into_iter()
        .find(|r| r.offset == id.offset)
        .with_context(|| format!("no dead letter {id} on {}", topics.dlq))?;
    Ok(Entry {
        id,
        letter: decode::<DeadLetter>(&record.payload, DeadLetterSchema::NAME)
            .map_err(|e| e.to_string()),
    })
}

/// Republishes the originals of `entries` to their topics; returns how many.
/// Entries that are not dead letters are refused before anything is sent.
pub async fn redrive(bus: &dyn Bus, entries: &[Entry]) -> anyhow::Result<usize> {
    let mut batch = Vec::with_capacity(entries.len());
    for e in entries {
        let letter = e
            .letter
            .as_ref()
            .map_err(|why| anyhow::anyhow!("{} is not a dead letter: {why}", e.id))?;
        let (key, payload) = letter
            .original()
            .with_context(|| format!("dead letter {}: its original is not valid base64", e.id))?;
        batch.push(Outgoing {
            topic: letter.topic.clone(),
            key,
            payload,
        });
    }
    if batch.is_empty() {
        return Ok(0);
    }
    let n = batch.len();
    bus.publish_batch(batch)
        .await
        .context("cannot republish the originals")?;
    Ok(n)
}

/// One line per entry, for `dlq list`.
pub fn line(e: &Entry) -> String {
    match &e.letter {
        Ok(l) => format!(
            "{:<10} {}  {}@{}:{}  {}  {}",
            e.id.to_string(),
            l.at.format("%Y-%m-%dT%H:%M:%SZ"),
            l.topic,
            l.partition,
            l.offset,
            l.group,
            l.error.replace('\n', " ")
        ),
        Err(why) => format!("{:<10} not a dead letter: {why}", e.id.to_string()),
    }
}

/// The full text of one entry, for `dlq show`: the letter, then its
/// original payload (pretty JSON when it is JSON).
pub fn detail(e: &Entry) -> String {
    let Ok(l) = &e.letter else {
        return line(e);
    };
    let mut out = format!(
        "id:        {}\nletter id: {}\nat:        {}\nfrom:      {} partition {} offset {}\ngroup:     {}\nretryable: {}\nreason:    {}\n",
        e.id, l.id, l.at, l.topic, l.partition, l.offset, l.group, l.retryable, l.error
    );
    match l.original() {
        Ok((key, payload)) => {
            out.push_str(&format!("key:       {}\n", String::from_utf8_lossy(&key)));
            let body = serde_json::from_slice::<serde_json::Value>(&payload)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| String::from_utf8_lossy(&payload).into_owned());
            out.push_str("payload:\n");
            out.push_str(&body);
            out.push('\n');
        }
        Err(err) => out.push_str(&format!("original:  not valid base64 ({err})\n")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print() {
        let id: DlqId = "3:1042".parse().unwrap();
        assert_eq!(
            id,
            DlqId {
                partition: 3,
                offset: 1042
            }
        );
        assert_eq!(id.to_string(), "3:1042");
        assert!(
            "3-1042"
                .parse::<DlqId>()
                .unwrap_err()
                .contains("PARTITION:OFFSET")
        );
        assert!("x:1".parse::<DlqId>().is_err());
    }

    fn letter(topic: &str, group: &str, error: &str) -> Entry {
        let record = Record {
            topic: topic.into(),
            partition: 0,
            offset: 7,
            key: b"k".to_vec(),
            payload: b"{}".to_vec(),
            timestamp_ms: 0,
        };
        Entry {
            id: DlqId {
                partition: 1,
                offset: 2,
            },
            letter: Ok(DeadLetter::for_record(&record, group, error.into(), false)),
        }
    }

    #[test]
    fn filters_select_by_topic_group_reason_and_id() {
        let e = letter("sb.commands.v1", "sb-commands", "Unknown identity email:x");
        let f = |f: Filter| f.matches(&e, "sb.");
        assert!(f(Filter::default()));
        assert!(f(Filter {
            topic: Some("commands.v1".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            topic: Some("sb.commands.v1".into()),
            reason: Some("unknown IDENTITY".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            topic: Some("inbound.v1".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            group: Some("sb-router".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            ids: vec!["1:3".parse().unwrap()],
            ..Filter::default()
        }));
        assert!(f(Filter {
            ids: vec!["1:2".parse().unwrap()],
            ..Filter::default()
        }));
    }

    #[test]
    fn garbage_on_the_topic_is_listed_but_never_matches_a_letter_condition() {
        let e = Entry {
            id: DlqId {
                partition: 0,
                offset: 0,
            },
            letter: Err("malformed json".into()),
        };
        assert!(Filter::default().matches(&e, ""));
        assert!(
            !Filter {
                reason: Some("malformed".into()),
                ..Filter::default()
            }
            .matches(&e, "")
        );
        assert!(
            Filter {
                ids: vec!["0:0".parse().unwrap()],
                ..Filter::default()
            }
            .matches(&e, "")
        );
        assert!(line(&e).contains("not a dead letter"));
    }
}
