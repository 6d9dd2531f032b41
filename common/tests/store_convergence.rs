//! Property test: replicas that write concurrently and exchange changes in any order converge.
//!
//! Method: 3 to 5 replicas run random upserts, updates, deletes and re-inserts on a few shared
//! keys (so writes conflict), with skewed clocks; some replicas add a column at random moments
//! and write to it while others do not know it yet. Changesets travel in random subsets, shuffled,
//! duplicated and split into chunks, sometimes straight from the writer and sometimes relayed
//! through another replica's extraction. At the end every replica adds the column, everything is
//! delivered everywhere, and every replica must hold identical rows, identical clock metadata
//! and identical bookkeeping, with nothing parked or waiting.
//!
//! At every step of the random delivery, every row a reader can see must be in a life whose row
//! event (the insert or re-insert that began it) this replica has applied: its recorded row event
//! must be one that some replica really wrote, with the same key and causal length, in a version
//! this replica holds. A row made from a cell that overtook its insert would fail this.
//! A failure prints the scenario's seed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::Config;
use strata_common::store::{
    Changeset, Schema, SiteId, Statement, Store, StoreOptions, Value, WallClock, display_pk,
};

const BASE: &str = "CREATE TABLE t (
    id TEXT NOT NULL PRIMARY KEY,
    a INTEGER,
    b TEXT,
    c INTEGER NOT NULL DEFAULT 0
) STRICT;";

const EVOLVED: &str = "CREATE TABLE t (
    id TEXT NOT NULL PRIMARY KEY,
    a INTEGER,
    b TEXT,
    c INTEGER NOT NULL DEFAULT 0,
    d TEXT DEFAULT 'none'
) STRICT;";

const KEYS: u8 = 4;

#[derive(Debug, Clone)]
enum Write {
    Upsert {
        key: u8,
        a: Option<u8>,
        b: Option<u8>,
        c: u8,
        d: Option<u8>,
    },
    Update {
        key: u8,
        column: u8,
        value: u8,
    },
    Delete {
        key: u8,
    },
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        node: usize,
        writes: Vec<Write>,
        advance_ms: u64,
    },
    AddColumn {
        node: usize,
    },
    Deliver {
        to: usize,
        picks: Vec<prop::sample::Index>,
        chunk_bytes: usize,
        duplicate: bool,
    },
    Relay {
        from: usize,
        to: usize,
        chunk_bytes: usize,
    },
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        4 => (0..KEYS, prop::option::of(0u8..3), prop::option::of(0u8..3), 0u8..3, prop::option::of(0u8..3))
            .prop_map(|(key, a, b, c, d)| Write::Upsert { key, a, b, c, d }),
        3 => (0..KEYS, 0u8..4, 0u8..3).prop_map(|(key, column, value)| Write::Update { key, column, value }),
        2 => (0..KEYS).prop_map(|key| Write::Delete { key }),
    ]
}

fn op(nodes: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..nodes, prop::collection::vec(write(), 1..4), 0u64..3)
            .prop_map(|(node, writes, advance_ms)| Op::Write { node, writes, advance_ms }),
        1 => (0..nodes).prop_map(|node| Op::AddColumn { node }),
        3 => (0..nodes, prop::collection::vec(any::<prop::sample::Index>(), 0..6), 60usize..400, any::<bool>())
            .prop_map(|(to, picks, chunk_bytes, duplicate)| Op::Deliver { to, picks, chunk_bytes, duplicate }),
        1 => (0..nodes, 0..nodes, 60usize..400)
            .prop_map(|(from, to, chunk_bytes)| Op::Relay { from, to, chunk_bytes }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Op>, u64)> {
    (3usize..=5).prop_flat_map(|nodes| {
        (
            Just(nodes),
            prop::collection::vec(op(nodes), 5..40),
            any::<u64>(),
        )
    })
}

