//! A hostile-client property test: random requests from every class of hostile input, mixed with
//! ordinary writes, thrown at a 3-node region.
//!
//! The classes: internal statements and internal-table names in several spellings, transaction
//! control inside a request, statements that never end (in transactions and in queries), pragmas
//! and ATTACH through queries, values built on the server past what can replicate, text that is
//! not UTF-8, and huge parameters. Invariants checked afterwards:
//!
//! - every request either succeeded or was refused with a precise status (never INTERNAL,
//!   UNKNOWN or UNAVAILABLE), and every hostile request was refused;
//! - after every hostile request, every node answers `Health` and an ordinary write within a
//!   second;
//! - the cluster converges to identical tables, every acknowledged write is on every node, and
//!   no refused request left anything behind (its marker rows are absent everywhere, and every
//!   node's bookkeeping of every site agrees with that site's own head).
//!
//! Seeded: the seed is printed (shown when the test fails) and `STRATA_HOSTILE_SEED=N` replays
//! it. The default run is short; `cargo test --test hostile -- --ignored` runs a long one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use strata_client::{Client, ClientError};
use strata_common::config::NodeConfig;
use strata_common::store::{Statement, Value};
use strata_tests::cluster::{TestCluster, wait_for};
use tonic::Code;

/// One request of the run.
#[derive(Debug, Clone)]
enum Request {
    /// An ordinary write of one row; its id must be on every node at the end.
    Ordinary(String),
    /// A hostile transaction; must be refused, and none of `markers` may exist afterwards.
    HostileWrite {
        what: &'static str,
        statements: Vec<Statement>,
        markers: Vec<String>,
    },
    /// A hostile query; must be refused.
    HostileQuery { what: &'static str, sql: String },
}

fn marker_insert(id: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state) VALUES (?1, 'marker', 'started')",
        vec![Value::Text(id.to_owned())],
    )
}

/// Spellings of the store's own table names a client might try.
const INTERNAL_SPELLINGS: &[&str] = &[
    "__strata_sites",
    "\"__strata_sites\"",
    "[__STRATA_SITES]",
    "`__Strata_Sites`",
    "main.__strata_sites",
    "main.\"__strata_meta\"",
    "__strata_clock_1",
    "__strata_parked",
];

