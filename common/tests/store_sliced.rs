//! Large remote versions are merged in slices: local writes commit between slices, and client
//! reads never see part of the version (they are pinned to the state before its first slice).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use strata_common::store::{Changeset, Schema, Statement, Store, StoreOptions, Value};

const SCHEMA: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT,
    state TEXT
) STRICT;";

/// Rows of the large version: 3 changes each (2 cells and the row event), well over the
/// threshold of a sliced merge, small enough for a debug build.
const BIG_ROWS: i64 = 20_000;

/// How long a test waits for the receiver to hold the large version.
const HELD_WAIT_MAX: Duration = Duration::from_secs(120);

fn open(dir: &tempfile::TempDir, name: &str) -> Store {
    let options = StoreOptions {
        cells_max: 1_000_000,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path().join(name), options).unwrap();
    store
        .migrate_blocking(Schema::parse(SCHEMA).unwrap())
        .unwrap();
    store
}

/// A source store that wrote `BIG_ROWS` rows in one transaction, and that version's chunks.
fn big_version(dir: &tempfile::TempDir) -> (Store, u64, Vec<Changeset>) {
    let source = open(dir, "source.sqlite");
    let fill = format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {})
         INSERT INTO machines (id, app, state)
         SELECT printf('big-%08d', i), 'app-' || (i % 500), 'started' FROM n",
        BIG_ROWS - 1
    );
    let version = source
        .transact_blocking(vec![Statement::new(fill)])
        .unwrap()
        .version
        .unwrap();
    let chunks = source.changes(source.site(), version..=version).unwrap();
    assert!(chunks.len() > 1, "the version should travel in chunks");
    (source, version, chunks)
}

fn big_rows_seen(store: &Store) -> i64 {
    let rows = store
        .query(
            "SELECT count(*) FROM machines WHERE id >= 'big-' AND id < 'big.'",
            &[],
        )
        .unwrap();
    match rows.rows[0][0] {
        Value::Integer(n) => n,
        ref other => panic!("count returned {other:?}"),
    }
}

fn wait_held(receiver: &Store, source: &Store, version: u64) {
    let deadline = Instant::now() + HELD_WAIT_MAX;
    while !receiver.has(source.site(), version) {
        assert!(
            Instant::now() < deadline,
            "the receiver did not hold the large version within {HELD_WAIT_MAX:?}; stats: {:?}",
            receiver.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_reader_polling_during_a_sliced_apply_sees_none_or_all_of_the_large_version() {
    let dir = tempfile::tempdir().unwrap();
    let (source, version, chunks) = big_version(&dir);
    // Chunk by chunk (buffered, as pushes arrive) and all at once (joined, as a catch-up).
    for (name, one_call) in [("per-chunk.sqlite", false), ("whole.sqlite", true)] {
        let receiver = open(&dir, name);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, stop) = (receiver.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    seen.push(big_rows_seen(&store));
                }
                seen
            })
        };
        if one_call {
            receiver.apply_blocking(chunks.clone()).unwrap();
        } else {
            for chunk in &chunks {
                receiver.apply_blocking(vec![chunk.clone()]).unwrap();
            }
        }
        wait_held(&receiver, &source, version);
        stop.store(true, Ordering::Relaxed);
        let seen = reader.join().unwrap();
        let torn: Vec<&i64> = seen.iter().filter(|&&n| n != 0 && n != BIG_ROWS).collect();
        assert!(
            torn.is_empty(),
            "{name}: {} of {} reads saw part of the version (counts {:?})",
            torn.len(),
            seen.len(),
            &torn[..torn.len().min(10)]
        );
        let stats = receiver.stats();
        assert_eq!(stats.sliced_versions_total, 1, "{name}: {stats:?}");
        assert!(
            stats.slices_total > 1,
            "{name}: merged in one slice: {stats:?}"
        );
        assert_eq!(big_rows_seen(&receiver), BIG_ROWS, "{name}");
        assert_eq!(receiver.dump().unwrap(), source.dump().unwrap(), "{name}");
    }
}

#[test]
fn local_writes_commit_between_the_slices_of_a_large_remote_version() {
    let dir = tempfile::tempdir().unwrap();
    let (source, version, chunks) = big_version(&dir);
    let receiver = open(&dir, "receiver.sqlite");
    // The reply comes once the version is recorded; the slices follow.
    receiver.apply_blocking(chunks).unwrap();
    let mut during = Vec::new();
    let deadline = Instant::now() + HELD_WAIT_MAX;
    let mut i = 0;
    while !receiver.has(source.site(), version) {
        assert!(
            Instant::now() < deadline,
            "not held: {:?}",
            receiver.stats()
        );
        let started = Instant::now();
        receiver
            .transact_blocking(vec![Statement::with_params(
                "INSERT INTO machines (id, app, state) VALUES (?1, 'local', 'started')",
                vec![Value::Text(format!("local-{i:04}"))],
            )])
            .unwrap();
        if !receiver.has(source.site(), version) {
            during.push(started.elapsed());
        }
        i += 1;
    }
    let stats = receiver.stats();
    assert!(
        during.len() >= 2,
        "only {} local writes committed while the version was merged: {stats:?}",
        during.len()
    );
    // A slice is a few thousand changes; a whole merge of the version is many times that.
    let slowest = during.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(1),
        "a local write waited {slowest:?} during the sliced merge ({} writes, {stats:?})",
        during.len()
    );
    // Everything is visible once the version is held: its rows and every local write.
    assert_eq!(big_rows_seen(&receiver), BIG_ROWS);
    let local = receiver
        .query("SELECT count(*) FROM machines WHERE app = 'local'", &[])
        .unwrap();
    assert_eq!(local.rows, vec![vec![Value::Integer(i)]]);
}

#[test]
fn a_large_version_arriving_again_during_its_sliced_merge_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let (source, version, chunks) = big_version(&dir);
    let receiver = open(&dir, "receiver.sqlite");
    receiver.apply_blocking(chunks.clone()).unwrap();
    let again = receiver.apply_blocking(chunks).unwrap();
    assert!(again.versions.is_empty(), "{again:?}");
    assert!(again.rejected.is_empty(), "{again:?}");
    wait_held(&receiver, &source, version);
    let stats = receiver.stats();
    assert_eq!(stats.sliced_versions_total, 1, "{stats:?}");
    assert_eq!(receiver.dump().unwrap(), source.dump().unwrap());
}