struct Replica {
    store: Store,
    clock: Arc<AtomicU64>,
    evolved: bool,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn new(skew_ms: u64) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(1_000_000 + skew_ms));
        let options = StoreOptions {
            wall_clock: WallClock::Manual(Arc::clone(&clock)),
            boot_id: Some("prop".into()),
            readers: 1,
            writer_cache_kib: 1024,
            reader_cache_kib: 512,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path().join("db"), options).unwrap();
        store
            .migrate_blocking(Schema::parse(BASE).unwrap())
            .unwrap();
        Replica {
            store,
            clock,
            evolved: false,
            _dir: dir,
        }
    }

    fn evolve(&mut self) {
        if !self.evolved {
            let report = self
                .store
                .migrate_blocking(Schema::parse(EVOLVED).unwrap())
                .unwrap();
            assert_eq!(report.columns_added, ["t.d"]);
            self.evolved = true;
        }
    }

    fn run(&self, writes: &[Write]) -> Option<Changeset> {
        let statements = writes.iter().map(|w| self.statement(w)).collect();
        self.store
            .transact_blocking(statements)
            .unwrap()
            .changeset
            .map(|c| (*c).clone())
    }

    fn statement(&self, write: &Write) -> Statement {
        let key = Value::Text(format!(
            "k{}",
            match write {
                Write::Upsert { key, .. } | Write::Update { key, .. } | Write::Delete { key } =>
                    key,
            }
        ));
        let small = |v: Option<u8>| v.map_or(Value::Null, |v| Value::Integer(i64::from(v)));
        let word = |v: Option<u8>| v.map_or(Value::Null, |v| Value::Text(format!("w{v}")));
        match write {
            Write::Upsert { a, b, c, d, .. } if self.evolved => Statement::with_params(
                "INSERT INTO t (id, a, b, c, d) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET a = excluded.a, b = excluded.b, c = excluded.c,
                 d = excluded.d",
                vec![
                    key,
                    small(*a),
                    word(*b),
                    Value::Integer(i64::from(*c)),
                    word(*d),
                ],
            ),
            Write::Upsert { a, b, c, .. } => Statement::with_params(
                "INSERT INTO t (id, a, b, c) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET a = excluded.a, b = excluded.b, c = excluded.c",
                vec![key, small(*a), word(*b), Value::Integer(i64::from(*c))],
            ),
            Write::Update { column, value, .. } => {
                let (column, value) = match column {
                    0 => ("a", Value::Integer(i64::from(*value))),
                    1 => ("b", Value::Text(format!("w{value}"))),
                    2 => ("c", Value::Integer(i64::from(*value))),
                    _ if self.evolved => ("d", Value::Text(format!("w{value}"))),
                    _ => ("b", Value::Null),
                };
                Statement::with_params(
                    format!("UPDATE t SET {column} = ?2 WHERE id = ?1"),
                    vec![key, value],
                )
            }
            Write::Delete { .. } => {
                Statement::with_params("DELETE FROM t WHERE id = ?1", vec![key])
            }
        }
    }

    fn apply(&self, changesets: Vec<Changeset>) {
        let applied = self.store.apply_blocking(changesets).unwrap();
        assert!(
            applied.rejected.is_empty(),
            "rejected: {:?}",
            applied.rejected
        );
    }

    /// Everything this replica holds, as another replica would be served it.
    fn serve_all(&self) -> Vec<Changeset> {
        self.store
            .bookkeeping()
            .into_iter()
            .filter(|s| s.head > 0)
            .flat_map(|s| self.store.changes(s.site, 1..=s.head).unwrap())
            .collect()
    }
}

fn shuffle<T>(items: &mut [T], rng: &mut u64) {
    for i in (1..items.len()).rev() {
        *rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (*rng >> 33) as usize % (i + 1);
        items.swap(i, j);
    }
}

fn chunks(changesets: &[Changeset], bytes: usize) -> Vec<Changeset> {
    changesets
        .iter()
        .flat_map(|c| c.clone().chunked(bytes))
        .collect()
}

/// The row events that began a row life (odd causal length) among everything written, by the
/// stamp the dump prints for them: (site's first 8 hex digits, version, seq) -> (site, key, cl).
type Lives = HashMap<(String, u64, u32), (SiteId, String, u64)>;

fn record_lives(lives: &mut Lives, changeset: &Changeset) {
    for change in &changeset.changes {
        if change.column.is_none() && change.cl % 2 == 1 {
            lives.insert(
                (
                    changeset.site.to_string()[..8].to_owned(),
                    changeset.version,
                    change.seq,
                ),
                (changeset.site, display_pk(&change.pk), change.cl),
            );
        }
    }
}

/// Every row a reader of `replica` sees is in a life whose row event the replica has applied.
fn check_visible_lives(replica: &Replica, lives: &Lives, step: usize) -> Result<(), TestCaseError> {
    let dump = replica.store.dump().unwrap();
    let lines: Vec<&str> = dump.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix("  row ") else {
            continue;
        };
        let visible = lines
            .get(i + 1)
            .is_some_and(|next| next.starts_with("    values "));
        if !visible {
            continue;
        }
        // "<key> cl=<n> <site>/v<version>.<seq> @<ts>" or "<key> cl=<n> implied"
        let (key, rest) = rest.split_once(" cl=").unwrap();
        let (cl, stamp) = rest.split_once(' ').unwrap();
        let cl: u64 = cl.parse().unwrap();
        let parsed = stamp.split_once('/').and_then(|(site, rest)| {
            let (at, _) = rest.split_once(' ')?;
            let (version, seq) = at.strip_prefix('v')?.split_once('.')?;
            Some((site.to_owned(), version.parse().ok()?, seq.parse().ok()?))
        });
        let context = || format!("step {step}: visible row {key} cl={cl} {stamp}\n{dump}");
        prop_assert!(cl % 2 == 1, "{}", context());
        let Some(parsed) = parsed else {
            return Err(TestCaseError::fail(format!(
                "no row event began this life: {}",
                context()
            )));
        };
        let Some((site, life_key, life_cl)) = lives.get(&parsed) else {
            return Err(TestCaseError::fail(format!(
                "its row event was never written: {}",
                context()
            )));
        };
        prop_assert_eq!(
            (life_key.as_str(), *life_cl),
            (key, cl),
            "the row event is of another row or life: {}",
            context()
        );
        prop_assert!(
            replica.store.has(*site, parsed.1) || *site == replica.store.site(),
            "the version of its row event is not held here: {}",
            context()
        );
    }
    Ok(())
}

