//! `hostile`: the ordinary write load of a 3-node region, first alone, then while one hostile
//! client sends queries that never end and writes with values too large to replicate.
//!
//! The ordinary load is `clients` concurrent callers writing 1-row transactions, spread over the
//! nodes. The hostile client is one gRPC connection to node 0 that keeps `queries` endless
//! recursive queries running (as many as the node has readers, so every reader would be taken if
//! nothing bounded them) and a loop of inserts whose value the server builds past the cell limit.
//! It sets no deadline of its own: the node's configured maxima are all that bound its work.
//!
//! Reported: the ordinary load's transactions per second and p99 latency in both phases (goal:
//! hostile at least 80 % of quiet throughput, p99 at most twice), the hostile requests sent and how
//! they were answered, and that every node converged to the same rows afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use strata_client::{Client, ClientError};
use strata_common::store::{Statement, Value};

use super::cluster::{cluster, percentile, round2};
use super::{progress, result};

/// A query that never ends on its own: counting an infinite recursive sequence.
pub const ENDLESS_QUERY: &str =
    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r";

/// An insert whose `image` value the server builds at 30 MB, past any cell limit.
pub const OVERSIZED_INSERT: &str = "INSERT INTO machines (id, app, state, image) \
     VALUES (?1, 'hostile', 'started', printf('%.*c', 30000000, 'x'))";

/// How long hostile requests still in flight at the end may take to answer before they are
/// abandoned and reported as unanswered.
const ATTACK_GRACE: Duration = Duration::from_secs(10);

/// One phase of the ordinary load.
struct Phase {
    transactions: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
}

impl Phase {
    fn tx_s(&self) -> f64 {
        (self.transactions as f64 / self.seconds.max(1e-9)).round()
    }

    fn p99_ms(&self) -> f64 {
        round2(percentile(&self.latencies_ms, 99.0))
    }
}

/// `hostile --clients C --seconds S`.
pub async fn hostile(clients_n: usize, seconds: u64, queries: usize) -> anyhow::Result<()> {
    progress(format!(
        "hostile: 3 nodes, {clients_n} ordinary clients, {seconds} s per phase, \
         {queries} endless queries at a time from the hostile client"
    ));
    let (cluster, clients) = cluster(3, "").await?;
    let clients = Arc::new(clients);

    let quiet = load(&clients, clients_n, seconds, "quiet").await?;
    progress(format!(
        "  quiet:   {:.0} tx/s, p99 {:.2} ms",
        quiet.tx_s(),
        quiet.p99_ms()
    ));

    let stop = Arc::new(AtomicBool::new(false));
    // Its own connection, as a separate client would have.
    let hostile_client = cluster.client(0).await;
    let attacker = tokio::spawn(attack(hostile_client, queries, Arc::clone(&stop)));
    // Let the hostile requests take hold before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = load(&clients, clients_n, seconds, "hostile").await?;
    stop.store(true, Ordering::Relaxed);
    let answers = attacker.await??;
    progress(format!(
        "  hostile: {:.0} tx/s, p99 {:.2} ms",
        loaded.tx_s(),
        loaded.p99_ms()
    ));
    progress(format!("  hostile requests answered: {answers:?}"));

    let expected = (quiet.transactions + loaded.transactions) as i64;
    let converged = converge(&clients, expected).await?;
    progress(format!(
        "  every node held all {expected} ordinary rows {converged:.2} s after the end; \
         no hostile row anywhere"
    ));
    drop(cluster);
    result(json!({
        "nodes": 3,
        "clients": clients_n,
        "tx_s_quiet": quiet.tx_s(),
        "tx_s_hostile": loaded.tx_s(),
        "p99_ms_quiet": quiet.p99_ms(),
        "p99_ms_hostile": loaded.p99_ms(),
        "throughput_ratio": round2(loaded.tx_s() / quiet.tx_s().max(1.0)),
        "p99_ratio": round2(loaded.p99_ms() / quiet.p99_ms().max(1e-3)),
        "hostile_answers": answers,
        "converge_s": round2(converged),
    }));
    Ok(())
}

