//! One behaviour suite for every `Store` implementation.
//!
//! The cases in `cases.rs` take a `&dyn Store` and are run on SQLite always
//! and on PostgreSQL when `SWITCHBOARD_TEST_POSTGRES` names a database (each
//! test in a fresh schema of its own, dropped afterwards). Without it the
//! PostgreSQL tests print a notice and pass, except under CI (`CI` set),
//! where they fail: CI provides the database. `pg.rs` holds what only
//! PostgreSQL can show (concurrent instances, migrations, error classes).

use std::sync::Arc;

use switchboard_store::{SqliteStore, Store};

mod cases;
#[cfg(feature = "postgres")]
mod pg;

/// A store under test and whatever must outlive it (a directory, a schema).
/// The store is dropped first.
pub(crate) struct Backend {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) keep: Box<dyn std::any::Any>,
}

pub(crate) fn sqlite_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("history.sqlite3")).unwrap();
    Backend {
        store: Arc::new(store),
        keep: Box::new(dir),
    }
}

/// A PostgreSQL store in a fresh schema, or `None` (after a notice) when no
/// test database is configured outside CI.
#[cfg(feature = "postgres")]
pub(crate) fn pg_backend(test: &str) -> Option<Backend> {
    let schema = switchboard_store::PgTestSchema::from_env(test)?;
    let store = schema.open(4).unwrap();
    Some(Backend {
        store: Arc::new(store),
        keep: Box::new(schema),
    })
}

/// Declares each case once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    let b = crate::sqlite_backend();
                    crate::cases::$name(&*b.store);
                }
            )*

            #[test]
            fn store_works_from_the_blocking_pool() {
                let crate::Backend { store, keep } = crate::sqlite_backend();
                crate::cases::store_works_from_the_blocking_pool(store);
                drop(keep);
            }
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if let Some(b) = crate::pg_backend(stringify!($name)) {
                        crate::cases::$name(&*b.store);
                    }
                }
            )*

            #[test]
            fn store_works_from_the_blocking_pool() {
                if let Some(crate::Backend { store, keep }) =
                    crate::pg_backend("store_works_from_the_blocking_pool")
                {
                    crate::cases::store_works_from_the_blocking_pool(store);
                    drop(keep);
                }
            }
        }
    };
}

suite!(
    customers_and_identities,
    attach_identity_moves_an_identity,
    duplicates_are_rejected_and_the_transaction_goes_on,
    message_rows_round_trip,
    conversations_round_trip_and_update,
    latest_conversation_filters_and_ties,
    header_and_thread_lookups,
    timeline_pages_by_time_then_seq,
    outbound_records,
    message_status_and_last_inbound,
    merge_moves_everything_and_redirects,
    split_moves_the_identity_and_its_conversations,
    erase_leaves_a_tombstone,
    commands_apply_once,
    outbox_in_order_and_done,
    outbox_sees_only_committed_rows,
    savepoints_nest_and_roll_back,
    dropped_transaction_rolls_back,
    reads_see_only_committed_state,
    timeline_reads_one_snapshot,
    unknown_ids_answer_nothing,
    ping_answers,
    is_empty_until_a_customer_is_stored,
    mailbox_checkpoints_per_account_and_mailbox,
    thread_message_ids_newest_first,
    message_changes_keep_versions,
    read_watermarks_and_provider_threads,
    prefetched_lookups_follow_the_transactions_writes,
);

/// Built without the `postgres` feature: say so when a database was named.
#[cfg(not(feature = "postgres"))]
#[test]
fn postgres_suite_needs_the_feature() {
    if std::env::var_os("SWITCHBOARD_TEST_POSTGRES").is_some() {
        eprintln!(
            "SKIPPED the PostgreSQL suite: SWITCHBOARD_TEST_POSTGRES is set but this build \
             lacks the `postgres` feature (cargo test -p switchboard-store --features postgres)"
        );
    }
}
