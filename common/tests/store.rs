//! One test per rule of the replicated store, through its public API.
//!
//! Each test opens stores in a temporary directory with a manual wall clock, so timestamps (and
//! thus last-writer-wins outcomes) are chosen by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_common::store::{
    Changeset, Durability, Refusal, Schema, Statement, Store, StoreError, StoreOptions, Value,
    WallClock,
};

const SCHEMA: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'created',
    port INTEGER,
    note TEXT
) STRICT;
CREATE INDEX machines_app ON machines (app);";

struct Node {
    store: Store,
    clock: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node::with_schema(SCHEMA)
    }

    fn with_schema(schema: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(1_000_000));
        let store = Store::open(dir.path().join("db.sqlite"), options(&clock)).unwrap();
        store
            .migrate_blocking(Schema::parse(schema).unwrap())
            .unwrap();
        Node {
            store,
            clock,
            _dir: dir,
        }
    }

    fn at(&self, ms: u64) -> &Self {
        self.clock.store(ms, Ordering::Relaxed);
        self
    }

    fn exec(&self, sql: &str) -> Option<u64> {
        self.store
            .transact_blocking(vec![Statement::new(sql)])
            .unwrap()
            .version
    }

    fn try_exec(&self, sql: &str) -> Result<Option<u64>, StoreError> {
        self.store
            .transact_blocking(vec![Statement::new(sql)])
            .map(|c| c.version)
    }

    fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        self.store.query(sql, &[]).unwrap().rows
    }

    /// Every version this node wrote, whole.
    fn own_changes(&self) -> Vec<Changeset> {
        let head = self.store.head();
        if head == 0 {
            return Vec::new();
        }
        self.store.changes(self.store.site(), 1..=head).unwrap()
    }

    fn send_to(&self, other: &Node) {
        let applied = other.store.apply_blocking(self.own_changes()).unwrap();
        assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
    }
}