/// Draws one request. `n` makes ids unique; `other_db` is another node's database file.
fn draw(rng: &mut StdRng, n: usize, other_db: &str) -> Request {
    let marker = format!("hostile-{n}");
    if rng.random_range(0..100) < 40 {
        return Request::Ordinary(format!("ordinary-{n}"));
    }
    let write = |what, statements, markers| Request::HostileWrite {
        what,
        statements,
        markers,
    };
    match rng.random_range(0..16) {
        0 => {
            let table = INTERNAL_SPELLINGS[rng.random_range(0..INTERNAL_SPELLINGS.len())];
            write(
                "write to an internal table",
                vec![
                    marker_insert(&marker),
                    Statement::new(format!("UPDATE {table} SET rowid = rowid")),
                ],
                vec![marker],
            )
        }
        1 => write(
            "the store's own head update, word for word",
            vec![
                marker_insert(&marker),
                Statement::with_params(
                    "UPDATE __strata_sites SET head = ?2, hlc = ?3 WHERE ord = ?1",
                    vec![
                        Value::Integer(1),
                        Value::Integer(1 << 40),
                        Value::Integer(0),
                    ],
                ),
            ],
            vec![marker],
        ),
        2 => {
            let control = [
                "ROLLBACK",
                "COMMIT",
                "END",
                "BEGIN",
                "BEGIN IMMEDIATE",
                "ROLLBACK TRANSACTION",
            ][rng.random_range(0..6)];
            let second = format!("{marker}-b");
            write(
                "transaction control inside a request",
                vec![
                    marker_insert(&marker),
                    Statement::new(control),
                    marker_insert(&second),
                ],
                vec![marker, second],
            )
        }
        3 => {
            let savepoint = [
                "SAVEPOINT s",
                "RELEASE s",
                "ROLLBACK TO s",
                "RELEASE SAVEPOINT s",
            ][rng.random_range(0..4)];
            write(
                "a savepoint inside a request",
                vec![marker_insert(&marker), Statement::new(savepoint)],
                vec![marker],
            )
        }
        4 => write(
            "a transaction that never ends",
            vec![
                marker_insert(&marker),
                Statement::new(
                    "INSERT INTO machines (id, app) SELECT 'endless-' || i, 'marker' FROM \
                     (WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) \
                      SELECT i FROM r WHERE i < 0 LIMIT 1)",
                ),
            ],
            vec![marker],
        ),
        5 => {
            let size = [2_000_000, 30_000_000, 200_000_000][rng.random_range(0..3)];
            write(
                "a value built on the server past the cell limit",
                vec![Statement::with_params(
                    format!(
                        "INSERT INTO machines (id, app, image) VALUES (?1, 'marker', printf('%.*c', {size}, 'x'))"
                    ),
                    vec![Value::Text(marker.clone())],
                )],
                vec![marker],
            )
        }
        6 => {
            let builder = [
                "zeroblob(3000000)",
                "randomblob(3000000)",
                "hex(randomblob(1500000))",
            ][rng.random_range(0..3)];
            write(
                "a large blob or text function",
                vec![Statement::with_params(
                    format!(
                        "INSERT INTO machines (id, app, image) VALUES (?1, 'marker', {builder})"
                    ),
                    vec![Value::Text(marker.clone())],
                )],
                vec![marker],
            )
        }
        7 => write(
            "text that is not UTF-8",
            vec![Statement::with_params(
                "INSERT INTO machines (id, app, host) VALUES (?1, 'marker', CAST(x'fffe80' AS TEXT))",
                vec![Value::Text(marker.clone())],
            )],
            vec![marker],
        ),
        8 => write(
            "a huge parameter",
            vec![Statement::with_params(
                "INSERT INTO machines (id, app, image) VALUES (?1, 'marker', ?2)",
                vec![
                    Value::Text(marker.clone()),
                    Value::Text("y".repeat(3 << 20)),
                ],
            )],
            vec![marker],
        ),
        9 => write(
            "a schema change through a transaction",
            vec![
                marker_insert(&marker),
                Statement::new(
                    [
                        "DROP TABLE machines",
                        "ALTER TABLE machines ADD COLUMN x",
                        "CREATE TEMP TABLE t (x)",
                        "CREATE TRIGGER t AFTER INSERT ON machines BEGIN SELECT 1; END",
                    ][rng.random_range(0..4)],
                ),
            ],
            vec![marker],
        ),
        10 => write(
            "ATTACH inside a transaction",
            vec![
                marker_insert(&marker),
                Statement::new(format!("ATTACH '{other_db}' AS other")),
            ],
            vec![marker],
        ),
        11 => Request::HostileQuery {
            what: "a query that never ends",
            sql: "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) \
                  SELECT count(*) FROM r"
                .into(),
        },
        12 => Request::HostileQuery {
            what: "a pragma that changes state",
            sql: [
                "PRAGMA hard_heap_limit = 100000",
                "PRAGMA soft_heap_limit = 1",
                "PRAGMA query_only = 0",
                "PRAGMA writable_schema = 1",
                "PRAGMA journal_mode = DELETE",
                "PRAGMA cache_size = 1000000000",
                "PRAGMA temp_store_directory = '/tmp'",
                "pRaGmA main.query_only = false",
            ][rng.random_range(0..8)]
            .into(),
        },
        13 => Request::HostileQuery {
            what: "ATTACH through a query",
            sql: format!("ATTACH DATABASE '{other_db}' AS other"),
        },
        14 => Request::HostileQuery {
            what: "a query building a huge value",
            sql: "SELECT printf('%.*c', 900000000, 'x')".into(),
        },
        _ => Request::HostileQuery {
            what: "a read of the store's own tables",
            sql: format!(
                "SELECT * FROM {}",
                INTERNAL_SPELLINGS[rng.random_range(0..INTERNAL_SPELLINGS.len())]
            ),
        },
    }
}

/// Codes that name what was wrong with a request; anything else is a failure of the node.
const PRECISE: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::ResourceExhausted,
    Code::DeadlineExceeded,
    Code::PermissionDenied,
    Code::OutOfRange,
];

fn code(err: &ClientError) -> Option<Code> {
    match err {
        ClientError::Status(status) => Some(status.code()),
        _ => None,
    }
}

/// Short bounds so that endless statements cost the test little time.
fn tune(config: &mut NodeConfig) {
    config.api.transact_timeout_ms = 300;
    config.api.query_timeout_ms = 300;
}

async fn ordinary_write(client: &Client, id: &str) -> Result<(), ClientError> {
    client.transact(vec![marker_insert(id)]).await.map(|_| ())
}

