//! What only PostgreSQL shows: several instances on one database at once,
//! versioned migrations, the outbox shared by publishers, error classes.

use std::collections::HashSet;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use switchboard_core::{Channel, Retryable, ThreadRule};
use switchboard_store::{NewMessage, PgStore, PgTestSchema, Store, StoreError, Tx};
use uuid::Uuid;

use crate::cases::{conversation, customer, ident, inbound, new_conv, store};

const T0: i64 = 1_790_000_000_000;

macro_rules! schema {
    ($name:literal) => {
        match PgTestSchema::from_env($name) {
            Some(s) => s,
            None => return,
        }
    };
}

/// Runs `step` in a transaction until it commits, retrying while the store
/// is unavailable (as the router does with a batch); returns its value and
/// the number of retries.
fn retrying<T>(
    s: &dyn Store,
    mut step: impl FnMut(&mut dyn Tx, usize) -> Result<T, StoreError>,
) -> (T, usize) {
    for attempt in 0..20 {
        let mut tx = s.begin().unwrap();
        let res = step(&mut *tx, attempt).and_then(|v| tx.commit().map(|()| v));
        match res {
            Ok(v) => return (v, attempt),
            Err(e) if e.retryable() => continue,
            Err(e) => panic!("not retryable: {e}"),
        }
    }
    panic!("no attempt committed")
}

