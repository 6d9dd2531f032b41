//! A history checker of our own (Jepsen-style, our code): runs a cluster of `regiond` processes
//! under a seeded mixed workload ([`workload`]), records every request and its answer
//! ([`record`]), injects seeded faults ([`faults`]: kill -9 and restart, restart with a wiped
//! disk, partitions in network namespaces of its own ([`netns`]) when the machine allows), heals
//! everything, waits for convergence, and checks the history ([`check`]).
//!
//! This file owns the run: cluster set-up, the workload's clients and the fault driver, the wait
//! for convergence and check 2 (every node ends identical: the full tables through the API, then
//! each node's `Store::dump` of data and metadata, read from its database after a clean stop).

pub mod check;
pub mod faults;
pub mod netns;
pub mod record;
pub mod workload;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use strata_client::Client;
use strata_common::store::{Store, StoreOptions, Value};
use tokio_util::sync::CancellationToken;

use self::check::{HotRows, Input, UniqRows, Violation};
use self::netns::Netns;
use self::record::{HotRow, Recorder};
use self::workload::ClientSpec;
use crate::procs::{ProcCluster, ProcOptions};

/// The environment variable that fixes the seed of a run.
pub const SEED_VAR: &str = "STRATA_HISTORY_SEED";

/// Set to `off` to run without partitions (on loopback) even where namespaces are available.
pub const PARTITIONS_VAR: &str = "STRATA_HISTORY_PARTITIONS";

/// How long the cluster may take to form before the workload, and to converge after healing.
/// Generous: the daemons are debug builds on a shared two-core machine.
pub const SETTLE_BUDGET: Duration = Duration::from_secs(90);

/// A run's shape.
#[derive(Debug, Clone)]
pub struct HistoryOptions {
    /// Nodes.
    pub nodes: usize,
    /// Clients per node.
    pub clients_per_node: usize,
    /// Pause between a client's operations.
    pub pace: Duration,
    /// How long the workload runs.
    pub workload: Duration,
    /// Faults to inject.
    pub faults: usize,
    /// The seed of the workload and the fault schedule.
    pub seed: u64,
}

