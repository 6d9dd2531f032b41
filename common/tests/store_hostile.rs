//! Hostile input to the store: every test sends what a client could send to wedge the writer,
//! escape the rules, or commit what cannot replicate, and asserts the precise refusal and that
//! nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use strata_common::store::{
    CELL_BYTES_MAX, Change, Changeset, Deadline, Schema, SiteId, Statement, Store, StoreError,
    StoreOptions, Timestamp, Value, pack_pk,
};

const SCHEMA: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    note TEXT,
    data BLOB
) STRICT;";

/// A statement that never ends: an unbounded recursion whose rows are all filtered out.
const ENDLESS_INSERT: &str = "INSERT INTO machines (id) \
     WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
     SELECT 'm' || x FROM c WHERE x < 0";
const ENDLESS_QUERY: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";

/// How long any stopped statement may take to come back, well above its deadline: a statement
/// that is not stopped runs forever, so this only bounds how long a failure takes to show.
const COME_BACK_MAX: Duration = Duration::from_secs(20);

struct Node {
    store: Store,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node::with_options(StoreOptions::default())
    }

    fn with_options(options: StoreOptions) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            boot_id: Some("test-boot".into()),
            ..options
        };
        let store = Store::open(dir.path().join("db.sqlite"), options).unwrap();
        store
            .migrate_blocking(Schema::parse(SCHEMA).unwrap())
            .unwrap();
        Node { store, dir }
    }

    fn run(&self, sqls: &[&str]) -> Result<Option<u64>, StoreError> {
        self.store
            .transact_blocking(sqls.iter().map(|s| Statement::new(*s)).collect())
            .map(|c| c.version)
    }

    fn count(&self) -> i64 {
        match self
            .store
            .query("SELECT count(*) FROM machines", &[])
            .unwrap()
            .rows[0][0]
        {
            Value::Integer(n) => n,
            ref other => panic!("count is {other:?}"),
        }
    }

    /// The bookkeeping and data, to show that a refused request changed nothing.
    fn snapshot(&self) -> (u64, String) {
        (self.store.head(), self.store.dump().unwrap())
    }
}