/// Every node answers `Health` and an ordinary write within a second.
async fn check_serving(clients: &[Client], probe: &str, seed: u64, after: &str) -> Vec<String> {
    let mut written = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let id = format!("{probe}-{index}");
        let answered = tokio::time::timeout(Duration::from_secs(1), async {
            client.health().await?;
            ordinary_write(client, &id).await
        })
        .await;
        match answered {
            Ok(Ok(())) => written.push(id),
            Ok(Err(err)) => panic!("seed {seed}: node {index} failed a probe after {after}: {err}"),
            Err(_) => panic!("seed {seed}: node {index} did not answer within 1 s after {after}"),
        }
    }
    written
}

async fn run(requests: usize) {
    let seed = std::env::var("STRATA_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("hostile seed: {seed} (replay with STRATA_HOSTILE_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = TestCluster::start_with(3, "ams", strata_regional::spec(), tune).await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let mut clients = Vec::new();
    for index in 0..3 {
        clients.push(cluster.client(index).await);
    }
    let other_db = cluster.store(1).path().display().to_string();
    let mut acknowledged = Vec::new();
    let mut refused_markers = Vec::new();
    let started = Instant::now();
    for n in 0..requests {
        let request = draw(&mut rng, n, &other_db);
        let client = &clients[rng.random_range(0..clients.len())];
        match &request {
            Request::Ordinary(id) => match ordinary_write(client, id).await {
                Ok(()) => acknowledged.push(id.clone()),
                Err(err) => panic!("seed {seed}: ordinary write {id} failed: {err}"),
            },
            Request::HostileWrite {
                what,
                statements,
                markers,
            } => {
                let answer = client.transact(statements.clone()).await;
                match answer {
                    Ok(written) => panic!(
                        "seed {seed}: hostile write ({what}) was accepted: {statements:?} -> {written:?}"
                    ),
                    Err(err) => assert!(
                        code(&err).is_some_and(|c| PRECISE.contains(&c)),
                        "seed {seed}: hostile write ({what}) got an imprecise answer: {err}"
                    ),
                }
                refused_markers.extend(markers.iter().cloned());
            }
            Request::HostileQuery { what, sql } => {
                let answer = client.query(sql, vec![]).await;
                match answer {
                    Ok(rows) => panic!(
                        "seed {seed}: hostile query ({what}) was answered: {sql} -> {:?}",
                        rows.rows.first()
                    ),
                    Err(err) => assert!(
                        code(&err).is_some_and(|c| PRECISE.contains(&c)),
                        "seed {seed}: hostile query ({what}) got an imprecise answer: {err}"
                    ),
                }
            }
        }
        if !matches!(request, Request::Ordinary(_)) {
            let after = format!("request {n} ({request:?})");
            let probe = format!("probe-{n}");
            acknowledged.extend(check_serving(&clients, &probe, seed, &after).await);
        }
    }
    eprintln!(
        "{requests} requests in {:.1} s; {} acknowledged writes",
        started.elapsed().as_secs_f64(),
        acknowledged.len()
    );

    cluster.wait_converged(Duration::from_secs(30)).await;
    for (index, client) in clients.iter().enumerate() {
        let rows = client
            .query("SELECT id FROM machines", vec![])
            .await
            .unwrap();
        let held: std::collections::HashSet<String> = rows
            .rows
            .into_iter()
            .filter_map(|r| match r.into_iter().next() {
                Some(Value::Text(id)) => Some(id),
                _ => None,
            })
            .collect();
        let missing: Vec<_> = acknowledged
            .iter()
            .filter(|id| !held.contains(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "seed {seed}: node {index} lacks acknowledged writes {missing:?}"
        );
        let leaked: Vec<_> = held
            .iter()
            .filter(|id| id.starts_with("hostile-") || id.starts_with("endless-"))
            .collect();
        assert!(
            leaked.is_empty(),
            "seed {seed}: node {index} holds rows of refused requests {leaked:?}; refused markers \
             were {} in all",
            refused_markers.len()
        );
    }
    // Nobody's bookkeeping was raised or lowered behind the store's back.
    wait_for(
        Duration::from_secs(10),
        "bookkeeping to agree with every site's head",
        || async {
            for i in 0..3 {
                for j in 0..3 {
                    if i == j {
                        continue;
                    }
                    let origin = cluster.store(j);
                    let seen = cluster
                        .store(i)
                        .site_state(origin.site())
                        .map_or(0, |s| s.head);
                    if seen != origin.head() {
                        return Err(format!(
                            "node {i} records head {seen} for node {j}, whose own head is {}",
                            origin.head()
                        ));
                    }
                }
            }
            Ok(())
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_breaks_nothing_short_run() {
    run(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long run: cargo test --test hostile -- --ignored"]
async fn a_hostile_client_breaks_nothing_long_run() {
    run(1500).await;
}