fn options(clock: &Arc<AtomicU64>) -> StoreOptions {
    StoreOptions {
        wall_clock: WallClock::Manual(Arc::clone(clock)),
        boot_id: Some("test-boot".into()),
        ..StoreOptions::default()
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[test]
fn the_site_id_is_made_once_and_kept_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    let path = dir.path().join("db.sqlite");
    let first = Store::open(&path, options(&clock)).unwrap();
    let site = first.site();
    drop(first);
    let again = Store::open(&path, options(&clock)).unwrap();
    assert_eq!(again.site(), site);
    assert_eq!(again.fresh_site(), None);
}

#[test]
fn a_transaction_that_changes_something_gets_the_next_version_and_one_that_does_not_gets_none() {
    let node = Node::new();
    assert_eq!(
        node.exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')"),
        Some(1)
    );
    assert_eq!(
        node.exec("UPDATE machines SET app = 'web' WHERE id = 'm1'"),
        None
    );
    assert_eq!(node.exec("DELETE FROM machines WHERE id = 'nope'"), None);
    assert_eq!(
        node.exec("UPDATE machines SET port = 80 WHERE id = 'm1'"),
        Some(2)
    );
    let committed = node
        .store
        .transact_blocking(vec![
            Statement::new("INSERT INTO machines (id) VALUES ('m2')"),
            Statement::new("INSERT INTO machines (id) VALUES ('m3')"),
        ])
        .unwrap();
    assert_eq!(committed.version, Some(3));
    assert_eq!(committed.rows_affected, vec![1, 1]);
    assert_eq!(node.store.head(), 3);
}

#[test]
fn a_whole_object_upsert_that_changes_nothing_records_nothing() {
    let node = Node::new();
    let upsert = "INSERT INTO machines (id, app, state, port) VALUES ('m1', 'web', 'started', 80)
        ON CONFLICT (id) DO UPDATE SET app = excluded.app, state = excluded.state,
        port = excluded.port";
    let guarded = format!(
        "{upsert} WHERE app IS NOT excluded.app OR state IS NOT excluded.state \
         OR port IS NOT excluded.port"
    );
    assert_eq!(node.exec(upsert), Some(1));
    assert_eq!(
        node.exec(upsert),
        None,
        "unguarded upsert of the same object"
    );
    assert_eq!(
        node.exec(&guarded),
        None,
        "guarded upsert of the same object"
    );
    let changed = upsert.replace("'started'", "'stopped'");
    assert_eq!(node.exec(&changed), Some(2));
    // Only the changed cell travels.
    let v2 = node.store.changes(node.store.site(), 2..=2).unwrap();
    let cells: Vec<&str> = v2[0]
        .changes
        .iter()
        .filter_map(|c| c.column.as_deref())
        .collect();
    assert_eq!(cells, ["state"]);
}

#[test]
fn insert_or_replace_replace_and_key_updates_are_refused_and_change_nothing() {
    let node = Node::new();
    node.exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')");
    for sql in [
        "INSERT OR REPLACE INTO machines (id, app) VALUES ('m1', 'db')",
        "REPLACE INTO machines (id, app) VALUES ('m1', 'db')",
        "replace into machines (id, app) values ('m2', 'db')",
        "UPDATE OR REPLACE machines SET app = 'db' WHERE id = 'm1'",
    ] {
        match node.try_exec(sql) {
            Err(StoreError::Refused { index: 0, reason }) => {
                assert!(reason.contains("ON CONFLICT"), "{sql}: {reason}");
            }
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    match node.try_exec("UPDATE machines SET id = 'm9' WHERE id = 'm1'") {
        Err(StoreError::Refused { reason, .. }) => {
            assert!(reason.contains("primary key"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A function called replace() is fine.
    assert_eq!(
        node.exec("UPDATE machines SET note = replace(app, 'w', 'W') WHERE id = 'm1'"),
        Some(2)
    );
    assert_eq!(
        node.rows("SELECT id, app, note FROM machines"),
        vec![vec![text("m1"), text("web"), text("Web")]]
    );
    assert_eq!(node.store.head(), 2);
}

#[test]
fn bad_statements_get_precise_errors_and_roll_back_the_whole_transaction() {
    let node = Node::new();
    let run = |sqls: &[&str]| {
        node.store
            .transact_blocking(sqls.iter().map(|s| Statement::new(*s)).collect())
            .unwrap_err()
    };
    let first = "INSERT INTO machines (id) VALUES ('m1')";
    assert!(matches!(
        run(&[first, "INSRT INTO x"]),
        StoreError::BadStatement { index: 1, .. }
    ));
    assert!(matches!(
        run(&[first, "INSERT INTO nope (id) VALUES (1)"]),
        StoreError::UnknownTable { index: 1, ref table } if table == "nope"
    ));
    assert!(matches!(
        run(&[first, "INSERT INTO machines (id) VALUES ('m1')"]),
        StoreError::Constraint { index: 1, .. }
    ));
    assert!(matches!(
        run(&["CREATE TABLE x (id TEXT PRIMARY KEY)"]),
        StoreError::Refused { .. }
    ));
    assert!(matches!(
        run(&["DROP TABLE machines"]),
        StoreError::Refused { .. }
    ));
    assert!(matches!(
        run(&["DELETE FROM __strata_sites"]),
        StoreError::Refused { .. }
    ));
    assert!(matches!(
        run(&["PRAGMA synchronous = OFF"]),
        StoreError::Refused { .. }
    ));
    assert!(matches!(
        run(&["SELECT * FROM machines"]),
        StoreError::BadStatement { .. }
    ));
    assert!(matches!(
        run(&["INSERT INTO machines (id) VALUES ('a'); SELECT 1"]),
        StoreError::BadStatement { .. }
    ));
    let params = Statement::with_params("INSERT INTO machines (id) VALUES (?1)", vec![]);
    assert!(matches!(
        node.store.transact_blocking(vec![params]),
        Err(StoreError::BadStatement { .. })
    ));
    // Nothing of the failed transactions is left.
    assert!(node.rows("SELECT id FROM machines").is_empty());
    assert_eq!(node.store.head(), 0);
}

#[test]
fn oversized_transactions_are_refused_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    let opts = StoreOptions {
        cells_max: 10,
        statements_max: 5,
        ..options(&clock)
    };
    let store = Store::open(dir.path().join("db"), opts).unwrap();
    store
        .migrate_blocking(Schema::parse(SCHEMA).unwrap())
        .unwrap();
    let many: Vec<Statement> = (0..6)
        .map(|i| Statement::new(format!("INSERT INTO machines (id) VALUES ('{i}')")))
        .collect();
    assert!(matches!(
        store.transact_blocking(many),
        Err(StoreError::TooLarge { limit: 5, .. })
    ));
    let wide = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20)
        INSERT INTO machines (id, app) SELECT 'm' || i, 'web' FROM n";
    assert!(matches!(
        store.transact_blocking(vec![Statement::new(wide)]),
        Err(StoreError::TooLarge { limit: 10, .. })
    ));
    assert_eq!(store.head(), 0);
}

#[test]
fn writes_through_any_other_connection_fail_while_reads_work() {
    let node = Node::new();
    node.exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')");
    let other = rusqlite::Connection::open(node.store.path()).unwrap();
    let app: String = other
        .query_row("SELECT app FROM machines WHERE id = 'm1'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(app, "web");
    for sql in [
        "INSERT INTO machines (id) VALUES ('m2')",
        "UPDATE machines SET app = 'x'",
        "DELETE FROM machines",
    ] {
        let err = other.execute(sql, []).unwrap_err().to_string();
        assert!(err.contains("no such function"), "{sql}: {err}");
    }
    assert_eq!(
        node.rows("SELECT count(*) FROM machines"),
        vec![vec![Value::Integer(1)]]
    );
}

#[test]
fn queries_are_read_only() {
    let node = Node::new();
    let result = node.store.query("DELETE FROM machines", &[]);
    assert!(
        matches!(result, Err(StoreError::NotReadOnly(_))),
        "{result:?}"
    );
    let rows = node
        .store
        .query("SELECT ?1 + 1 AS two", &[Value::Integer(1)])
        .unwrap();
    assert_eq!(rows.columns, ["two"]);
    assert_eq!(rows.rows, vec![vec![Value::Integer(2)]]);
}

#[test]
fn changes_are_extracted_by_site_and_version_range_and_chunked_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    let opts = StoreOptions {
        chunk_bytes: 512,
        ..options(&clock)
    };
    let store = Store::open(dir.path().join("db"), opts).unwrap();
    store
        .migrate_blocking(Schema::parse(SCHEMA).unwrap())
        .unwrap();
    let big: Vec<Statement> = (0..50)
        .map(|i| {
            Statement::new(format!(
                "INSERT INTO machines (id, note) VALUES ('m{i}', 'note {i}')"
            ))
        })
        .collect();
    store.transact_blocking(big).unwrap();
    store
        .transact_blocking(vec![Statement::new(
            "UPDATE machines SET port = 1 WHERE id = 'm1'",
        )])
        .unwrap();
    let v1 = store.changes(store.site(), 1..=1).unwrap();
    assert!(v1.len() > 1, "a 100-change version is split at 512 bytes");
    assert_eq!(v1.first().unwrap().seq_first, 0);
    assert_eq!(v1.last().unwrap().seq_last, v1[0].last_seq);
    let total: usize = v1.iter().map(|c| c.changes.len()).sum();
    assert_eq!(total, 100, "50 row events and 50 note cells");
    let v2 = store.changes(store.site(), 2..=5).unwrap();
    assert_eq!(v2.len(), 1, "only version 2 exists in 2..=5");
    assert_eq!(v2[0].version, 2);
}

#[test]
fn apply_is_idempotent_and_order_free() {
    let a = Node::new();
    a.at(10)
        .exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')");
    a.at(20)
        .exec("UPDATE machines SET state = 'started' WHERE id = 'm1'");
    a.at(30)
        .exec("INSERT INTO machines (id, app) VALUES ('m2', 'db')");
    let changes = a.own_changes();
    let b = Node::new();
    let mut reversed = changes.clone();
    reversed.reverse();
    let applied = b.store.apply_blocking(reversed).unwrap();
    assert_eq!(applied.versions.len(), 3);
    let again = b.store.apply_blocking(changes).unwrap();
    assert_eq!((again.versions.len(), again.duplicates), (0, 3));
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
    let state = b.store.site_state(a.store.site()).unwrap();
    assert_eq!((state.head, state.gaps.len()), (3, 0));
}

#[test]
fn the_later_write_wins_by_timestamp_then_by_site_id() {
    let a = Node::new();
    let b = Node::new();
    a.at(10)
        .exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')");
    a.send_to(&b);
    // Concurrent writes: b's is later by the wall clock, so it wins on both.
    a.at(100)
        .exec("UPDATE machines SET state = 'from-a' WHERE id = 'm1'");
    b.at(200)
        .exec("UPDATE machines SET state = 'from-b' WHERE id = 'm1'");
    a.send_to(&b);
    b.send_to(&a);
    for node in [&a, &b] {
        assert_eq!(
            node.rows("SELECT state FROM machines"),
            vec![vec![text("from-b")]]
        );
    }
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
    // A write that has seen another is ordered after it even if its wall clock is behind.
    a.at(50)
        .exec("UPDATE machines SET state = 'after-seen' WHERE id = 'm1'");
    a.send_to(&b);
    assert_eq!(
        b.rows("SELECT state FROM machines"),
        vec![vec![text("after-seen")]]
    );
}

#[test]
fn a_delete_beats_concurrent_updates_and_a_reinsert_that_saw_it_beats_the_delete() {
    let a = Node::new();
    let b = Node::new();
    a.at(10)
        .exec("INSERT INTO machines (id, app, port) VALUES ('m1', 'web', 80)");
    a.send_to(&b);
    a.at(20).exec("DELETE FROM machines WHERE id = 'm1'");
    b.at(30)
        .exec("UPDATE machines SET port = 81 WHERE id = 'm1'");
    a.send_to(&b);
    b.send_to(&a);
    for node in [&a, &b] {
        assert!(
            node.rows("SELECT id FROM machines").is_empty(),
            "the delete wins"
        );
    }
    b.at(40)
        .exec("INSERT INTO machines (id, app) VALUES ('m1', 'api')");
    b.send_to(&a);
    for node in [&a, &b] {
        // The new life starts from defaults: the old port does not come back.
        assert_eq!(
            node.rows("SELECT app, port FROM machines"),
            vec![vec![text("api"), Value::Null]]
        );
    }
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn a_row_that_comes_back_to_life_on_a_replica_that_missed_the_delete_resets_its_columns() {
    let a = Node::new();
    let b = Node::new();
    a.at(10)
        .exec("INSERT INTO machines (id, app, note) VALUES ('m1', 'web', 'old note')");
    a.send_to(&b);
    a.at(20).exec("DELETE FROM machines WHERE id = 'm1'");
    a.at(30)
        .exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')");
    // b gets only the re-insert (version 3), not the delete (version 2).
    let v3 = a.store.changes(a.store.site(), 3..=3).unwrap();
    b.store.apply_blocking(v3).unwrap();
    assert_eq!(
        b.rows("SELECT app, note FROM machines"),
        vec![vec![text("web"), Value::Null]],
        "the note of the old life is gone"
    );
    a.send_to(&b);
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn adding_a_column_records_nothing_and_a_remote_write_to_it_wins_over_the_implicit_default() {
    let a = Node::new();
    let b = Node::new();
    a.at(10)
        .exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')");
    a.send_to(&b);
    let evolved = format!(
        "{}\n",
        SCHEMA.replace(
            "note TEXT\n)",
            "note TEXT,\n    region TEXT NOT NULL DEFAULT 'ams'\n)"
        )
    );
    let head = a.store.head();
    let report = a
        .store
        .migrate_blocking(Schema::parse(&evolved).unwrap())
        .unwrap();
    assert_eq!(report.columns_added, ["machines.region"]);
    assert_eq!(a.store.head(), head, "adding a column made no version");
    assert_eq!(
        a.rows("SELECT region FROM machines"),
        vec![vec![text("ams")]]
    );
    b.store
        .migrate_blocking(Schema::parse(&evolved).unwrap())
        .unwrap();
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
    b.at(20)
        .exec("UPDATE machines SET region = 'fra' WHERE id = 'm1'");
    b.send_to(&a);
    assert_eq!(
        a.rows("SELECT region FROM machines"),
        vec![vec![text("fra")]]
    );
}

#[test]
fn changes_for_unknown_tables_and_columns_are_parked_then_merged_when_the_schema_arrives() {
    let newer = format!(
        "{}\nCREATE TABLE apps (name TEXT NOT NULL PRIMARY KEY, owner TEXT);",
        SCHEMA.replace("note TEXT\n)", "note TEXT,\n    cpu INTEGER\n)")
    );
    let a = Node::with_schema(&newer);
    let b = Node::new();
    a.at(10)
        .exec("INSERT INTO machines (id, app, cpu) VALUES ('m1', 'web', 4)");
    a.at(20)
        .exec("INSERT INTO apps (name, owner) VALUES ('web', 'ops')");
    a.send_to(&b);
    // b holds what it can, keeps the rest, and counts both versions as received.
    assert_eq!(
        b.rows("SELECT id, app FROM machines"),
        vec![vec![text("m1"), text("web")]]
    );
    assert_eq!(b.store.site_state(a.store.site()).unwrap().head, 2);
    assert!(b.store.dump().unwrap().contains("parked machines.cpu"));
    // b serves the parked changes on to a third node that has the new schema.
    let c = Node::with_schema(&newer);
    let from_b = b.store.changes(a.store.site(), 1..=2).unwrap();
    c.store.apply_blocking(from_b).unwrap();
    assert_eq!(
        c.rows("SELECT cpu FROM machines"),
        vec![vec![Value::Integer(4)]]
    );
    let report = b
        .store
        .migrate_blocking(Schema::parse(&newer).unwrap())
        .unwrap();
    assert!(report.parked_merged >= 3, "{report:?}");
    assert_eq!(
        b.rows("SELECT cpu FROM machines"),
        vec![vec![Value::Integer(4)]]
    );
    assert_eq!(b.rows("SELECT owner FROM apps"), vec![vec![text("ops")]]);
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
    assert_eq!(a.store.dump().unwrap(), c.store.dump().unwrap());
}

#[test]
fn a_version_in_chunks_is_buffered_until_complete() {
    let a = Node::new();
    let b = Node::new();
    let rows: Vec<Statement> = (0..40)
        .map(|i| {
            Statement::new(format!(
                "INSERT INTO machines (id, note) VALUES ('m{i}', '{}')",
                "x".repeat(50)
            ))
        })
        .collect();
    let whole = a.store.transact_blocking(rows).unwrap().changeset.unwrap();
    let mut chunks = (*whole).clone().chunked(600);
    assert!(chunks.len() >= 3);
    let last = chunks.pop().unwrap();
    let applied = b.store.apply_blocking(chunks.clone()).unwrap();
    assert_eq!(
        (applied.versions.len(), applied.buffered),
        (0, chunks.len())
    );
    assert!(
        b.rows("SELECT id FROM machines").is_empty(),
        "nothing of a partial version shows"
    );
    assert_eq!(
        b.store.site_state(a.store.site()).unwrap().partials,
        vec![1]
    );
    // A duplicate chunk changes nothing; the last one completes the version.
    assert_eq!(
        b.store
            .apply_blocking(vec![chunks[0].clone()])
            .unwrap()
            .duplicates,
        1
    );
    let applied = b.store.apply_blocking(vec![last]).unwrap();
    assert_eq!(applied.versions, vec![(a.store.site(), 1)]);
    assert_eq!(
        b.rows("SELECT count(*) FROM machines"),
        vec![vec![Value::Integer(40)]]
    );
    assert!(
        b.store
            .site_state(a.store.site())
            .unwrap()
            .partials
            .is_empty()
    );
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn bookkeeping_records_heads_and_gaps_and_survives_a_reopen() {
    let a = Node::new();
    for i in 0..5 {
        a.exec(&format!("INSERT INTO machines (id) VALUES ('m{i}')"));
    }
    let changes = a.own_changes();
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    let path = dir.path().join("db");
    let b = Store::open(&path, options(&clock)).unwrap();
    b.migrate_blocking(Schema::parse(SCHEMA).unwrap()).unwrap();
    b.apply_blocking(vec![changes[0].clone(), changes[3].clone()])
        .unwrap();
    let state = b.site_state(a.store.site()).unwrap();
    assert_eq!((state.head, state.gaps.clone()), (4, vec![2..=3]));
    assert!(
        b.bookkeeping()
            .iter()
            .any(|s| s.site == a.store.site() && s.head == 4)
    );
    drop(b);
    let b = Store::open(&path, options(&clock)).unwrap();
    let state = b.site_state(a.store.site()).unwrap();
    assert_eq!((state.head, state.gaps), (4, vec![2..=3]));
    b.apply_blocking(vec![changes[2].clone()]).unwrap();
    assert_eq!(b.site_state(a.store.site()).unwrap().gaps, vec![2..=2]);
}

#[test]
fn remote_timestamps_advance_the_clock_and_far_future_ones_are_counted() {
    let a = Node::new();
    let b = Node::new();
    // a's clock runs an hour ahead of b's.
    a.at(10_000_000)
        .exec("INSERT INTO machines (id, app) VALUES ('m1', 'web')");
    b.at(10_000_000 - 3_600_000);
    a.send_to(&b);
    assert_eq!(b.store.stats().far_future_total, 1);
    // b's next write is still ordered after what it has seen.
    b.exec("UPDATE machines SET app = 'api' WHERE id = 'm1'");
    let change = b.own_changes().pop().unwrap();
    assert!(change.ts > a.own_changes()[0].ts);
    b.send_to(&a);
    assert_eq!(a.rows("SELECT app FROM machines"), vec![vec![text("api")]]);
}

#[test]
fn malformed_changesets_are_rejected_and_apply_nothing() {
    let a = Node::new();
    let b = Node::new();
    a.exec("INSERT INTO machines (id) VALUES ('m1')");
    let mut bad = a.own_changes();
    bad[0].changes[0].pk = vec![1, 9, 9];
    let applied = b.store.apply_blocking(bad).unwrap();
    assert_eq!(applied.rejected.len(), 1);
    assert!(
        b.store
            .site_state(a.store.site())
            .is_none_or(|s| s.head == 0)
    );
    assert!(b.rows("SELECT id FROM machines").is_empty());
    // Our own site's versions are never taken from elsewhere.
    let mut forged = a.own_changes();
    forged[0].site = b.store.site();
    let applied = b.store.apply_blocking(forged).unwrap();
    assert_eq!(
        applied.rejected.len(),
        1,
        "a version of b's own site that b never wrote"
    );
    assert!(b.rows("SELECT id FROM machines").is_empty());
    assert_eq!(b.store.head(), 0);
}

#[test]
fn refused_schema_changes_leave_the_store_unchanged() {
    let node = Node::new();
    node.exec("INSERT INTO machines (id, port) VALUES ('m1', 1)");
    let before = node.store.dump().unwrap();
    let dropped = SCHEMA.replace("    note TEXT\n", "    note2 TEXT\n");
    match node
        .store
        .migrate_blocking(Schema::parse(&dropped).unwrap())
    {
        Err(StoreError::SchemaRefused(refusal)) => {
            assert_eq!(refusal.table, "machines");
            assert_eq!(refusal.column.as_deref(), Some("note"));
            assert_eq!(refusal.reason, Refusal::ColumnRemoved);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let retyped = SCHEMA.replace("port INTEGER", "port TEXT");
    assert!(matches!(
        node.store.migrate_blocking(Schema::parse(&retyped).unwrap()),
        Err(StoreError::SchemaRefused(r)) if r.column.as_deref() == Some("port")
    ));
    assert_eq!(node.store.dump().unwrap(), before);
    assert_eq!(node.store.schema(), Schema::parse(SCHEMA).unwrap());
}

#[test]
fn full_durability_commits_work_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    let opts = StoreOptions {
        durability: Durability::Full,
        ..options(&clock)
    };
    let store = Store::open(dir.path().join("db"), opts).unwrap();
    store
        .migrate_blocking(Schema::parse(SCHEMA).unwrap())
        .unwrap();
    let version = store
        .transact_blocking(vec![Statement::new(
            "INSERT INTO machines (id) VALUES ('m1')",
        )])
        .unwrap()
        .version;
    assert_eq!(version, Some(1));
}

#[test]
fn a_reboot_after_an_unclean_shutdown_takes_a_new_site_so_versions_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    let path = dir.path().join("db");
    let store = Store::open(&path, options(&clock)).unwrap();
    let first = store.site();
    drop(store); // a clean shutdown
    // Simulate a crash: the store is marked running, then "rebooted".
    let marker = rusqlite::Connection::open(&path).unwrap();
    marker
        .execute("UPDATE __strata_meta SET value = 0 WHERE key = 'clean'", [])
        .unwrap();
    drop(marker);
    let rebooted = StoreOptions {
        boot_id: Some("another-boot".into()),
        ..options(&clock)
    };
    let store = Store::open(&path, rebooted).unwrap();
    assert_ne!(store.site(), first);
    assert_eq!(store.head(), 0);
}

/// Submits a slow transaction, then `others` at once: they queue while the writer is busy with
/// the first, so the writer takes them as one group.
fn queued_behind_a_slow_transaction(
    store: &Store,
    others: Vec<Vec<Statement>>,
) -> Vec<Result<Option<u64>, StoreError>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
            INSERT INTO machines (id, app) SELECT 'slow-' || i, 'x' FROM n";
        let mut calls = vec![store.transact(vec![Statement::new(slow)])];
        calls.extend(
            others
                .into_iter()
                .map(|statements| store.transact(statements)),
        );
        let results = futures::future::join_all(calls).await;
        let mut results: Vec<_> = results.into_iter().map(|r| r.map(|c| c.version)).collect();
        results.remove(0).unwrap();
        results
    })
}

#[test]
fn transactions_queued_together_share_one_commit() {
    let node = Node::new();
    let others = (0..20)
        .map(|i| {
            vec![Statement::new(format!(
                "INSERT INTO machines (id) VALUES ('q{i}')"
            ))]
        })
        .collect();
    let before = node.store.stats().commits_total;
    let results = queued_behind_a_slow_transaction(&node.store, others);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let commits = node.store.stats().commits_total - before;
    assert!(commits < 21, "21 transactions took {commits} commits");
    assert_eq!(node.store.head(), 21);
}

#[test]
fn a_failing_transaction_in_a_shared_commit_fails_alone() {
    let node = Node::new();
    let mut others: Vec<Vec<Statement>> = (0..10)
        .map(|i| {
            vec![Statement::new(format!(
                "INSERT INTO machines (id) VALUES ('q{i}')"
            ))]
        })
        .collect();
    // A good insert, then bad SQL: the whole transaction must vanish, the others stay.
    others.insert(
        5,
        vec![
            Statement::new("INSERT INTO machines (id) VALUES ('doomed')"),
            Statement::new("INSERT INTO nope (id) VALUES (1)"),
        ],
    );
    let results = queued_behind_a_slow_transaction(&node.store, others);
    for (i, result) in results.iter().enumerate() {
        match (i, result) {
            (5, Err(StoreError::UnknownTable { index: 1, .. })) => {}
            (5, other) => panic!("the bad transaction: {other:?}"),
            (_, Ok(Some(_))) => {}
            (i, other) => panic!("transaction {i}: {other:?}"),
        }
    }
    assert!(
        node.rows("SELECT id FROM machines WHERE id = 'doomed'")
            .is_empty()
    );
    assert_eq!(
        node.rows("SELECT count(*) FROM machines WHERE id LIKE 'q%'"),
        vec![vec![Value::Integer(10)]]
    );
    assert_eq!(
        node.store.head(),
        11,
        "the failed transaction used no version"
    );
}

#[test]
fn chunks_of_a_version_arriving_together_are_joined_without_buffering() {
    let a = Node::new();
    let b = Node::new();
    let rows: Vec<Statement> = (0..40)
        .map(|i| {
            Statement::new(format!(
                "INSERT INTO machines (id, note) VALUES ('m{i}', '{}')",
                "x".repeat(50)
            ))
        })
        .collect();
    let whole = a.store.transact_blocking(rows).unwrap().changeset.unwrap();
    let mut chunks = (*whole).clone().chunked(600);
    assert!(chunks.len() >= 3);
    chunks.reverse();
    let duplicate = chunks[1].clone();
    chunks.push(duplicate);
    let applied = b.store.apply_blocking(chunks).unwrap();
    assert_eq!(applied.versions, vec![(a.store.site(), 1)]);
    assert_eq!(applied.buffered, 0);
    assert_eq!(b.store.stats().buffered_chunks_total, 0);
    assert_eq!(a.store.dump().unwrap(), b.store.dump().unwrap());
}
