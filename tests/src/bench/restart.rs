//! `strata-bench restart --nodes N`: how fast a node killed with SIGKILL and restarted on the
//! same address is back in step, under a light write load on every node.
//!
//! For each restart it measures, from the moment the new process is spawned: its first change
//! received by push (`strata_changesets_received_total{via="broadcast"}` above 0), full
//! membership (`strata_members` = N-1) and readiness (`/readyz` 200). After several kills of
//! different nodes it stops the load and measures the time from the last restart until every
//! node holds the same rows, all acknowledged writes among them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use strata_client::Client;
use strata_common::store::{Statement, Value};

use super::cluster::{cluster, percentile, round2};
use super::progress;
use crate::procs::{ProcCluster, admin_get, metric_value};

/// Pause between a kill and the restart: shorter than failure detection, so the peers still
/// hold connections to the dead process, which is the case the benchmark is about.
const DOWNTIME: Duration = Duration::from_millis(500);

/// Pause between two kill-restart rounds, so each round starts from a settled cluster.
const BETWEEN_KILLS: Duration = Duration::from_secs(2);

/// Longest wait for any one measured condition.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Pause between two writes of one node's load: about 3 writes/s per node.
const WRITE_EVERY: Duration = Duration::from_millis(330);

/// The seconds a restarted node took to reach each milestone.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    first_push_s: f64,
    members_s: f64,
    ready_s: f64,
}

/// `restart --nodes N --kills K`.
pub async fn restart(nodes: usize, kills: usize) -> anyhow::Result<()> {
    anyhow::ensure!(nodes >= 3, "restart needs at least 3 nodes");
    progress(format!(
        "restart: {nodes} nodes, light write load, kill -9 and restart on the same address"
    ));
    let (mut procs, clients) = cluster(nodes, "").await?;
    let clients = Arc::new(clients);
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for node in 0..nodes {
        writers.push(tokio::spawn(write_load(
            Arc::clone(&clients),
            node,
            Arc::clone(&acked),
            Arc::clone(&stop),
            Arc::clone(&failed),
        )));
    }
    tokio::time::sleep(BETWEEN_KILLS).await;

    // One kill, measured on its own.
    let victim = nodes - 1;
    progress(format!(
        "  kill -9 node {victim}, restart after {DOWNTIME:?}"
    ));
    let (p, first, _) = kill_and_restart(procs, victim).await?;
    procs = p;
    progress(format!(
        "  first push after {:.2} s, full membership after {:.2} s, ready after {:.2} s",
        first.first_push_s, first.members_s, first.ready_s
    ));

    // Then `kills` more, each of another node (never the bootstrap node, so every restart is the
    // same case), then convergence after the last.
    let mut rounds = vec![first];
    let mut last_restart = Instant::now();
    for k in 0..kills {
        tokio::time::sleep(BETWEEN_KILLS).await;
        let victim = 1 + k % (nodes - 1);
        let (p, recovery, spawned) = kill_and_restart(procs, victim).await?;
        procs = p;
        last_restart = spawned;
        progress(format!(
            "  kill {}/{kills} (node {victim}): first push {:.2} s, members {:.2} s, ready {:.2} s",
            k + 1,
            recovery.first_push_s,
            recovery.members_s,
            recovery.ready_s
        ));
        rounds.push(recovery);
    }
    // Stop writing once the last restarted node has recovered, so "converged" has a fixed
    // target; the time still counts from that node's start.
    stop.store(true, Ordering::Relaxed);
    for writer in writers.drain(..) {
        writer.await?;
    }
    let expected: BTreeSet<String> = acked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let converge_s = converge(&clients, &expected, last_restart).await?;
    progress(format!(
        "  {} writes acknowledged ({} failed while a node was down); every node identical {:.2} s after the last restart",
        expected.len(),
        failed.load(Ordering::Relaxed),
        converge_s
    ));
    drop(procs);

    let column = |f: fn(&Recovery) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values
    };
    let pushes = column(|r| r.first_push_s);
    let members = column(|r| r.members_s);
    let ready = column(|r| r.ready_s);
    super::result(json!({
        "nodes": nodes,
        "kills": kills + 1,
        "first_push_s": round2(first.first_push_s),
        "members_s": round2(first.members_s),
        "ready_s": round2(first.ready_s),
        "converge_after_kills_s": round2(converge_s),
        "first_push_s_p50_all": round2(percentile(&pushes, 50.0)),
        "first_push_s_max_all": round2(pushes.last().copied().unwrap_or(0.0)),
        "members_s_max_all": round2(members.last().copied().unwrap_or(0.0)),
        "ready_s_max_all": round2(ready.last().copied().unwrap_or(0.0)),
        "writes_acked": expected.len(),
        "downtime_ms": DOWNTIME.as_millis() as u64,
    }));
    Ok(())
}