/// Runs the ordinary 1-row write load for `seconds` and records each transaction's latency.
async fn load(
    clients: &Arc<Vec<Client>>,
    clients_n: usize,
    seconds: u64,
    phase: &'static str,
) -> anyhow::Result<Phase> {
    let stop = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients_n)
        .map(|c| {
            let clients = Arc::clone(clients);
            tokio::spawn(async move {
                let client = &clients[c % clients.len()];
                let mut latencies = Vec::new();
                while Instant::now() < stop {
                    let id = format!("{phase}-{c}-{}", latencies.len());
                    let statement = Statement::with_params(
                        "INSERT INTO machines (id, app, state, port) VALUES (?1, 'ordinary', 'started', 8080)",
                        vec![Value::Text(id)],
                    );
                    let sent = Instant::now();
                    client.transact(vec![statement]).await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for task in tasks {
        latencies_ms.extend(task.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Phase {
        transactions: latencies_ms.len(),
        seconds,
        latencies_ms,
    })
}

/// Keeps `queries` endless queries and one oversized-insert loop running against `client` until
/// `stop`; returns how many answers of each gRPC code each kind of request got.
async fn attack(
    client: Client,
    queries: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut tasks = Vec::new();
    for _ in 0..queries {
        let client = client.clone();
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let answer = client.query(ENDLESS_QUERY, vec![]).await;
                answers.push(format!("query {}", code_of(answer.map(|_| ()))));
            }
            answers
        }));
    }
    let stop_writes = Arc::clone(&stop);
    tasks.push(tokio::spawn(async move {
        let mut answers = Vec::new();
        while !stop_writes.load(Ordering::Relaxed) {
            let statement = Statement::with_params(
                OVERSIZED_INSERT,
                vec![Value::Text(format!("hostile-{}", answers.len()))],
            );
            let answer = client.transact(vec![statement]).await;
            answers.push(format!("oversized insert {}", code_of(answer.map(|_| ()))));
        }
        answers
    }));
    // Wait for stop, then give the requests in flight a bounded grace: on a node without time
    // bounds an endless query never answers, and that is an outcome to report, not to wait for.
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grace = Instant::now() + ATTACK_GRACE;
    let mut counts = BTreeMap::new();
    for mut task in tasks {
        let left = grace.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, &mut task).await {
            Ok(answers) => {
                for answer in answers? {
                    *counts.entry(answer).or_insert(0) += 1;
                }
            }
            Err(_) => {
                task.abort();
                *counts
                    .entry(format!(
                        "unanswered {} s after the end",
                        ATTACK_GRACE.as_secs()
                    ))
                    .or_insert(0) += 1;
            }
        }
    }
    Ok(counts)
}

fn code_of(answer: Result<(), ClientError>) -> String {
    match answer {
        Ok(()) => "OK".into(),
        Err(ClientError::Status(status)) => format!("{:?}", status.code()),
        Err(other) => format!("error: {other}"),
    }
}

/// Waits until every node holds exactly `expected` ordinary rows and no hostile row; returns the
/// seconds it took.
async fn converge(clients: &[Client], expected: i64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let mut seen = Vec::new();
        for client in clients {
            let rows = client
                .query(
                    "SELECT (SELECT count(*) FROM machines WHERE app = 'ordinary'), \
                            (SELECT count(*) FROM machines WHERE app = 'hostile')",
                    vec![],
                )
                .await?;
            seen.push(rows.rows[0].clone());
        }
        if seen
            .iter()
            .all(|row| row == &vec![Value::Integer(expected), Value::Integer(0)])
        {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not converged: (ordinary, hostile) rows per node {seen:?}, expected ({expected}, 0)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