fn run_scenario(nodes: usize, ops: &[Op], seed: u64) -> Result<(), TestCaseError> {
    let mut rng = seed | 1;
    let mut replicas: Vec<Replica> = (0..nodes).map(|i| Replica::new(i as u64 * 7)).collect();
    let mut pool: Vec<Changeset> = Vec::new();
    let mut lives = Lives::new();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Write {
                node,
                writes,
                advance_ms,
            } => {
                let replica = &replicas[*node];
                replica.clock.fetch_add(*advance_ms, Ordering::Relaxed);
                if let Some(changeset) = replica.run(writes) {
                    record_lives(&mut lives, &changeset);
                    pool.push(changeset);
                }
                check_visible_lives(replica, &lives, step)?;
            }
            Op::AddColumn { node } => {
                replicas[*node].evolve();
                check_visible_lives(&replicas[*node], &lives, step)?;
            }
            Op::Deliver {
                to,
                picks,
                chunk_bytes,
                duplicate,
            } => {
                if pool.is_empty() {
                    continue;
                }
                let mut batch: Vec<Changeset> = picks
                    .iter()
                    .map(|i| pool[i.index(pool.len())].clone())
                    .collect();
                let mut batch = chunks(&batch.split_off(0), *chunk_bytes);
                if *duplicate {
                    let again = batch.clone();
                    batch.extend(again);
                }
                shuffle(&mut batch, &mut rng);
                if (rng >> 40) & 1 == 1 {
                    // One changeset at a time, so every intermediate state is checked.
                    for changeset in batch {
                        replicas[*to].apply(vec![changeset]);
                        check_visible_lives(&replicas[*to], &lives, step)?;
                    }
                } else {
                    // Together, so chunks of a version can be joined in one apply.
                    replicas[*to].apply(batch);
                    check_visible_lives(&replicas[*to], &lives, step)?;
                }
            }
            Op::Relay {
                from,
                to,
                chunk_bytes,
            } => {
                let mut batch = chunks(&replicas[*from].serve_all(), *chunk_bytes);
                shuffle(&mut batch, &mut rng);
                replicas[*to].apply(batch);
                check_visible_lives(&replicas[*to], &lives, step)?;
            }
        }
    }
    // Heal: every replica learns the column, then everything reaches everyone, some of it
    // relayed through a peer's extraction.
    for replica in &mut replicas {
        replica.evolve();
    }
    for (i, replica) in replicas.iter().enumerate() {
        let mut batch = pool.clone();
        let relay = &replicas[(i + 1) % nodes];
        batch.extend(chunks(&relay.serve_all(), 200));
        shuffle(&mut batch, &mut rng);
        replica.apply(batch);
        check_visible_lives(replica, &lives, ops.len())?;
    }
    let reference = replicas[0].store.dump().unwrap();
    let books = replicas[0].store.bookkeeping();
    prop_assert!(
        !reference.contains("parked"),
        "nothing stays parked:\n{reference}"
    );
    prop_assert!(
        !reference.contains("waiting"),
        "nothing stays waiting for its row life:\n{reference}"
    );
    for replica in &replicas {
        prop_assert_eq!(replica.store.stats().waiting_now, 0);
    }
    prop_assert!(
        !reference.contains("!!"),
        "metadata matches base rows:\n{reference}"
    );
    for (i, replica) in replicas.iter().enumerate().skip(1) {
        let dump = replica.store.dump().unwrap();
        prop_assert_eq!(&dump, &reference, "replica {} differs from replica 0", i);
        prop_assert_eq!(
            replica.store.bookkeeping(),
            books.clone(),
            "bookkeeping of replica {}",
            i
        );
    }
    for state in &books {
        prop_assert!(
            state.gaps.is_empty() && state.partials.is_empty(),
            "{state:?}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 256, max_shrink_iters: 2000, ..Config::default() })]

    #[test]
    fn replicas_converge_and_never_show_a_row_life_whose_row_event_has_not_arrived(
        (nodes, ops, seed) in scenario()
    ) {
        run_scenario(nodes, &ops, seed)
            .map_err(|err| TestCaseError::fail(format!("seed {seed}: {err}")))?;
    }
}
