//! A row life is visible on a node only once the write that began it (the insert, or the
//! re-insert after a delete) has been applied there: cells that arrive first wait, persisted and
//! counted, and merge by the usual rules when their row event arrives; a newer life drops them.
//!
//! Each test builds the out-of-order delivery by hand: writers on some nodes, and a receiver that
//! is given their versions in a chosen order. Values inserted are never a column's default, so a
//! row filled with defaults would show.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strata_common::store::{Changeset, Schema, Statement, Store, StoreOptions, Value, WallClock};

const SCHEMA: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'created',
    note TEXT
) STRICT;";

struct Node {
    store: Store,
    clock: Arc<AtomicU64>,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(1_000_000));
        let store = open(dir.path(), &clock);
        store
            .migrate_blocking(Schema::parse(SCHEMA).unwrap())
            .unwrap();
        Node { store, clock, dir }
    }

    /// Closes the store and opens it again from its file.
    fn reopen(self) -> Node {
        let Node { store, clock, dir } = self;
        drop(store);
        let store = open(dir.path(), &clock);
        Node { store, clock, dir }
    }

    fn at(&self, ms: u64) -> &Self {
        self.clock.store(1_000_000 + ms, Ordering::Relaxed);
        self
    }

    /// Runs `sql` and returns the version it made.
    fn exec(&self, sql: &str) -> Changeset {
        let committed = self
            .store
            .transact_blocking(vec![Statement::new(sql)])
            .unwrap();
        (*committed
            .changeset
            .expect("the statement changed something"))
        .clone()
    }

    fn apply(&self, changesets: Vec<Changeset>) {
        let applied = self.store.apply_blocking(changesets).unwrap();
        assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
    }

    fn rows(&self) -> Vec<Vec<Value>> {
        self.store
            .query("SELECT id, app, state, note FROM machines ORDER BY id", &[])
            .unwrap()
            .rows
    }

    fn waiting(&self) -> u64 {
        self.store.stats().waiting_now
    }
}