/// The seed from [`SEED_VAR`], or a fresh one.
pub fn seed() -> u64 {
    if let Ok(text) = std::env::var(SEED_VAR) {
        return text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_VAR}={text:?} is not a u64: {e}"));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// What a run found.
#[derive(Debug)]
pub struct Outcome {
    /// Every violation, of every check.
    pub violations: Vec<Violation>,
    /// The counts the checker saw.
    pub summary: check::Summary,
    /// Whether partitions were injected (namespaces available).
    pub partitions: bool,
    /// Faults injected, as recorded.
    pub faults: Vec<record::FaultEvent>,
    /// Seconds from the end of the workload (every fault healed) to convergence.
    pub converged_after_s: f64,
    /// Where the full history was written, when a check failed.
    pub history_file: Option<std::path::PathBuf>,
}

/// Runs the workload with faults on a fresh cluster and checks its history. Panics only when
/// the harness itself cannot run (no binary, a cluster that never forms or converges); the
/// checks' findings are returned.
pub async fn run(options: &HistoryOptions) -> Outcome {
    let seed = options.seed;
    eprintln!("history: seed {seed} (rerun with {SEED_VAR}={seed}); {options:?}",);
    let wanted = std::env::var(PARTITIONS_VAR).map_or(true, |v| v.trim() != "off");
    let made = if wanted {
        Netns::create(options.nodes)
    } else {
        Err(format!("{PARTITIONS_VAR}=off"))
    };
    let net = match made {
        Ok(net) => Some(Arc::new(net)),
        Err(why) => {
            eprintln!(
                "history: NO PARTITIONS in this run ({why}): kills and wipes only, on loopback"
            );
            None
        }
    };
    let schema_dir = tempfile::tempdir().expect("a temporary directory");
    let region_schema = schema_dir.path().join("region.sql");
    let history_schema = schema_dir.path().join("history.sql");
    std::fs::write(&region_schema, strata_regional::DEFAULT_SCHEMA).expect("schema written");
    std::fs::write(&history_schema, workload::SCHEMA).expect("schema written");
    let mut proc_options = ProcOptions::region("hist");
    proc_options.extra_toml = format!(
        "[store]\nschema = [\"{}\", \"{}\"]\n",
        region_schema.display(),
        history_schema.display()
    );
    if let Some(net) = &net {
        proc_options.netns = net.hosts();
    }
    let nodes = options.nodes;
    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = ProcCluster::start(nodes, proc_options);
        cluster.bootstrap_from_all();
        cluster
    })
    .await
    .expect("the cluster starts");
    wait_formed(&cluster, nodes).await;

    let recorder = Arc::new(Recorder::new());
    let epochs: Arc<Vec<AtomicUsize>> = Arc::new((0..nodes).map(|_| AtomicUsize::new(0)).collect());
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for node in 0..nodes {
        for k in 0..options.clients_per_node {
            let id = node * options.clients_per_node + k;
            let spec = ClientSpec {
                id,
                node,
                endpoint: format!("http://{}", cluster.nodes[node].api),
                seed: seed
                    .wrapping_add(id as u64 + 1)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15),
                pace: options.pace,
            };
            clients.push(tokio::spawn(workload::run_client(
                spec,
                recorder.clone(),
                epochs.clone(),
                stop.clone(),
            )));
        }
    }
    let steps = faults::schedule(seed, nodes, options.workload, options.faults, net.is_some());
    let workload_end = options.workload;
    let driver = {
        let recorder = recorder.clone();
        let epochs = epochs.clone();
        let net = net.clone();
        tokio::task::spawn_blocking(move || {
            faults::drive(
                &mut cluster,
                net.as_deref(),
                &steps,
                &recorder,
                &epochs,
                workload_end,
            );
            cluster
        })
    };
    // The workload's length is the run's shape, not a wait for a condition.
    tokio::time::sleep(options.workload).await;
    stop.cancel();
    for client in clients {
        client.await.expect("a workload client panicked");
    }
    let mut cluster = driver.await.expect("the fault driver panicked");
    // Every fault is healed here: the driver heals each before the next, and finishes its last.
    let healed_at = Instant::now();
    if let Some(net) = &net {
        net.heal().expect("the partition heals");
    }
    let final_epochs: Vec<usize> = epochs
        .iter()
        .map(|e| e.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    let (uniq, hot) = wait_converged(&cluster, nodes).await;
    let converged_after_s = healed_at.elapsed().as_secs_f64();
    eprintln!(
        "history: converged {converged_after_s:.2} s after the workload stopped (all faults \
         healed): identical hist_uniq and hist_hot on every node, no gaps, partials or parked"
    );

    // Check 2, metadata included: each node's dump, from its database after a clean stop.
    let mut violations = Vec::new();
    let cluster = tokio::task::spawn_blocking(move || {
        for index in 0..nodes {
            cluster.stop(index);
        }
        cluster
    })
    .await
    .expect("the nodes stop");
    let dumps: Vec<String> = (0..nodes)
        .map(|index| {
            let store = Store::open(&cluster.nodes[index].db, StoreOptions::default())
                .unwrap_or_else(|e| panic!("node {index}'s database opens: {e}"));
            store
                .dump()
                .unwrap_or_else(|e| panic!("node {index}'s dump: {e}"))
        })
        .collect();
    eprintln!(
        "history: comparing each node's Store::dump (rows, row lives, cell clocks, parked \
         changes): {} bytes on node 0",
        dumps[0].len()
    );
    for index in 1..nodes {
        if let Some(diff) = first_difference(&dumps[0], &dumps[index]) {
            violations.push(Violation {
                check: 2,
                key: String::new(),
                detail: format!("node {index}'s dump differs from node 0's: {diff}"),
            });
        }
    }

    let ops = recorder.ops();
    let (found, summary) = check::check(&Input {
        ops: &ops,
        final_epochs: &final_epochs,
        uniq: &uniq,
        hot: &hot,
    });
    violations.extend(found);
    eprintln!(
        "history: seed {seed}: {} operations ({} acknowledged, {} refused, {} unknown, {} reads \
         answered), {} faults, partitions {}; {} acknowledged writes on later-wiped disks, {} \
         of them survived; {} unique rows and {} hot rows at the end; {} writes compared in \
         real time",
        ops.len(),
        summary.acked,
        summary.failed,
        summary.unknown,
        summary.reads,
        recorder.faults().len(),
        if net.is_some() {
            "on"
        } else {
            "off (no namespaces)"
        },
        summary.wiped_acked,
        summary.wiped_survived,
        uniq.len(),
        hot.len(),
        summary.order_compared,
    );
    for v in &violations {
        eprintln!(
            "history: VIOLATION of check {} (seed {seed}) key {:?}: {}",
            v.check, v.key, v.detail
        );
    }
    let history_file = if violations.is_empty() {
        None
    } else {
        let path = std::env::temp_dir().join(format!("strata-history-{seed}.txt"));
        let mut text = String::new();
        for fault in recorder.faults() {
            text.push_str(&format!("{fault:?}\n"));
        }
        for op in &ops {
            text.push_str(&format!("{op}\n"));
        }
        match std::fs::write(&path, text) {
            Ok(()) => {
                eprintln!("history: the full history is in {}", path.display());
                Some(path)
            }
            Err(e) => {
                eprintln!("history: could not write {}: {e}", path.display());
                None
            }
        }
    };
    let partitions = net.is_some();
    // The processes go before their namespaces.
    drop(cluster);
    drop(net);
    Outcome {
        violations,
        summary,
        partitions,
        faults: recorder.faults(),
        converged_after_s,
        history_file,
    }
}

