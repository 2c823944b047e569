use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::*;

const TOPICS: &[&str] = &["t", "u"];

fn open(dir: &Path) -> EmbeddedBus {
    EmbeddedBus::open(EmbeddedConfig::new(dir), TOPICS).unwrap()
}

/// Polls until `n` records arrived, then checks nothing more comes.
async fn drain(consumer: &mut Box<dyn Consumer>, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = consumer.poll(1000, Duration::from_secs(10)).await.unwrap();
        assert!(
            !batch.is_empty(),
            "nothing after {} of {n} records",
            out.len()
        );
        out.extend(batch);
    }
    let extra = consumer.poll(100, Duration::from_millis(50)).await.unwrap();
    assert!(extra.is_empty(), "unexpected records: {extra:?}");
    assert_eq!(out.len(), n);
    out
}

/// The next offset after the last record of each partition in `records`.
fn next_offsets(records: &[Record]) -> Vec<(u32, u64)> {
    let mut next: HashMap<u32, u64> = HashMap::new();
    for r in records {
        let slot = next.entry(r.partition).or_default();
        *slot = (*slot).max(r.offset + 1);
    }
    let mut out: Vec<_> = next.into_iter().collect();
    out.sort_unstable();
    out
}

fn seq(payload: &[u8]) -> u32 {
    std::str::from_utf8(payload).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn consumes_in_publish_order_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let mut positions = HashMap::new();
    for i in 0..300u32 {
        let key = format!("key-{}", i % 7);
        let pos = if i % 3 == 0 {
            bus.publish("t", key.as_bytes(), i.to_string().into_bytes())
                .await
                .unwrap()
        } else {
            let out = Outgoing {
                topic: "t".into(),
                key: key.clone().into_bytes(),
                payload: i.to_string().into_bytes(),
            };
            bus.publish_batch(vec![out]).await.unwrap()[0]
        };
        assert_eq!(pos.partition, partition_for(key.as_bytes(), 8));
        positions.insert(i, pos);
    }

    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    let records = drain(&mut consumer, 300).await;
    let mut last: HashMap<Vec<u8>, u32> = HashMap::new();
    for r in &records {
        assert_eq!(r.topic, "t");
        let n = seq(&r.payload);
        assert_eq!(
            positions[&n],
            Position {
                partition: r.partition,
                offset: r.offset
            }
        );
        if let Some(prev) = last.insert(r.key.clone(), n) {
            assert!(prev < n, "key {:?}: {prev} came before {n}", r.key);
        }
        assert!(r.timestamp_ms > 1_600_000_000_000);
    }
    assert_eq!(last.len(), 7);
    // Nothing was published to the other topic.
    let mut other = bus.subscribe("u", "g").await.unwrap();
    assert!(other.poll(10, Duration::ZERO).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_keeps_order_and_lands_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let batch: Vec<Outgoing> = (0..50u32)
        .map(|i| Outgoing {
            topic: if i % 2 == 0 { "t" } else { "u" }.into(),
            key: b"same".to_vec(),
            payload: i.to_string().into_bytes(),
        })
        .collect();
    let positions = bus.publish_batch(batch).await.unwrap();
    assert_eq!(positions.len(), 50);
    let p = partition_for(b"same", 8);
    for (i, pos) in positions.iter().enumerate() {
        assert_eq!(
            *pos,
            Position {
                partition: p,
                offset: (i / 2) as u64
            }
        );
    }
    let t = bus.read_range("t", p, 0, 100).await.unwrap();
    let u = bus.read_range("u", p, 0, 100).await.unwrap();
    assert_eq!(
        t.iter().map(|r| seq(&r.payload)).collect::<Vec<_>>(),
        (0..50).step_by(2).collect::<Vec<_>>()
    );
    assert_eq!(
        u.iter().map(|r| seq(&r.payload)).collect::<Vec<_>>(),
        (1..50).step_by(2).collect::<Vec<_>>()
    );
    assert!(bus.publish_batch(Vec::new()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_groups_each_see_everything() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    for i in 0..100u32 {
        bus.publish("t", format!("k{i}").as_bytes(), i.to_string().into_bytes())
            .await
            .unwrap();
    }
    let mut a = bus.subscribe("t", "a").await.unwrap();
    let mut b = bus.subscribe("t", "b").await.unwrap();
    let ra = drain(&mut a, 100).await;
    // Committing in one group does not affect the other.
    a.commit(&next_offsets(&ra)).await.unwrap();
    let rb = drain(&mut b, 100).await;
    let seen = |rs: &[Record]| rs.iter().map(|r| seq(&r.payload)).collect::<HashSet<_>>();
    assert_eq!(seen(&ra), (0..100).collect());
    assert_eq!(seen(&rb), (0..100).collect());
    assert!(
        bus.lag("t", "a")
            .await
            .unwrap()
            .iter()
            .all(|(_, l)| *l == 0)
    );
    assert_eq!(
        bus.lag("t", "b")
            .await
            .unwrap()
            .iter()
            .map(|(_, l)| l)
            .sum::<u64>(),
        100
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reopening_resumes_from_committed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    for i in 0..80u32 {
        bus.publish(
            "t",
            format!("k{}", i % 10).as_bytes(),
            i.to_string().into_bytes(),
        )
        .await
        .unwrap();
    }
    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    let first = consumer.poll(30, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 30);
    consumer.commit(&next_offsets(&first)).await.unwrap();
    // Polled but never committed: must come back after the restart.
    let second = consumer.poll(1000, Duration::from_secs(5)).await.unwrap();
    assert_eq!(second.len(), 50);
    let lag: u64 = bus
        .lag("t", "g")
        .await
        .unwrap()
        .iter()
        .map(|(_, l)| l)
        .sum();
    assert_eq!(lag, 50);
    let ends = bus.end_offsets("t").unwrap();
    drop(consumer);
    drop(bus);

    let bus = open(dir.path());
    assert_eq!(bus.end_offsets("t").unwrap(), ends);
    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    let again = drain(&mut consumer, 50).await;
    let expect: HashSet<_> = second.iter().map(|r| (r.partition, r.offset)).collect();
    let got: HashSet<_> = again.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(got, expect);
    // Offsets continue after the stored ones.
    let pos = bus.publish("t", b"k0", b"80".to_vec()).await.unwrap();
    assert_eq!(pos.offset, ends[pos.partition as usize]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_open_of_the_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let err = EmbeddedBus::open(EmbeddedConfig::new(dir.path()), TOPICS).unwrap_err();
    match &err {
        BusError::Config(msg) => {
            assert!(msg.contains("is in use by another process"), "{msg}");
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    drop(bus);
    open(dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_topics_and_bad_partitions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let unknown =
        |r: Result<_, BusError>| matches!(r, Err(BusError::UnknownTopic(t)) if t == "nope");
    assert!(unknown(
        bus.publish("nope", b"k", b"x".to_vec()).await.map(|_| ())
    ));
    assert!(unknown(bus.subscribe("nope", "g").await.map(|_| ())));
    assert!(unknown(bus.lag("nope", "g").await.map(|_| ())));
    assert!(unknown(bus.read_range("nope", 0, 0, 10).await.map(|_| ())));
    assert!(unknown(bus.partitions("nope").map(|_| ())));
    // One unknown topic refuses the whole batch.
    let batch = vec![
        Outgoing {
            topic: "t".into(),
            key: b"k".to_vec(),
            payload: b"x".to_vec(),
        },
        Outgoing {
            topic: "nope".into(),
            key: b"k".to_vec(),
            payload: b"x".to_vec(),
        },
    ];
    assert!(unknown(bus.publish_batch(batch).await.map(|_| ())));
    assert_eq!(bus.end_offsets("t").unwrap(), vec![0; 8]);

    assert!(matches!(
        bus.read_range("t", 8, 0, 10).await,
        Err(BusError::Config(_))
    ));
    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    assert!(matches!(
        consumer.commit(&[(8, 0)]).await,
        Err(BusError::Config(_))
    ));
    // Committing past the end would skip records never seen.
    let err = consumer.commit(&[(0, 1)]).await.unwrap_err();
    assert!(
        matches!(&err, BusError::Config(m) if m.contains("ends at 0")),
        "{err}"
    );
    consumer.commit(&[(0, 0)]).await.unwrap();
    assert!(matches!(
        bus.subscribe("t", "").await.map(|_| ()),
        Err(BusError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_publishers_get_distinct_positions_and_records_arrive_once() {
    const TASKS: u32 = 20;
    const EACH: u32 = 500;
    let dir = tempfile::tempdir().unwrap();
    let bus = EmbeddedBus::open(
        EmbeddedConfig {
            max_batch: 256,
            ..EmbeddedConfig::new(dir.path())
        },
        TOPICS,
    )
    .unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for i in 0..EACH {
                let payload = format!("{}", t * EACH + i).into_bytes();
                positions.push(
                    bus.publish("t", format!("task-{t}").as_bytes(), payload)
                        .await
                        .unwrap(),
                );
            }
            positions
        }));
    }
    let mut positions = HashSet::new();
    for task in tasks {
        for pos in task.await.unwrap() {
            assert!(
                positions.insert((pos.partition, pos.offset)),
                "position {pos} handed out twice"
            );
        }
    }
    assert_eq!(positions.len(), (TASKS * EACH) as usize);

    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    let records = drain(&mut consumer, (TASKS * EACH) as usize).await;
    let mut seen = HashSet::new();
    let mut last: HashMap<Vec<u8>, u32> = HashMap::new();
    for r in &records {
        let n = seq(&r.payload);
        assert!(seen.insert(n), "record {n} delivered twice");
        assert!(positions.contains(&(r.partition, r.offset)));
        if let Some(prev) = last.insert(r.key.clone(), n) {
            assert!(prev < n, "{:?}: {prev} before {n}", r.key);
        }
    }
    assert_eq!(seen.len(), (TASKS * EACH) as usize);
    consumer.commit(&next_offsets(&records)).await.unwrap();
    assert!(
        bus.lag("t", "g")
            .await
            .unwrap()
            .iter()
            .all(|(_, l)| *l == 0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_poll_wakes_on_publish() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    // An empty topic with a short wait returns empty.
    assert!(
        consumer
            .poll(10, Duration::from_millis(20))
            .await
            .unwrap()
            .is_empty()
    );

    let publisher = bus.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        publisher
            .publish("t", b"k", b"hello".to_vec())
            .await
            .unwrap();
    });
    let started = Instant::now();
    let got = consumer.poll(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"hello");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn close_flushes_and_refuses_further_work() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    bus.ready().await.unwrap();
    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    let waiting = tokio::spawn(async move {
        let out = consumer.poll(10, Duration::from_secs(30)).await;
        (consumer, out)
    });
    bus.publish("t", b"k", b"x".to_vec()).await.unwrap();
    let (mut consumer, first) = waiting.await.unwrap();
    assert_eq!(first.unwrap().len(), 1);

    bus.close().await;
    assert!(matches!(
        bus.publish("t", b"k", b"y".to_vec()).await,
        Err(BusError::Closed)
    ));
    assert!(matches!(bus.ready().await, Err(BusError::Closed)));
    assert!(matches!(
        consumer.poll(10, Duration::from_secs(1)).await,
        Err(BusError::Closed)
    ));
    assert!(matches!(
        consumer.commit(&[(0, 0)]).await,
        Err(BusError::Closed)
    ));
    bus.close().await;

    // The directory is free again even though handles still exist.
    let again = open(dir.path());
    let total: u64 = again.end_offsets("t").unwrap().iter().sum();
    assert_eq!(total, 1);
    drop(consumer);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_keeps_its_partition_count() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let config = EmbeddedConfig {
        partitions: 3,
        ..EmbeddedConfig::new(dir.path())
    };
    let bus = EmbeddedBus::open(config, &["t", "new", "t"]).unwrap();
    assert_eq!(bus.partitions("t").unwrap(), 8);
    assert_eq!(bus.partitions("new").unwrap(), 3);
    assert!(bus.partitions("u").is_err());
    let pos = bus.publish("t", b"abc", b"x".to_vec()).await.unwrap();
    assert_eq!(pos.partition, partition_for(b"abc", 8));
    assert!(matches!(
        EmbeddedBus::open(
            EmbeddedConfig {
                partitions: 0,
                ..EmbeddedConfig::new(dir.path())
            },
            TOPICS
        ),
        Err(BusError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn read_range_pages_through_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    for i in 0..25u32 {
        bus.publish("u", b"one-key", i.to_string().into_bytes())
            .await
            .unwrap();
    }
    let p = partition_for(b"one-key", 8);
    let page = bus.read_range("u", p, 10, 10).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (10..20).collect::<Vec<_>>()
    );
    assert_eq!(page[0].key, b"one-key");
    assert_eq!(bus.read_range("u", p, 20, 100).await.unwrap().len(), 5);
    assert!(bus.read_range("u", p, 25, 100).await.unwrap().is_empty());
    assert!(
        bus.read_range("u", (p + 1) % 8, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn poll_shares_a_batch_across_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    // Two keys on different partitions, each with a deep backlog.
    let (a, b) = (b"a".as_slice(), b"c".as_slice());
    assert_ne!(partition_for(a, 8), partition_for(b, 8));
    for i in 0..100u32 {
        let out = |key: &[u8]| Outgoing {
            topic: "t".into(),
            key: key.to_vec(),
            payload: i.to_string().into_bytes(),
        };
        bus.publish_batch(vec![out(a), out(b)]).await.unwrap();
    }
    let mut consumer = bus.subscribe("t", "g").await.unwrap();
    let batch = consumer.poll(20, Duration::ZERO).await.unwrap();
    assert_eq!(batch.len(), 20);
    assert_eq!(batch.iter().filter(|r| r.key == a).count(), 10);
    assert_eq!(batch.iter().filter(|r| r.key == b).count(), 10);
    let rest = drain(&mut consumer, 180).await;
    assert_eq!(rest.iter().filter(|r| r.key == a).count(), 90);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_1_log_keeps_its_records_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    {
        // A log as the first schema wrote it: records in a WITHOUT ROWID table.
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(
            r#"INSERT INTO topics (name, partitions) VALUES ('t', 2), ('u', 2);
            INSERT INTO records (topic, "partition", "offset", key, payload, ts) VALUES
                ('t', 0, 0, x'6b', x'30', 1), ('t', 0, 1, x'6b', x'31', 2),
                ('t', 1, 0, x'6c', x'32', 3), ('u', 0, 0, x'6d', x'33', 4);
            INSERT INTO offsets (grp, topic, "partition", next_offset) VALUES ('g', 't', 0, 1);
            PRAGMA user_version = 1;"#,
        )
        .unwrap();
    }
    let bus = open(dir.path());
    assert_eq!(bus.end_offsets("t").unwrap(), vec![2, 1]);
    assert_eq!(bus.end_offsets("u").unwrap(), vec![1, 0]);
    let got = bus.read_range("t", 0, 0, 10).await.unwrap();
    let payloads: Vec<_> = got.iter().map(|r| seq(&r.payload)).collect();
    assert_eq!(payloads, vec![0, 1]);
    assert_eq!(got[1].offset, 1);
    assert_eq!(got[1].timestamp_ms, 2);
    // The group resumes where it committed; new records follow the old ones.
    let mut c = bus.subscribe("t", "g").await.unwrap();
    let pos = bus.publish("t", b"k", b"4".to_vec()).await.unwrap();
    assert_eq!(pos.offset, [2, 1][pos.partition as usize]);
    let rest = drain(&mut c, 3).await;
    let mut seen: Vec<_> = rest.iter().map(|r| seq(&r.payload)).collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 4]);
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_only_what_every_group_is_past() {
    let dir = tempfile::tempdir().unwrap();
    let config = |retention| EmbeddedConfig {
        partitions: 1,
        retention,
        ..EmbeddedConfig::new(dir.path())
    };
    let retention = Retention {
        max_age: Duration::ZERO,
        unconsumed: vec!["ev".into()],
        check_every: Duration::from_millis(20),
    };
    let topics = &["in", "ev", "dlq"];
    let bus = EmbeddedBus::open(config(Some(retention.clone())), topics).unwrap();
    for topic in topics {
        for i in 0..10u32 {
            bus.publish(topic, b"k", i.to_string().into_bytes())
                .await
                .unwrap();
        }
    }
    let offsets = |bus: EmbeddedBus, topic: &'static str| async move {
        bus.read_range(topic, 0, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.offset)
            .collect::<Vec<_>>()
    };
    // Nothing goes before a group has read it: `in` is consumed here.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        offsets(bus.clone(), "in").await,
        (0..10).collect::<Vec<_>>()
    );
    // Two groups: the slower one holds the line. (A group counts once it
    // has committed, so the slow one commits first here.)
    let mut fast = bus.subscribe("in", "fast").await.unwrap();
    let mut slow = bus.subscribe("in", "slow").await.unwrap();
    drain(&mut fast, 10).await;
    slow.commit(&[(0, 6)]).await.unwrap();
    fast.commit(&[(0, 10)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        offsets(bus.clone(), "in").await,
        (6..10).collect::<Vec<_>>()
    );
    // A topic no group reads here keeps only its newest record; one that is
    // neither read nor listed (the dead letters) keeps everything.
    assert_eq!(offsets(bus.clone(), "ev").await, [9]);
    assert_eq!(
        offsets(bus.clone(), "dlq").await,
        (0..10).collect::<Vec<_>>()
    );
    // Everyone past everything: the newest record stays, so the end offsets
    // survive a reopen.
    slow.commit(&[(0, 10)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(offsets(bus.clone(), "in").await, [9]);
    drop((fast, slow));
    bus.close().await;
    drop(bus);
    let bus = EmbeddedBus::open(config(None), topics).unwrap();
    assert_eq!(bus.end_offsets("in").unwrap(), [10]);
    let pos = bus.publish("ev", b"k", b"10".to_vec()).await.unwrap();
    assert_eq!(pos.offset, 10);
    // A new group starts at the oldest record kept.
    let mut late = bus.subscribe("in", "late").await.unwrap();
    let got = drain(&mut late, 1).await;
    assert_eq!(got[0].offset, 9);
}