fn open(dir: &Path, clock: &Arc<AtomicU64>) -> Store {
    Store::open(
        dir.join("db.sqlite"),
        StoreOptions {
            wall_clock: WallClock::Manual(Arc::clone(clock)),
            boot_id: Some("test-boot".into()),
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn row(id: &str, app: &str, state: &str, note: Option<&str>) -> Vec<Value> {
    vec![
        text(id),
        text(app),
        text(state),
        note.map_or(Value::Null, text),
    ]
}

/// Node `a` inserts m1, node `b` receives it and updates its note: the update's version is the
/// one a third node may receive first.
fn insert_then_remote_update() -> (Node, Node, Changeset, Changeset) {
    let a = Node::new();
    let b = Node::new();
    let insert = a
        .at(10)
        .exec("INSERT INTO machines (id, app, state) VALUES ('m1', 'web', 'started')");
    b.apply(vec![insert.clone()]);
    let update = b
        .at(20)
        .exec("UPDATE machines SET note = 'from b' WHERE id = 'm1'");
    (a, b, insert, update)
}

#[test]
fn an_update_that_arrives_before_its_insert_waits_and_the_row_appears_whole_with_the_insert() {
    let (_a, b, insert, update) = insert_then_remote_update();
    let c = Node::new();
    c.apply(vec![update.clone()]);
    assert_eq!(
        c.rows(),
        Vec::<Vec<Value>>::new(),
        "no row before its insert"
    );
    assert_eq!(c.waiting(), 1);
    assert_eq!(c.store.stats().waiting_total, 1);
    let dump = c.store.dump().unwrap();
    assert!(dump.contains("waiting machines.note"), "{dump}");
    // The version of the update is held all the same: it is not fetched again.
    assert!(c.store.has(update.site, update.version));

    c.apply(vec![insert]);
    assert_eq!(c.rows(), vec![row("m1", "web", "started", Some("from b"))]);
    assert_eq!(c.waiting(), 0);
    assert_eq!(c.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn an_update_before_its_insert_then_the_delete_leaves_no_row_and_nothing_waiting() {
    let (a, b, insert, update) = insert_then_remote_update();
    a.apply(vec![update.clone()]);
    let delete = a.at(30).exec("DELETE FROM machines WHERE id = 'm1'");
    b.apply(vec![delete.clone()]);
    let c = Node::new();
    c.apply(vec![update]);
    assert_eq!(c.waiting(), 1);
    c.apply(vec![delete]);
    assert_eq!(
        c.waiting(),
        0,
        "the delete began a newer life: the cell is dropped"
    );
    assert!(c.rows().is_empty());
    c.apply(vec![insert]);
    assert!(
        c.rows().is_empty(),
        "the insert of an older life changes nothing"
    );
    assert_eq!(c.store.dump().unwrap(), a.store.dump().unwrap());
    assert_eq!(c.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn cells_of_a_reinsert_that_arrive_first_wait_while_readers_keep_seeing_the_old_life() {
    let a = Node::new();
    let b = Node::new();
    let c = Node::new();
    let first = a
        .at(10)
        .exec("INSERT INTO machines (id, app, note) VALUES ('m1', 'web', 'first life')");
    c.apply(vec![first.clone()]);
    let delete = a.at(20).exec("DELETE FROM machines WHERE id = 'm1'");
    let reinsert = a
        .at(30)
        .exec("INSERT INTO machines (id, app, state) VALUES ('m1', 'api', 'started')");
    b.apply(vec![first, delete.clone(), reinsert.clone()]);
    let update = b
        .at(40)
        .exec("UPDATE machines SET note = 'second life' WHERE id = 'm1'");

    c.apply(vec![update]);
    assert_eq!(
        c.rows(),
        vec![row("m1", "web", "created", Some("first life"))],
        "the first life stays as it was, not reset to defaults"
    );
    assert_eq!(c.waiting(), 1);
    c.apply(vec![delete]);
    assert!(c.rows().is_empty());
    assert_eq!(
        c.waiting(),
        1,
        "the cell waits for life 3, newer than the delete"
    );
    c.apply(vec![reinsert]);
    assert_eq!(
        c.rows(),
        vec![row("m1", "api", "started", Some("second life"))]
    );
    assert_eq!(c.waiting(), 0);
    assert_eq!(c.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn a_chunked_update_before_a_chunked_insert_shows_rows_only_once_the_insert_is_complete() {
    let a = Node::new();
    let b = Node::new();
    let values: Vec<String> = (0..20)
        .map(|i| format!("('m{i:02}', 'web', 'started')"))
        .collect();
    let insert = a.at(10).exec(&format!(
        "INSERT INTO machines (id, app, state) VALUES {}",
        values.join(", ")
    ));
    b.apply(vec![insert.clone()]);
    let update = b.at(20).exec("UPDATE machines SET note = 'n'");
    let c = Node::new();
    let update_chunks = update.chunked(120);
    let insert_chunks = insert.chunked(120);
    assert!(update_chunks.len() > 2 && insert_chunks.len() > 2);
    for chunk in update_chunks {
        c.apply(vec![chunk]);
        assert!(c.rows().is_empty());
    }
    assert_eq!(c.waiting(), 20);
    let last = insert_chunks.len() - 1;
    for (i, chunk) in insert_chunks.into_iter().enumerate() {
        c.apply(vec![chunk]);
        let rows = c.rows();
        if i < last {
            assert!(rows.is_empty(), "a partial version shows nothing: {rows:?}");
        } else {
            assert_eq!(rows.len(), 20);
            assert!(
                rows.iter()
                    .all(|r| r[1] == text("web") && r[3] == text("n")),
                "{rows:?}"
            );
        }
    }
    assert_eq!(c.waiting(), 0);
    assert_eq!(c.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn a_row_event_and_cells_of_one_row_in_one_version_merge_in_either_order() {
    let (_a, b, insert, update) = insert_then_remote_update();
    // The cells of the insert come before its row event in a version a peer reordered.
    let mut cells_first = insert.clone();
    cells_first.changes.rotate_left(1);
    for (seq, change) in cells_first.changes.iter_mut().enumerate() {
        change.seq = seq as u32;
    }
    assert!(cells_first.changes.last().unwrap().column.is_none());
    let c = Node::new();
    c.apply(vec![update, cells_first]);
    assert_eq!(c.rows(), vec![row("m1", "web", "started", Some("from b"))]);
    assert_eq!(c.waiting(), 0);
    let values = |dump: String| -> Vec<String> {
        dump.lines()
            .filter(|l| l.contains("values"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        values(c.store.dump().unwrap()),
        values(b.store.dump().unwrap())
    );
}

#[test]
fn waiting_cells_survive_a_restart_and_merge_when_their_insert_arrives() {
    let (_a, b, insert, update) = insert_then_remote_update();
    let c = Node::new();
    c.apply(vec![update]);
    let c = c.reopen();
    assert_eq!(c.waiting(), 1, "the gauge is restored from the store");
    assert!(c.rows().is_empty());
    c.apply(vec![insert]);
    assert_eq!(c.rows(), vec![row("m1", "web", "started", Some("from b"))]);
    assert_eq!(c.waiting(), 0);
    assert_eq!(c.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn a_waiting_cell_is_served_to_peers_under_its_version() {
    let (_a, b, insert, update) = insert_then_remote_update();
    let c = Node::new();
    c.apply(vec![update.clone()]);
    let served = c
        .store
        .changes(update.site, update.version..=update.version)
        .unwrap();
    let cells: Vec<_> = served
        .iter()
        .flat_map(|c| &c.changes)
        .map(|c| (c.column.clone(), c.value.clone()))
        .collect();
    assert_eq!(cells, vec![(Some("note".to_owned()), text("from b"))]);
    let d = Node::new();
    d.apply(served);
    assert_eq!(d.waiting(), 1);
    d.apply(vec![insert]);
    assert_eq!(d.rows(), vec![row("m1", "web", "started", Some("from b"))]);
    assert_eq!(d.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn replaying_a_waiting_cell_or_its_insert_changes_nothing() {
    let (_a, b, insert, update) = insert_then_remote_update();
    let c = Node::new();
    c.apply(vec![update.clone(), update.clone()]);
    assert_eq!(c.waiting(), 1);
    c.apply(vec![insert.clone(), update.clone(), insert]);
    c.apply(vec![update]);
    assert_eq!(c.rows(), vec![row("m1", "web", "started", Some("from b"))]);
    assert_eq!(c.waiting(), 0);
    assert_eq!(c.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn a_local_insert_of_the_life_cells_wait_for_merges_them_and_replicas_converge() {
    let (a, b, insert, update) = insert_then_remote_update();
    let c = Node::new();
    c.apply(vec![update.clone()]);
    // c cannot see m1, so its client inserts it: the same life, begun here too.
    let local = c
        .at(30)
        .exec("INSERT INTO machines (id, app) VALUES ('m1', 'db')");
    assert_eq!(
        c.waiting(),
        0,
        "the local insert began the life the cell waited for"
    );
    assert_eq!(c.rows(), vec![row("m1", "db", "created", Some("from b"))]);
    // Everyone gets everything, in whatever order: one result.
    a.apply(vec![update, local.clone()]);
    b.apply(vec![local]);
    c.apply(vec![insert]);
    let reference = a.store.dump().unwrap();
    assert_eq!(b.store.dump().unwrap(), reference);
    assert_eq!(c.store.dump().unwrap(), reference);
    assert!(!reference.contains("waiting"), "{reference}");
}

#[test]
fn a_reader_never_sees_a_row_filled_with_defaults_while_cells_arrive_before_inserts() {
    let a = Node::new();
    let b = Node::new();
    let mut inserts = Vec::new();
    let mut updates = Vec::new();
    for i in 0..30 {
        let insert = a.at(10 + i).exec(&format!(
            "INSERT INTO machines (id, app, state) VALUES ('m{i:02}', 'web', 'started')"
        ));
        b.apply(vec![insert.clone()]);
        updates.push(b.at(100 + i).exec(&format!(
            "UPDATE machines SET note = 'n{i}' WHERE id = 'm{i:02}'"
        )));
        inserts.push(insert);
    }
    let c = Arc::new(Node::new());
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (c, stop, reads) = (Arc::clone(&c), Arc::clone(&stop), Arc::clone(&reads));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for r in c.rows() {
                    assert_eq!(
                        (&r[1], &r[2]),
                        (&text("web"), &text("started")),
                        "a row nobody wrote: {r:?}"
                    );
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let wait_for_reads = |at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while reads.load(Ordering::Relaxed) < at_least {
            assert!(
                Instant::now() < deadline,
                "the reader made {} reads, expected {at_least}",
                reads.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_for_reads(1);
    // Every update goes first, then the inserts, one version per apply.
    for update in updates {
        c.apply(vec![update]);
    }
    for insert in inserts {
        c.apply(vec![insert]);
    }
    // At least one whole read of the final state.
    wait_for_reads(reads.load(Ordering::Relaxed) + 2);
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .expect("the reader saw only rows someone wrote");
    let rows = c.rows();
    assert_eq!(rows.len(), 30, "{rows:?}");
    assert!(rows.iter().all(|r| r[3] != Value::Null), "{rows:?}");
    assert_eq!(c.store.dump().unwrap(), b.store.dump().unwrap());
}

#[test]
fn a_local_insert_and_delete_in_one_transaction_drops_the_cells_waiting_for_that_life() {
    let (a, b, insert, update) = insert_then_remote_update();
    let c = Node::new();
    c.apply(vec![update.clone()]);
    let committed = c
        .store
        .transact_blocking(vec![
            Statement::new("INSERT INTO machines (id, app) VALUES ('m1', 'db')"),
            Statement::new("DELETE FROM machines WHERE id = 'm1'"),
        ])
        .unwrap();
    assert_eq!(c.waiting(), 0, "life 1 began and ended here");
    assert!(c.rows().is_empty());
    let local = (*committed.changeset.unwrap()).clone();
    a.apply(vec![update, local.clone()]);
    b.apply(vec![local]);
    c.apply(vec![insert]);
    let reference = a.store.dump().unwrap();
    assert_eq!(b.store.dump().unwrap(), reference);
    assert_eq!(c.store.dump().unwrap(), reference);
    assert!(!reference.contains("waiting"), "{reference}");
}