/// Waits until every node counts every other node as a member.
async fn wait_formed(cluster: &ProcCluster, nodes: usize) {
    let clients = clients(cluster).await;
    crate::cluster::wait_for(SETTLE_BUDGET, "the cluster to form", || async {
        let mut seen = Vec::new();
        for (index, client) in clients.iter().enumerate() {
            match client.health().await {
                Ok(h) if h.members as usize == nodes - 1 => {}
                Ok(h) => seen.push(format!("node {index} sees {} members", h.members)),
                Err(e) => seen.push(format!("node {index}: {e}")),
            }
        }
        if seen.is_empty() {
            Ok(())
        } else {
            Err(seen.join("; "))
        }
    })
    .await;
}

async fn clients(cluster: &ProcCluster) -> Vec<Client> {
    cluster
        .nodes
        .iter()
        .map(|d| Client::lazy(&format!("http://{}", d.api), None).expect("a client"))
        .collect()
}

/// Waits until every node has no gaps, partials or parked changes and returns the same full
/// tables; returns those tables.
async fn wait_converged(cluster: &ProcCluster, nodes: usize) -> (UniqRows, HotRows) {
    let clients = clients(cluster).await;
    // Set by the check that passes; the lock is never held across an await.
    let last = std::sync::Mutex::new(None);
    crate::cluster::wait_for(SETTLE_BUDGET, "every node to converge", || {
        let clients = &clients;
        let last = &last;
        async move {
            let mut states = Vec::new();
            for (index, client) in clients.iter().enumerate() {
                let health = client
                    .health()
                    .await
                    .map_err(|e| format!("node {index}: {e}"))?;
                if health.gaps + health.partials + health.parked > 0
                    || health.members as usize != nodes - 1
                {
                    return Err(format!(
                        "node {index}: {} members, {} gaps, {} partials, {} parked",
                        health.members, health.gaps, health.partials, health.parked
                    ));
                }
                states.push(
                    read_tables(client)
                        .await
                        .map_err(|e| format!("node {index}: {e}"))?,
                );
            }
            for (index, state) in states.iter().enumerate().skip(1) {
                if *state != states[0] {
                    return Err(format!(
                        "node {index} holds {} unique and {} hot rows, node 0 {} and {}",
                        state.0.len(),
                        state.1.len(),
                        states[0].0.len(),
                        states[0].1.len()
                    ));
                }
            }
            *last.lock().unwrap_or_else(|e| e.into_inner()) = states.into_iter().next();
            Ok(())
        }
    })
    .await;
    last.into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .expect("converged tables")
}

/// The full tables of one node, through the API.
async fn read_tables(client: &Client) -> Result<(UniqRows, HotRows), String> {
    let text = |v: Option<&Value>| match v {
        Some(Value::Text(s)) => Some(s.clone()),
        Some(Value::Null) | None => None,
        Some(other) => Some(format!("<unexpected {other:?}>")),
    };
    let uniq = client
        .query("SELECT id, writer, val FROM hist_uniq ORDER BY id", vec![])
        .await
        .map_err(|e| e.to_string())?;
    let hot = client
        .query("SELECT k, a, b FROM hist_hot ORDER BY k", vec![])
        .await
        .map_err(|e| e.to_string())?;
    let uniq: UniqRows = uniq
        .rows
        .iter()
        .map(|r| {
            (
                text(r.first()).unwrap_or_default(),
                (text(r.get(1)), text(r.get(2))),
            )
        })
        .collect();
    let hot: HotRows = hot
        .rows
        .iter()
        .map(|r| {
            (
                text(r.first()).unwrap_or_default(),
                HotRow {
                    a: text(r.get(1)),
                    b: text(r.get(2)),
                },
            )
        })
        .collect();
    Ok((uniq, hot))
}

/// The first line where two dumps differ, with both lines; `None` when identical.
fn first_difference(a: &str, b: &str) -> Option<String> {
    if a == b {
        return None;
    }
    let mut left = a.lines();
    let mut right = b.lines();
    for line in 1.. {
        match (left.next(), right.next()) {
            (None, None) => return Some("in line endings".into()),
            (l, r) if l != r => {
                return Some(format!("line {line}: node 0 {l:?}, this node {r:?}"));
            }
            _ => {}
        }
    }
    None
}