/// A few unique inserts a second on `node` until `stop`; records what was acknowledged.
async fn write_load(
    clients: Arc<Vec<Client>>,
    node: usize,
    acked: Arc<std::sync::Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("rs-{node}-{i}");
        i += 1;
        let write = clients[node].transact(vec![insert(&id)]);
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(Ok(_)) => {
                acked
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id);
            }
            // The node is down (or restarting): its writes fail, which is expected.
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(WRITE_EVERY).await;
    }
}

/// The insert of row `id`.
fn insert(id: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state) VALUES (?1, 'restart', 'started')",
        vec![Value::Text(id.to_owned())],
    )
}

/// Kills `victim`, waits [`DOWNTIME`], restarts it on its address and data, and measures its
/// recovery from the moment the new process is spawned (also returned).
async fn kill_and_restart(
    procs: ProcCluster,
    victim: usize,
) -> anyhow::Result<(ProcCluster, Recovery, Instant)> {
    let (procs, spawned) = tokio::task::spawn_blocking(move || {
        let mut procs = procs;
        procs.kill(victim);
        std::thread::sleep(DOWNTIME);
        let spawned = Instant::now();
        procs.restart(victim);
        (procs, spawned)
    })
    .await?;
    let admin = procs.nodes[victim].admin;
    let members_want = (procs.nodes.len() - 1) as f64;
    let (mut first_push, mut members, mut ready) = (None, None, None);
    let mut last = String::new();
    while first_push.is_none() || members.is_none() || ready.is_none() {
        anyhow::ensure!(
            spawned.elapsed() < WAIT_MAX,
            "node {victim} not recovered within {WAIT_MAX:?} (push {first_push:?}, members {members:?}, ready {ready:?}); last: {last}\n{}",
            procs.log_tail(victim, 20)
        );
        let now = spawned.elapsed().as_secs_f64();
        if let Ok((_, page)) = admin_get(admin, "/metrics").await {
            let pushed = metric_value(&page, "strata_changesets_received_total{via=\"broadcast\"}")
                .unwrap_or(0.0);
            let seen = metric_value(&page, "strata_members").unwrap_or(0.0);
            if first_push.is_none() && pushed > 0.0 {
                first_push = Some(now);
            }
            if members.is_none() && seen >= members_want {
                members = Some(now);
            }
            last = format!("pushes received {pushed}, members {seen}");
        }
        if ready.is_none()
            && let Ok((200, _)) = admin_get(admin, "/readyz").await
        {
            ready = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovery = Recovery {
        first_push_s: first_push.unwrap_or_default(),
        members_s: members.unwrap_or_default(),
        ready_s: ready.unwrap_or_default(),
    };
    Ok((procs, recovery, spawned))
}

/// Seconds from `since` until every node returns the same rows and they include `expected`.
async fn converge(
    clients: &[Client],
    expected: &BTreeSet<String>,
    since: Instant,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let mut sets = Vec::new();
        for client in clients {
            let rows = client
                .query("SELECT id FROM machines WHERE app = 'restart'", vec![])
                .await;
            let ids: BTreeSet<String> = match rows {
                Ok(rows) => rows
                    .rows
                    .iter()
                    .filter_map(|row| match row.first() {
                        Some(Value::Text(id)) => Some(id.clone()),
                        _ => None,
                    })
                    .collect(),
                Err(_) => BTreeSet::new(),
            };
            sets.push(ids);
        }
        let identical = sets.windows(2).all(|w| w[0] == w[1]);
        if identical && sets.first().is_some_and(|s| s.is_superset(expected)) {
            return Ok(since.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nodes did not converge: row counts {:?}, {} acknowledged",
            sets.iter().map(BTreeSet::len).collect::<Vec<_>>(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