fn refused_at(result: Result<Option<u64>, StoreError>, at: usize) -> String {
    match result {
        Err(StoreError::Refused { index, reason }) if index == at => reason,
        other => panic!("expected a refusal of statement {at}, got {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---- class 1: the store's own statements and transaction control ----

#[test]
fn the_text_of_an_internal_statement_is_refused_even_after_the_store_ran_it() {
    let node = Node::new();
    // This commit prepares (and caches) the store's own statement that saves our head.
    node.run(&["INSERT INTO machines (id) VALUES ('m1')"])
        .unwrap();
    let before = node.snapshot();
    let own = "UPDATE __strata_sites SET head = ?2, hlc = ?3 WHERE ord = ?1";
    let result = node.store.transact_blocking(vec![Statement::with_params(
        own,
        vec![Value::Integer(1), Value::Integer(1000), Value::Integer(0)],
    )]);
    match result {
        Err(StoreError::Refused { index: 0, reason }) => {
            assert!(reason.contains("__strata_sites"), "{reason}");
        }
        other => panic!("internal statement text was not refused: {other:?}"),
    }
    for control in ["COMMIT", "ROLLBACK", "BEGIN IMMEDIATE"] {
        refused_at(node.run(&[control]), 0);
    }
    assert_eq!(node.snapshot(), before);
    assert_eq!(
        node.run(&["INSERT INTO machines (id) VALUES ('m2')"])
            .unwrap(),
        Some(2)
    );
}

#[test]
fn a_request_that_rolls_back_midway_is_refused_whole_and_commits_nothing() {
    let node = Node::new();
    let before = node.snapshot();
    let reason = refused_at(
        node.run(&[
            "INSERT INTO machines (id) VALUES ('a')",
            "ROLLBACK",
            "INSERT INTO machines (id) VALUES ('b')",
        ]),
        1,
    );
    assert!(reason.contains("transaction control"), "{reason}");
    assert_eq!(node.count(), 0);
    assert_eq!(node.snapshot(), before);
    assert!(
        node.store
            .changes(node.store.site(), 1..=10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn savepoints_and_anything_that_ends_or_nests_the_transaction_are_refused() {
    let node = Node::new();
    let before = node.snapshot();
    for control in [
        "SAVEPOINT s",
        "RELEASE s",
        "ROLLBACK TO s",
        "COMMIT",
        "END",
        "BEGIN",
    ] {
        refused_at(
            node.run(&["INSERT INTO machines (id) VALUES ('a')", control]),
            1,
        );
    }
    assert_eq!(node.snapshot(), before);
}

#[test]
fn the_store_tables_are_refused_for_writes_in_every_spelling() {
    let node = Node::new();
    node.run(&["INSERT INTO machines (id) VALUES ('m1')"])
        .unwrap();
    let before = node.snapshot();
    for sql in [
        "UPDATE __strata_sites SET head = 99",
        "UPDATE \"__strata_sites\" SET head = 99",
        "UPDATE __STRATA_SITES SET head = 99",
        "UPDATE main.__strata_sites SET head = 99",
        "UPDATE \"main\".\"__Strata_Sites\" SET head = 99",
        "WITH x AS (SELECT 99 AS h) UPDATE __strata_sites SET head = (SELECT h FROM x)",
        "DELETE FROM __strata_clock_1",
        "INSERT INTO __strata_meta (key, value) VALUES ('clean', 1)",
    ] {
        let reason = refused_at(node.run(&[sql]), 0);
        assert!(reason.contains("belongs to the store"), "{sql}: {reason}");
    }
    // SQLite refuses this one itself.
    let result = node.run(&["DELETE FROM sqlite_master"]);
    assert!(result.is_err(), "{result:?}");
    assert_eq!(node.snapshot(), before);
}

// ---- class 2: statements without an end ----

#[test]
fn a_never_ending_transaction_stops_at_its_deadline_and_the_writer_serves_the_next_write() {
    let node = Node::new();
    let rt = runtime();
    let started = Instant::now();
    let result = rt.block_on(node.store.transact_within(
        vec![Statement::new(ENDLESS_INSERT)],
        Deadline::after(Duration::from_millis(300), "test.limit"),
    ));
    let took = started.elapsed();
    match result {
        Err(StoreError::DeadlineExceeded { what, limit }) => {
            assert!(what.contains("statement 0"), "{what}");
            assert!(limit.contains("test.limit"), "{limit}");
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(took < COME_BACK_MAX, "took {took:?}");
    assert_eq!(node.store.stats().stopped_total, 1);
    assert_eq!(node.count(), 0);
    assert_eq!(node.store.head(), 0);
    assert_eq!(
        node.run(&["INSERT INTO machines (id) VALUES ('m1')"])
            .unwrap(),
        Some(1)
    );
}

#[test]
fn a_never_ending_transaction_in_a_group_does_not_take_the_others_down_and_is_not_run_again() {
    let node = Node::new();
    let rt = runtime();
    let store = node.store.clone();
    let (endless, good) = rt.block_on(async move {
        let endless = store.transact_within(
            vec![Statement::new(ENDLESS_INSERT)],
            Deadline::after(Duration::from_millis(300), "test.limit"),
        );
        let writes = async {
            let mut versions = Vec::new();
            for n in 0..20 {
                let sql = format!("INSERT INTO machines (id) VALUES ('g{n}')");
                versions.push(store.transact(vec![Statement::new(sql)]).await);
            }
            versions
        };
        tokio::join!(endless, writes)
    });
    assert!(
        matches!(endless, Err(StoreError::DeadlineExceeded { .. })),
        "{endless:?}"
    );
    for result in &good {
        assert!(result.is_ok(), "{result:?}");
    }
    assert_eq!(node.count(), 20);
    assert_eq!(node.store.head(), 20);
}

#[test]
fn a_request_whose_deadline_passed_while_queued_is_not_run() {
    let node = Node::new();
    let rt = runtime();
    let result = rt.block_on(node.store.transact_within(
        vec![Statement::new("INSERT INTO machines (id) VALUES ('m1')")],
        Deadline::after(Duration::ZERO, "test.limit"),
    ));
    assert!(
        matches!(result, Err(StoreError::DeadlineExceeded { .. })),
        "{result:?}"
    );
    assert_eq!(node.count(), 0);
    assert_eq!(node.store.head(), 0);
}

#[test]
fn a_transaction_whose_caller_went_away_stops_and_changes_nothing() {
    let node = Node::new();
    let rt = runtime();
    let store = node.store.clone();
    rt.block_on(async move {
        // The caller gives up long before the statement's own deadline.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(200),
            store.transact_within(
                vec![Statement::new(ENDLESS_INSERT)],
                Deadline::after(Duration::from_secs(3600), "test.limit"),
            ),
        )
        .await;
        assert!(gave_up.is_err(), "{gave_up:?}");
        // The writer comes back for the next write: the abandoned statement was stopped.
        let next = tokio::time::timeout(
            COME_BACK_MAX,
            store.transact(vec![Statement::new(
                "INSERT INTO machines (id) VALUES ('m1')",
            )]),
        )
        .await
        .expect("the writer is still held by the abandoned statement")
        .unwrap();
        assert_eq!(next.version, Some(1));
    });
    assert_eq!(node.count(), 1);
}

#[test]
fn a_never_ending_query_stops_at_its_deadline() {
    let node = Node::with_options(StoreOptions {
        readers: 1,
        ..StoreOptions::default()
    });
    let started = Instant::now();
    let result = node.store.query_within(
        ENDLESS_QUERY,
        &[],
        &Deadline::after(Duration::from_millis(300), "test.query_limit"),
    );
    match result {
        Err(StoreError::DeadlineExceeded { limit, .. }) => {
            assert!(limit.contains("test.query_limit"), "{limit}");
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(started.elapsed() < COME_BACK_MAX);
    // The only reader is free again.
    assert_eq!(node.count(), 0);
}

#[test]
fn a_cancelled_query_stops() {
    let node = Node::new();
    let gone = Arc::new(AtomicBool::new(false));
    let deadline =
        Deadline::after(Duration::from_secs(3600), "test").cancelled_by(Arc::clone(&gone));
    let result = node.store.query_each_within(
        ENDLESS_QUERY,
        &[],
        &deadline,
        |_| {
            // The client goes away once the query has started.
            gone.store(true, Ordering::Relaxed);
            true
        },
        |_| true,
    );
    assert!(
        matches!(result, Err(StoreError::Cancelled(_))),
        "{result:?}"
    );
}

#[test]
fn closing_the_store_stops_a_running_query() {
    let node = Node::new();
    let store = node.store.clone();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let query = std::thread::spawn(move || {
        store.query_each(
            ENDLESS_QUERY,
            &[],
            |_| {
                started_tx.send(()).unwrap();
                true
            },
            |_| true,
        )
    });
    started_rx.recv_timeout(COME_BACK_MAX).unwrap();
    node.store.close();
    let deadline = Instant::now() + COME_BACK_MAX;
    while !query.is_finished() {
        assert!(Instant::now() < deadline, "the query did not stop on close");
        std::thread::yield_now();
    }
    let result = query.join().unwrap();
    assert!(matches!(result, Err(StoreError::Closed)), "{result:?}");
    let refused = node.run(&["INSERT INTO machines (id) VALUES ('m1')"]);
    assert!(matches!(refused, Err(StoreError::Closed)), "{refused:?}");
}

#[test]
fn slow_client_queries_never_take_the_last_reader_from_the_store() {
    let node = Node::with_options(StoreOptions {
        readers: 3,
        ..StoreOptions::default()
    });
    node.run(&["INSERT INTO machines (id) VALUES ('m1')"])
        .unwrap();
    // Two endless client queries hold every reader a client may take.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let store = node.store.clone();
            let started = started_tx.clone();
            std::thread::spawn(move || {
                store.query_each_within(
                    ENDLESS_QUERY,
                    &[],
                    &Deadline::after(Duration::from_secs(3), "test.slow"),
                    |_| {
                        started.send(()).unwrap();
                        true
                    },
                    |_| true,
                )
            })
        })
        .collect();
    for _ in 0..2 {
        started_rx.recv_timeout(COME_BACK_MAX).unwrap();
    }
    // A third client query waits for a reader and gives up at its own deadline ...
    let waited = node.store.query_within(
        "SELECT count(*) FROM machines",
        &[],
        &Deadline::after(Duration::from_millis(200), "test.fast"),
    );
    assert!(
        matches!(waited, Err(StoreError::DeadlineExceeded { .. })),
        "{waited:?}"
    );
    // ... while the store's own reads (what serves sync and Health) still find the reserved one.
    let started = Instant::now();
    assert_eq!(node.store.parked().unwrap(), 0);
    let site = node.store.site();
    assert!(!node.store.changes(site, 1..=1).unwrap().is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the store's reads waited {:?}",
        started.elapsed()
    );
    for query in slow {
        let result = query.join().unwrap();
        assert!(
            matches!(result, Err(StoreError::DeadlineExceeded { .. })),
            "{result:?}"
        );
    }
}

// ---- class 3: queries that change process or connection state ----

#[test]
fn queries_cannot_set_pragmas_attach_or_read_the_store_tables_and_the_reader_stays_clean() {
    let node = Node::with_options(StoreOptions {
        readers: 1,
        ..StoreOptions::default()
    });
    node.run(&["INSERT INTO machines (id) VALUES ('m1')"])
        .unwrap();
    let other = node.dir.path().join("other.sqlite");
    let attach = format!("ATTACH '{}' AS other", other.display());
    for sql in [
        "PRAGMA hard_heap_limit = 1000000",
        "PRAGMA hard_heap_limit",
        "PRAGMA query_only = 0",
        "PRAGMA writable_schema = 1",
        "PRAGMA journal_mode = DELETE",
        "PRAGMA database_list",
        "SELECT * FROM pragma_hard_heap_limit",
        "SELECT * FROM pragma_query_only",
        attach.as_str(),
        "DETACH main",
        "BEGIN",
        "SAVEPOINT s",
        "SELECT * FROM __strata_sites",
        "SELECT * FROM main.\"__STRATA_SITES\"",
        "WITH s AS (SELECT * FROM __strata_meta) SELECT * FROM s",
        "SELECT __strata_capturing()",
    ] {
        let result = node.store.query(sql, &[]);
        assert!(
            matches!(
                result,
                Err(StoreError::Refused { .. } | StoreError::NotReadOnly(_))
            ),
            "{sql}: {result:?}"
        );
    }
    // SQLite refuses these itself (the pragma functions take no argument to set with).
    for sql in [
        "SELECT * FROM pragma_hard_heap_limit(1000000)",
        "SELECT * FROM pragma_query_only(0)",
    ] {
        let result = node.store.query(sql, &[]);
        assert!(result.is_err(), "{sql}: {result:?}");
    }
    let copy = node.dir.path().join("copy.sqlite");
    let vacuum = format!("VACUUM INTO '{}'", copy.display());
    for sql in [
        vacuum.as_str(),
        "ANALYZE",
        "REINDEX",
        "DELETE FROM machines",
        "CREATE TEMP TABLE t (x)",
        "INSERT INTO machines (id) VALUES ('x')",
    ] {
        let result = node.store.query(sql, &[]);
        assert!(
            matches!(
                result,
                Err(StoreError::NotReadOnly(_) | StoreError::Refused { .. })
            ),
            "{sql}: {result:?}"
        );
    }
    assert!(!copy.exists(), "VACUUM INTO wrote a copy");
    // The one pooled reader is as it was opened.
    let (query_only, heap, databases) = node
        .store
        .read(|conn| {
            let query_only: i64 = conn.query_row("PRAGMA query_only", [], |r| r.get(0))?;
            let heap: i64 = conn.query_row("PRAGMA hard_heap_limit", [], |r| r.get(0))?;
            let databases: i64 =
                conn.query_row("SELECT count(*) FROM pragma_database_list", [], |r| {
                    r.get(0)
                })?;
            Ok((query_only, heap, databases))
        })
        .unwrap();
    assert_eq!((query_only, heap, databases), (1, 0, 1));
    // Schema pragmas in their read form, the schema table and the data still answer.
    let columns = node
        .store
        .query("PRAGMA table_info(machines)", &[])
        .unwrap();
    assert_eq!(columns.rows.len(), 4);
    let columns = node
        .store
        .query(
            "SELECT name FROM pragma_table_info('machines') ORDER BY cid",
            &[],
        )
        .unwrap();
    assert_eq!(columns.rows[0], vec![Value::Text("id".into())]);
    let tables = node
        .store
        .query(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'machines'",
            &[],
        )
        .unwrap();
    assert_eq!(tables.rows, vec![vec![Value::Integer(1)]]);
    assert_eq!(node.count(), 1);
    // The writer is unharmed by what the queries tried.
    assert_eq!(
        node.run(&["INSERT INTO machines (id) VALUES ('m2')"])
            .unwrap(),
        Some(2)
    );
}

#[test]
fn a_huge_computed_value_is_an_error_not_an_allocation() {
    let node = Node::new();
    let result = node
        .store
        .query("SELECT length(printf('%.*c', 900000000, 'x'))", &[]);
    assert!(result.is_err(), "{result:?}");
    let result = node.run(&["INSERT INTO machines (id, data) VALUES ('m1', zeroblob(900000000))"]);
    assert!(result.is_err(), "{result:?}");
    assert_eq!(node.count(), 0);
}

// ---- class 4: values that cannot replicate ----

#[test]
fn a_value_over_the_cell_limit_is_refused_naming_table_column_and_limit() {
    let node = Node::new();
    node.run(&["INSERT INTO machines (id) VALUES ('m1')"])
        .unwrap();
    let before = node.snapshot();
    let over = CELL_BYTES_MAX + 1;
    for (at, statements) in [
        (
            0,
            vec![format!(
                "INSERT INTO machines (id, note) VALUES ('m2', printf('%.*c', {over}, 'x'))"
            )],
        ),
        (
            1,
            vec![
                "INSERT INTO machines (id) VALUES ('m3')".to_owned(),
                format!("UPDATE machines SET data = zeroblob({over}) WHERE id = 'm1'"),
            ],
        ),
    ] {
        let sqls: Vec<&str> = statements.iter().map(String::as_str).collect();
        let reason = refused_at(node.run(&sqls), at);
        assert!(reason.contains("\"machines\""), "{reason}");
        assert!(
            reason.contains("\"note\"") || reason.contains("\"data\""),
            "{reason}"
        );
        assert!(reason.contains(&CELL_BYTES_MAX.to_string()), "{reason}");
    }
    let key = format!("INSERT INTO machines (id) VALUES (printf('%.*c', {over}, 'k'))");
    let reason = refused_at(node.run(&[key.as_str()]), 0);
    assert!(reason.contains("\"id\""), "{reason}");
    assert_eq!(node.snapshot(), before);
    // At the limit it is fine.
    let at_limit =
        format!("INSERT INTO machines (id, data) VALUES ('m4', zeroblob({CELL_BYTES_MAX}))");
    assert_eq!(node.run(&[at_limit.as_str()]).unwrap(), Some(2));
}

#[test]
fn text_that_is_not_utf8_is_refused_naming_table_and_column() {
    let node = Node::new();
    let before = node.snapshot();
    let reason = refused_at(
        node.run(&["INSERT INTO machines (id, note) VALUES ('m1', CAST(x'fffe80' AS TEXT))"]),
        0,
    );
    assert!(
        reason.contains("\"machines\"") && reason.contains("\"note\""),
        "{reason}"
    );
    assert!(reason.contains("UTF-8"), "{reason}");
    let reason = refused_at(
        node.run(&["INSERT INTO machines (id) VALUES (CAST(x'fffe80' AS TEXT))"]),
        0,
    );
    assert!(reason.contains("\"id\""), "{reason}");
    assert_eq!(node.snapshot(), before);
}

#[test]
fn a_receiver_rejects_an_oversized_value_by_the_same_rule_and_applies_nothing() {
    let node = Node::new();
    let before = node.snapshot();
    let changeset = Changeset {
        site: SiteId([9; 16]),
        version: 1,
        ts: Timestamp(1),
        seq_first: 0,
        seq_last: 1,
        last_seq: 1,
        changes: vec![
            Change {
                table: "machines".into(),
                pk: pack_pk([rusqlite::types::ValueRef::Text(b"m1")]).unwrap(),
                column: None,
                value: Value::Null,
                cl: 1,
                seq: 0,
            },
            Change {
                table: "machines".into(),
                pk: pack_pk([rusqlite::types::ValueRef::Text(b"m1")]).unwrap(),
                column: Some("data".into()),
                value: Value::Blob(vec![7; CELL_BYTES_MAX + 1]),
                cl: 1,
                seq: 1,
            },
        ],
    };
    let applied = node.store.apply_blocking(vec![changeset]).unwrap();
    assert_eq!(applied.rejected.len(), 1, "{applied:?}");
    let reason = &applied.rejected[0].reason;
    assert!(
        reason.contains("\"machines\"") && reason.contains("\"data\""),
        "{reason}"
    );
    assert!(reason.contains(&CELL_BYTES_MAX.to_string()), "{reason}");
    assert!(applied.versions.is_empty());
    assert_eq!(node.snapshot(), before);
}

// ---- the disk ----

#[test]
fn a_full_disk_is_reported_as_such_and_the_store_recovers_when_space_returns() {
    let node = Node::with_options(StoreOptions {
        page_count_max: Some(300),
        ..StoreOptions::default()
    });
    let mut written = 0u64;
    let full = loop {
        assert!(written < 1000, "the disk never filled");
        let sql =
            format!("INSERT INTO machines (id, data) VALUES ('m{written}', randomblob(50000))");
        match node.run(&[sql.as_str()]) {
            Ok(_) => written += 1,
            Err(err) => break err,
        }
    };
    let dir = node.dir.path().display().to_string();
    match &full {
        StoreError::DiskFull { file, dir: fs } => {
            assert!(file.ends_with("db.sqlite"), "{file}");
            assert_eq!(fs, &dir);
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
    assert!(
        node.store
            .health()
            .disk_full
            .is_some_and(|what| what.contains(&dir)),
        "{:?}",
        node.store.health()
    );
    // Nothing of the failed write was kept; the bookkeeping matches the data.
    assert_eq!(node.store.head(), written);
    assert_eq!(node.count(), i64::try_from(written).unwrap());
    // Space returns (a row's pages are freed), and the next commit clears the mark.
    node.run(&["DELETE FROM machines WHERE id = 'm0'"]).unwrap();
    node.run(&["INSERT INTO machines (id) VALUES ('small')"])
        .unwrap();
    assert_eq!(node.store.health().disk_full, None);
    assert_eq!(node.store.head(), written + 2);
}