#[test]
fn migrations_are_versioned_and_safe_to_race() {
    let schema = schema!("migrations_are_versioned_and_safe_to_race");
    // Several instances starting at once on an empty schema.
    let stores: Vec<PgStore> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| schema.open(1))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    for s in &stores {
        assert_eq!(s.schema_version().unwrap(), PgStore::SCHEMA_VERSION);
    }
    drop(stores);
    // Opening a current schema changes nothing.
    let again = schema.open(1).unwrap();
    assert_eq!(again.schema_version().unwrap(), PgStore::SCHEMA_VERSION);
    drop(again);
    // A newer schema is refused.
    schema
        .execute("INSERT INTO schema_version (version) VALUES (99)")
        .unwrap();
    match schema.open(1) {
        Err(StoreError::TooNew { found, supported }) => {
            assert_eq!((found, supported), (99, PgStore::SCHEMA_VERSION));
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
}

#[test]
fn racing_instances_make_one_customer_per_identity() {
    let schema = schema!("racing_instances_make_one_customer_per_identity");
    let a = schema.open(2).unwrap();
    let b = schema.open(2).unwrap();
    let who = ident("email:ada@example.org");
    let barrier = Barrier::new(2);
    let created = Mutex::new(Vec::new());
    let results: Vec<(Uuid, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|s| {
                let (who, barrier, created) = (&who, &barrier, &created);
                scope.spawn(move || {
                    retrying(s, |tx, attempt| {
                        let owner = tx.owner_of(who)?;
                        if attempt == 0 {
                            // Both looked before either wrote.
                            barrier.wait();
                        }
                        if let Some(o) = owner {
                            return Ok(o);
                        }
                        let c = Uuid::now_v7();
                        created.lock().unwrap().push(c);
                        tx.create_customer(c, T0)?;
                        tx.attach_identity(who, c, "first seen", T0)?;
                        Ok(c)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0].0, results[1].0, "one customer for both");
    assert!(
        results[0].1 + results[1].1 >= 1,
        "the loser must have retried"
    );
    let winner = results[0].0;
    let created = created.into_inner().unwrap();
    assert!(created.len() >= 2);
    for c in created {
        assert_eq!(a.customer(c).unwrap().is_some(), c == winner, "{c}");
    }
    let mut tx = a.begin().unwrap();
    assert_eq!(tx.owner_of(&who).unwrap(), Some(winner));
    assert_eq!(tx.identities_of(winner).unwrap(), vec![who.clone()]);
}

#[test]
fn racing_redelivery_is_retried_into_a_duplicate() {
    let schema = schema!("racing_redelivery_is_retried_into_a_duplicate");
    let a = schema.open(2).unwrap();
    let b = schema.open(2).unwrap();
    let mut tx = a.begin().unwrap();
    let c = customer(&mut *tx, &["email:ada@example.org"]);
    tx.commit().unwrap();
    let env = inbound("m1", "email:ada@example.org", Channel::Email, 0);
    let barrier = Barrier::new(2);
    let outcomes: Vec<(bool, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|s| {
                let (env, barrier) = (&env, &barrier);
                scope.spawn(move || {
                    retrying(s, |tx, attempt| {
                        let found = tx.message_by_key(&env.idempotency_key)?;
                        if attempt == 0 {
                            barrier.wait();
                        }
                        if found.is_some() {
                            return Ok(false);
                        }
                        let conv = new_conv(c, Channel::Email, 0);
                        tx.insert_conversation(&conv)?;
                        // The loser fails to serialize here or at commit,
                        // never with a rejection.
                        tx.insert_message(&NewMessage {
                            envelope: env,
                            customer_id: c,
                            conversation_id: conv.id,
                            rule: ThreadRule::New,
                            status: None,
                        })?;
                        Ok(true)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stored: Vec<bool> = outcomes.iter().map(|o| o.0).collect();
    assert!(
        stored == [true, false] || stored == [false, true],
        "{outcomes:?}"
    );
    let t = a.timeline(c, None, 10).unwrap().unwrap();
    assert_eq!(t.messages.len(), 1);
    assert_eq!(
        t.conversations.len(),
        1,
        "the loser's conversation rolled back"
    );
}

#[test]
fn racing_commands_apply_once() {
    let schema = schema!("racing_commands_apply_once");
    let a = schema.open(2).unwrap();
    let b = schema.open(2).unwrap();
    let cmd = Uuid::now_v7();
    let barrier = Barrier::new(2);
    let applied: Vec<(bool, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|s| {
                let barrier = &barrier;
                scope.spawn(move || {
                    retrying(s, |tx, attempt| {
                        tx.resolve_customer(cmd)?;
                        if attempt == 0 {
                            barrier.wait();
                        }
                        let first = tx.first_application(cmd, T0)?;
                        if first {
                            tx.push_outbox("events", b"applied", cmd.as_bytes())?;
                        }
                        Ok(first)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(applied.iter().filter(|a| a.0).count(), 1, "{applied:?}");
    let published = a.outbox(10).unwrap().len() + b.outbox(10).unwrap().len();
    assert_eq!(published, 1);
}

#[test]
fn each_instance_publishes_its_own_outbox_rows() {
    let schema = schema!("each_instance_publishes_its_own_outbox_rows");
    let a = schema.open(2).unwrap();
    let b = schema.open(2).unwrap();
    let push = |s: &PgStore, key: &str| {
        let mut tx = s.begin().unwrap();
        tx.push_outbox("events", key.as_bytes(), b"").unwrap();
        tx.commit().unwrap();
    };
    push(&a, "a1");
    push(&b, "b1");
    push(&a, "a2");
    let keys = |s: &PgStore| -> Vec<String> {
        s.outbox(10)
            .unwrap()
            .iter()
            .map(|r| String::from_utf8(r.key.clone()).unwrap())
            .collect()
    };
    assert_eq!(keys(&a), ["a1", "a2"]);
    assert_eq!(keys(&b), ["b1"]);
    let last_a = a.outbox(10).unwrap().last().unwrap().seq;
    // Done with everything up to a2, which lies past b1: b1 stays b's.
    a.outbox_done(last_a).unwrap();
    assert!(keys(&a).is_empty());
    assert_eq!(keys(&b), ["b1"]);
    let last_b = b.outbox(10).unwrap().last().unwrap().seq;
    b.outbox_done(last_b).unwrap();
    assert!(keys(&b).is_empty());
}

#[test]
fn rows_of_a_silent_instance_are_taken_over_after_the_lease() {
    let schema = schema!("rows_of_a_silent_instance_are_taken_over_after_the_lease");
    let dead = schema.open(1).unwrap();
    let mut tx = dead.begin().unwrap();
    for i in 0..3 {
        tx.push_outbox("events", format!("d{i}").as_bytes(), b"")
            .unwrap();
    }
    tx.commit().unwrap();
    let listed = dead.outbox(2).unwrap();
    assert_eq!(listed.len(), 2);
    drop(dead);

    let heir = schema.open(1).unwrap();
    assert!(
        heir.outbox(10).unwrap().is_empty(),
        "still within the lease"
    );
    schema
        .execute("UPDATE outbox SET touched_at = touched_at - interval '1 hour'")
        .unwrap();
    let taken = heir.outbox(2).unwrap();
    assert_eq!(
        taken.iter().map(|r| r.seq).collect::<Vec<_>>(),
        listed.iter().map(|r| r.seq).collect::<Vec<_>>()
    );
    let all = heir.outbox(10).unwrap();
    assert_eq!(all.len(), 3);
    // Another instance finds them freshly claimed.
    let third = schema.open(1).unwrap();
    assert!(third.outbox(10).unwrap().is_empty());
    third.outbox_done(i64::MAX).unwrap();
    heir.outbox_done(all[2].seq).unwrap();
    assert!(heir.outbox(10).unwrap().is_empty());

    // A short lease lets an instance take over on its own.
    let quick = schema.open(1).unwrap().with_outbox_lease(Duration::ZERO);
    let mut tx = third.begin().unwrap();
    tx.push_outbox("events", b"orphan", b"").unwrap();
    tx.commit().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(quick.outbox(10).unwrap().len(), 1);
    assert!(third.outbox(10).unwrap().is_empty(), "taken over");
    quick.outbox_done(i64::MAX).unwrap();
    assert!(quick.outbox(10).unwrap().is_empty());
}

#[test]
fn a_restarted_instance_with_a_stable_id_publishes_its_leftovers_at_once() {
    let schema = schema!("a_restarted_instance_with_a_stable_id_publishes_its_leftovers_at_once");
    let id = Uuid::now_v7();
    let before = schema.open(1).unwrap().with_instance_id(id);
    assert_eq!(before.instance_id(), id);
    let mut tx = before.begin().unwrap();
    tx.push_outbox("events", b"unlisted", b"").unwrap();
    tx.push_outbox("events", b"listed", b"").unwrap();
    tx.commit().unwrap();
    assert_eq!(before.outbox(1).unwrap().len(), 1);
    drop(before);
    let after = schema.open(1).unwrap().with_instance_id(id);
    let left = after.outbox(10).unwrap();
    assert_eq!(left.len(), 2);
    after.outbox_done(left[1].seq).unwrap();
    assert!(after.outbox(10).unwrap().is_empty());
}

#[test]
fn concurrent_publishers_never_share_a_row() {
    let schema = schema!("concurrent_publishers_never_share_a_row");
    let dead = schema.open(1).unwrap();
    let mut tx = dead.begin().unwrap();
    for i in 0..300 {
        tx.push_outbox("events", format!("{i}").as_bytes(), b"")
            .unwrap();
    }
    tx.commit().unwrap();
    drop(dead);
    schema
        .execute("UPDATE outbox SET touched_at = touched_at - interval '1 hour'")
        .unwrap();
    let publishers: Vec<PgStore> = (0..3).map(|_| schema.open(1).unwrap()).collect();
    let published: Vec<Vec<i64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = publishers
            .iter()
            .map(|p| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let batch = p.outbox(7).unwrap();
                        let Some(last) = batch.last().map(|r| r.seq) else {
                            return mine;
                        };
                        mine.extend(batch.iter().map(|r| r.seq));
                        p.outbox_done(last).unwrap();
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: usize = published.iter().map(Vec::len).sum();
    let distinct: HashSet<i64> = published.iter().flatten().copied().collect();
    assert_eq!(total, 300, "every row once: {published:?}");
    assert_eq!(distinct.len(), 300);
    for p in &published {
        assert!(p.windows(2).all(|w| w[0] < w[1]), "each in order");
    }
}

#[test]
fn outbox_done_keeps_rows_that_committed_late() {
    let schema = schema!("outbox_done_keeps_rows_that_committed_late");
    let s = schema.open(3).unwrap();
    // A transaction of this instance takes the lower seq but commits last.
    // (The store writes a transaction's outbox rows at its commit, so this
    // window is short; a plain client holds it open here.)
    let mut slow = postgres::Client::connect(&schema.url(), postgres::NoTls).unwrap();
    slow.batch_execute("BEGIN").unwrap();
    slow.execute(
        "INSERT INTO outbox (topic, key, payload, owner) VALUES ('events', 'slow', '', $1)",
        &[&s.instance_id()],
    )
    .unwrap();
    let mut quick = s.begin().unwrap();
    quick.push_outbox("events", b"quick", b"").unwrap();
    quick.commit().unwrap();
    let first = s.outbox(10).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].key, b"quick");
    slow.batch_execute("COMMIT").unwrap();
    s.outbox_done(first[0].seq).unwrap();
    let rest = s.outbox(10).unwrap();
    assert_eq!(rest.len(), 1, "the late row was not published yet");
    assert_eq!(rest[0].key, b"slow");
    assert!(rest[0].seq < first[0].seq);
}

#[test]
fn outbox_rows_keep_their_order_and_savepoints_undo_theirs() {
    let schema = schema!("outbox_rows_keep_their_order_and_savepoints_undo_theirs");
    let s = schema.open(1).unwrap();
    let mut tx = s.begin().unwrap();
    tx.push_outbox("events", b"1", b"").unwrap();
    tx.savepoint().unwrap();
    tx.push_outbox("events", b"undone", b"").unwrap();
    tx.rollback_to_savepoint().unwrap();
    tx.savepoint().unwrap();
    tx.push_outbox("events", b"2", b"").unwrap();
    tx.release_savepoint().unwrap();
    for i in 3..=300 {
        tx.push_outbox("events", i.to_string().as_bytes(), b"")
            .unwrap();
    }
    tx.commit().unwrap();
    let rows = s.outbox(1000).unwrap();
    let keys: Vec<String> = rows
        .iter()
        .map(|r| String::from_utf8(r.key.clone()).unwrap())
        .collect();
    let want: Vec<String> = (1..=300).map(|i| i.to_string()).collect();
    assert_eq!(keys, want);
    // A dropped transaction writes none.
    let mut tx = s.begin().unwrap();
    tx.push_outbox("events", b"dropped", b"").unwrap();
    drop(tx);
    assert_eq!(s.outbox(1000).unwrap().len(), 300);
}

#[test]
fn nul_text_is_rejected_without_aborting_the_transaction() {
    let schema = schema!("nul_text_is_rejected_without_aborting_the_transaction");
    let s = schema.open(2).unwrap();
    let mut tx = s.begin().unwrap();
    let c = customer(&mut *tx, &["email:ada@example.org"]);
    let conv = conversation(&mut *tx, c, Channel::Email, 0);
    let mut bad = inbound("m1", "email:ada@example.org", Channel::Email, 0);
    bad.text = "a\0b".into();
    let err = tx
        .insert_message(&NewMessage {
            envelope: &bad,
            customer_id: c,
            conversation_id: conv,
            rule: ThreadRule::New,
            status: None,
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err}");
    assert_eq!(tx.message_by_key("a\0b").unwrap(), None);
    assert_eq!(tx.owner_of(&ident("external:a\0b")).unwrap(), None);
    let good = inbound("m2", "email:ada@example.org", Channel::Email, 0);
    store(&mut *tx, &good, c, conv);
    tx.commit().unwrap();
    assert_eq!(s.conversation(conv).unwrap().unwrap().1.len(), 1);
}

#[test]
fn a_failed_statement_fails_the_commit_unless_rolled_back() {
    let schema = schema!("a_failed_statement_fails_the_commit_unless_rolled_back");
    let s = schema.open(2).unwrap();
    schema
        .execute("ALTER TABLE customers ADD CONSTRAINT test_recent CHECK (created_at > 0)")
        .unwrap();
    let kept = Uuid::now_v7();
    let mut tx = s.begin().unwrap();
    tx.create_customer(kept, T0).unwrap();
    tx.savepoint().unwrap();
    let err = tx.create_customer(Uuid::now_v7(), -1).unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err}");
    tx.rollback_to_savepoint().unwrap();
    tx.commit().unwrap();
    assert!(s.customer(kept).unwrap().is_some());

    let lost = Uuid::now_v7();
    let mut tx = s.begin().unwrap();
    tx.create_customer(lost, T0).unwrap();
    let err = tx.create_customer(Uuid::now_v7(), -1).unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err}");
    let err = tx.commit().unwrap_err();
    assert!(
        matches!(&err, StoreError::Rejected(m) if m.contains("rolled back")),
        "{err}"
    );
    assert!(s.customer(lost).unwrap().is_none());
    // The connection went back to the pool clean.
    for _ in 0..4 {
        let mut tx = s.begin().unwrap();
        assert!(tx.resolve_customer(kept).unwrap().is_some());
        tx.commit().unwrap();
    }
}

#[test]
fn errors_are_classified() {
    let schema = schema!("errors_are_classified");
    assert!(matches!(
        PgStore::open(&schema.url(), 0),
        Err(StoreError::Rejected(_))
    ));
    assert!(matches!(
        PgStore::open("postgres://127.0.0.1/x?no_such_option=1", 1),
        Err(StoreError::Rejected(_))
    ));
    let started = Instant::now();
    match PgStore::open("postgres://postgres@127.0.0.1:1/switchboard", 1) {
        Err(e @ StoreError::Unavailable(_)) => assert!(e.retryable()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    // A serialization failure is retryable: two transactions that each read
    // what the other writes.
    let s = schema.open(2).unwrap();
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let mut t1 = s.begin().unwrap();
    let mut t2 = s.begin().unwrap();
    assert!(!t1.is_erased(y).unwrap());
    assert!(!t2.is_erased(x).unwrap());
    t1.create_customer(x, T0).unwrap();
    t2.create_customer(y, T0).unwrap();
    t1.commit().unwrap();
    let err = t2.commit().unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.retryable());
}
