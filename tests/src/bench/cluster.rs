//! Cluster benchmarks on real `regiond` processes on loopback: propagation, redundancy,
//! throughput, catch-up, failure detection and memory.
//!
//! Every latency is measured by the benchmark process itself on one monotonic clock: from just
//! before a write's gRPC call to the arrival of the change on each other node's subscription
//! stream, which is what an edge proxy following a region would see.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use strata_client::Client;
use strata_common::store::{Statement, Value};
use strata_proto::v1 as pb;
use tokio::sync::mpsc;

use super::{progress, result};
use crate::cluster::metric;
use crate::procs::{ProcCluster, ProcOptions};

/// Builds the daemons in release mode when the benchmark runs under `cargo run`, so one
/// command measures the current code.
pub fn build_daemons() -> anyhow::Result<()> {
    let Ok(cargo) = std::env::var("CARGO") else {
        return Ok(());
    };
    progress("building regiond and globald (release)");
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "strata-regional",
            "-p",
            "strata-global",
        ])
        .status()?;
    anyhow::ensure!(status.success(), "building the daemons failed");
    Ok(())
}

/// Starts a region cluster and waits until every node sees every other.
pub(crate) async fn cluster(
    nodes: usize,
    extra_toml: &str,
) -> anyhow::Result<(ProcCluster, Vec<Client>)> {
    let started = Instant::now();
    let mut options = ProcOptions::region("ams");
    options.extra_toml = extra_toml.to_owned();
    let cluster = tokio::task::spawn_blocking(move || ProcCluster::start(nodes, options)).await?;
    let mut clients = Vec::new();
    for index in 0..nodes {
        clients.push(cluster.client(index).await);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut seen = Vec::new();
        for client in &clients {
            seen.push(client.members().await?.len());
        }
        if seen.iter().all(|&n| n == nodes) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "membership did not form: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(format!(
        "  {nodes} nodes up and joined in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok((cluster, clients))
}

/// The `p`th percentile of sorted values (nearest rank).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Rounded to two decimals.
pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Follows `SELECT id FROM machines WHERE app = 'bench'` on every node; sends (node, id, time)
/// for every insert seen.
async fn follow(
    clients: &[Client],
    tx: mpsc::UnboundedSender<(usize, String, Instant)>,
) -> anyhow::Result<()> {
    for (index, client) in clients.iter().enumerate() {
        let request = pb::SubscribeRequest {
            statement: Some(pb::Statement {
                sql: "SELECT id FROM machines WHERE app = 'bench'".into(),
                params: vec![],
            }),
            key_columns: vec!["id".into()],
            from_change_id: None,
        };
        let mut stream = client.raw().subscribe(request).await?.into_inner();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                let at = Instant::now();
                if let Some(pb::subscribe_event::Event::Change(change)) = event.event
                    && change.kind == pb::ChangeKind::Insert as i32
                    && let Some(Some(pb::value::Kind::Text(id))) = change
                        .row
                        .and_then(|r| r.values.into_iter().next())
                        .map(|v| v.kind)
                    && tx.send((index, id, at)).is_err()
                {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// `propagation --nodes N`: a write on one node until visible on every other.
pub async fn propagation(nodes: usize, writes: usize) -> anyhow::Result<()> {
    progress(format!(
        "propagation: {nodes} nodes, {writes} writes, origins round-robin"
    ));
    let (cluster, clients) = cluster(nodes, "").await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Subscriptions on their own connections, as a proxy following a region would have.
    let mut followers = Vec::new();
    for index in 0..nodes {
        followers.push(cluster.client(index).await);
    }
    follow(&followers, tx).await?;
    let mut last_node_ms = Vec::with_capacity(writes);
    let mut each_ms = Vec::with_capacity(writes * (nodes - 1));
    // The first writes pay one-time costs (statements prepared, streams opened): not measured.
    const WARMUP: usize = 10;
    progress(format!("  {WARMUP} warm-up writes, not measured"));
    for i in 0..writes + WARMUP {
        let origin = i % nodes;
        let id = format!("w{i}");
        let start = Instant::now();
        clients[origin]
            .transact(vec![Statement::with_params(
                "INSERT INTO machines (id, app, state) VALUES (?1, 'bench', 'started')",
                vec![Value::Text(id.clone())],
            )])
            .await?;
        let mut seen: HashMap<usize, Instant> = HashMap::new();
        let deadline = start + Duration::from_secs(10);
        while seen.len() < nodes - 1 {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((node, seen_id, at))) = tokio::time::timeout(remaining, rx.recv()).await
            else {
                anyhow::bail!(
                    "write {i} not visible everywhere within 10 s: seen on {:?}",
                    seen.keys()
                );
            };
            if seen_id == id && node != origin {
                seen.insert(node, at);
            }
        }
        let delays: Vec<f64> = seen
            .values()
            .map(|at| at.duration_since(start).as_secs_f64() * 1000.0)
            .collect();
        if i < WARMUP {
            continue;
        }
        each_ms.extend(&delays);
        last_node_ms.push(delays.iter().copied().fold(0.0, f64::max));
        if (i + 1 - WARMUP).is_multiple_of(50) {
            progress(format!("  {} writes", i + 1 - WARMUP));
        }
        // Pace the writes (about 50 per second) so each is measured on a quiet cluster.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut slowest: Vec<(usize, f64)> = last_node_ms.iter().copied().enumerate().collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    progress(format!(
        "  slowest writes (index, ms): {:?}",
        slowest
            .iter()
            .take(5)
            .map(|(i, ms)| (*i, round2(*ms)))
            .collect::<Vec<_>>()
    ));
    last_node_ms.sort_by(f64::total_cmp);
    each_ms.sort_by(f64::total_cmp);
    progress(format!(
        "  per node: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&each_ms, 50.0),
        percentile(&each_ms, 99.0)
    ));
    progress(format!(
        "  last node: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&last_node_ms, 50.0),
        percentile(&last_node_ms, 99.0),
        last_node_ms.last().copied().unwrap_or(0.0)
    ));
    drop(cluster);
    result(json!({
        "nodes": nodes,
        "writes": writes,
        "p50_ms": round2(percentile(&last_node_ms, 50.0)),
        "p99_ms": round2(percentile(&last_node_ms, 99.0)),
        "max_ms": round2(last_node_ms.last().copied().unwrap_or(0.0)),
        "per_node_p50_ms": round2(percentile(&each_ms, 50.0)),
        "per_node_p99_ms": round2(percentile(&each_ms, 99.0)),
    }));
    Ok(())
}

/// A node's `/metrics` page.
pub(crate) async fn scrape(admin: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tcp.read_to_string(&mut body).await?;
    Ok(body)
}

/// `redundancy --nodes N`: payload copies and wire bytes each node receives per change.
pub async fn redundancy(nodes: usize, changes: usize) -> anyhow::Result<()> {
    progress(format!(
        "redundancy: {nodes} nodes, {changes} changes, direct push vs gossip"
    ));
    let mut figures = Vec::new();
    for (label, toml) in [
        ("direct", "[cluster.broadcast]\nstrategy = \"direct\"\n"),
        (
            "gossip fanout 3",
            "[cluster.broadcast]\nstrategy = \"gossip\"\nfanout = 3\n",
        ),
    ] {
        let (cluster, clients) = cluster(nodes, toml).await?;
        // Let sync settle, then measure over the writes only.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before: Vec<String> =
            futures::future::try_join_all(cluster.nodes.iter().map(|n| scrape(n.admin))).await?;
        let started = Instant::now();
        let payload = "x".repeat(100);
        for i in 0..changes {
            clients[i % nodes]
                .transact(vec![Statement::with_params(
                    "INSERT INTO machines (id, app, image) VALUES (?1, 'bench', ?2)",
                    vec![Value::Text(format!("r{i}")), Value::Text(payload.clone())],
                )])
                .await?;
        }
        // Until every node holds every change.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut counts = Vec::new();
            for client in &clients {
                let rows = client
                    .query("SELECT count(*) FROM machines", vec![])
                    .await?;
                counts.push(rows.rows[0][0].clone());
            }
            if counts.iter().all(|c| *c == Value::Integer(changes as i64)) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "not converged: {counts:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after: Vec<String> =
            futures::future::try_join_all(cluster.nodes.iter().map(|n| scrape(n.admin))).await?;
        let delta = |name: &str| -> f64 {
            before
                .iter()
                .zip(&after)
                .map(|(b, a)| metric(a, name) - metric(b, name))
                .sum()
        };
        let copies = delta("strata_changesets_received_total");
        let payload_bytes = delta("strata_changesets_received_bytes_total") / copies.max(1.0);
        let wire = delta("strata_transport_received_bytes_total");
        let per_node_change = (changes * (nodes - 1)) as f64;
        let copies_per = copies / per_node_change;
        let wire_ratio = wire / per_node_change / payload_bytes;
        progress(format!(
            "  {label}: {copies_per:.2} copies per node per change, {:.0} wire bytes per node per \
             change for a {payload_bytes:.0}-byte payload ({wire_ratio:.2}x), {elapsed:.1} s",
            wire / per_node_change
        ));
        figures.push((copies_per, wire_ratio));
        drop(cluster);
    }
    result(json!({
        "nodes": nodes,
        "changes": changes,
        "copies_per_node_per_change": round2(figures[0].0),
        "wire_bytes_ratio": round2(figures[0].1),
        "gossip_copies_per_node_per_change": round2(figures[1].0),
        "gossip_wire_bytes_ratio": round2(figures[1].1),
    }));
    Ok(())
}

/// `throughput --nodes N --clients C`: sustained transactions through gRPC.
pub async fn throughput(nodes: usize, clients_n: usize, seconds: u64) -> anyhow::Result<()> {
    progress(format!(
        "throughput: {nodes} nodes, {clients_n} concurrent clients, {seconds} s per phase"
    ));
    let (cluster, clients) = cluster(nodes, "").await?;
    let clients = Arc::new(clients);
    let mut figures = Vec::new();
    for (phase, rows_per_tx) in [("1-row", 1usize), ("100-row", 100usize)] {
        let stop = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients_n)
            .map(|c| {
                let clients = Arc::clone(&clients);
                tokio::spawn(async move {
                    let client = &clients[c % clients.len()];
                    let mut done = 0usize;
                    while Instant::now() < stop {
                        let statements = (0..rows_per_tx)
                            .map(|r| {
                                Statement::with_params(
                                    "INSERT INTO machines (id, app, state, port) VALUES (?1, 'tp', 'started', ?2)",
                                    vec![Value::Text(format!("{phase}-{c}-{done}-{r}")), Value::Integer(r as i64)],
                                )
                            })
                            .collect();
                        client.transact(statements).await?;
                        done += 1;
                    }
                    anyhow::Ok(done)
                })
            })
            .collect();
        let mut transactions = 0;
        for task in tasks {
            transactions += task.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let rows = transactions * rows_per_tx;
        // Until every node holds every row.
        let expected: i64 = figures
            .iter()
            .map(|(_, _, rows, _): &(f64, f64, usize, f64)| *rows as i64)
            .sum::<i64>()
            + rows as i64;
        let converge_start = Instant::now();
        let deadline = converge_start + Duration::from_secs(120);
        loop {
            let mut counts = Vec::new();
            for client in clients.iter() {
                let r = client
                    .query("SELECT count(*) FROM machines WHERE app = 'tp'", vec![])
                    .await?;
                counts.push(r.rows[0][0].clone());
            }
            if counts.iter().all(|c| *c == Value::Integer(expected)) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "not converged: {counts:?}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let converge = converge_start.elapsed().as_secs_f64();
        progress(format!(
            "  {phase}: {:.0} tx/s, {:.0} rows/s; every node held every row {converge:.3} s after the end",
            transactions as f64 / elapsed,
            rows as f64 / elapsed
        ));
        figures.push((
            transactions as f64 / elapsed,
            rows as f64 / elapsed,
            rows,
            converge,
        ));
    }
    drop(cluster);
    result(json!({
        "nodes": nodes,
        "clients": clients_n,
        "tx_s_1row": figures[0].0.round(),
        "rows_s_100row": figures[1].1.round(),
        "converge_s": round2(figures[0].3.max(figures[1].3)),
    }));
    Ok(())
}

/// `catchup --rows R`: seconds for a fresh node to hold every row of a 3-node region.
pub async fn catchup(rows: usize) -> anyhow::Result<()> {
    progress(format!(
        "catchup: a fresh node joins a 3-node region holding {rows} rows"
    ));
    let (mut cluster, clients) = cluster(3, "").await?;
    let load = Instant::now();
    for start in (0..rows).step_by(1000) {
        let statements = (start..(start + 1000).min(rows))
            .map(|i| {
                Statement::with_params(
                    "INSERT INTO machines (id, app, region, host, state, address, port, image, version, updated)
                     VALUES (?1, ?2, 'ams', ?3, 'started', ?4, 8080, 'registry/app:v1', 1, ?5)",
                    vec![
                        Value::Text(format!("machine-{i:07}")),
                        Value::Text(format!("app-{}", i % 500)),
                        Value::Text(format!("host-{}", i % 97)),
                        Value::Text(format!("fdaa::{i:x}")),
                        Value::Integer(i as i64),
                    ],
                )
            })
            .collect();
        clients[start / 1000 % 3].transact(statements).await?;
    }
    wait_count(&clients, rows, Duration::from_secs(300)).await?;
    progress(format!(
        "  loaded and replicated in {:.1} s",
        load.elapsed().as_secs_f64()
    ));
    let started = Instant::now();
    let fresh = tokio::task::block_in_place(|| cluster.add_node());
    let client = cluster.client(fresh).await;
    wait_count(
        std::slice::from_ref(&client),
        rows,
        Duration::from_secs(300),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    progress(format!(
        "  fresh node held every row {seconds:.2} s after it was started"
    ));
    let metrics = scrape(cluster.nodes[fresh].admin).await?;
    progress(format!(
        "  fresh node: {:.2} s applying, {} sync sessions, {:.1} MB received by sync, {:.0} changesets",
        metric(&metrics, "strata_apply_seconds_sum"),
        metric(&metrics, "strata_sync_sessions_total"),
        metric(&metrics, "strata_changesets_received_bytes_total") / 1e6,
        metric(&metrics, "strata_changesets_received_total"),
    ));
    drop(cluster);
    result(json!({ "rows": rows, "seconds": round2(seconds) }));
    Ok(())
}

async fn wait_count(clients: &[Client], rows: usize, budget: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + budget;
    loop {
        let mut counts = Vec::new();
        for client in clients {
            let r = client
                .query("SELECT count(*) FROM machines", vec![])
                .await?;
            counts.push(r.rows[0][0].clone());
        }
        if counts.iter().all(|c| *c == Value::Integer(rows as i64)) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every node holds {rows} rows: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `detect --nodes N`: seconds from kill -9 of one node until every other marks it down.
/// With `soak`, first runs that long with every core busy and counts false "down" verdicts.
pub async fn detect(nodes: usize, soak: u64) -> anyhow::Result<()> {
    progress(format!("detect: {nodes} nodes"));
    let (mut cluster, clients) = cluster(nodes, "").await?;
    let mut false_downs = 0;
    if soak > 0 {
        progress(format!(
            "  soak: {soak} s with every core busy, watching for false downs"
        ));
        let hog = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let hogs: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()))
            .map(|_| {
                let hog = Arc::clone(&hog);
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while hog.load(std::sync::atomic::Ordering::Relaxed) {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                    x
                })
            })
            .collect();
        let end = Instant::now() + Duration::from_secs(soak);
        let mut checks = 0;
        while Instant::now() < end {
            for client in &clients {
                let seen = client.members().await?.len();
                if seen < nodes {
                    false_downs += 1;
                }
            }
            checks += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        hog.store(false, std::sync::atomic::Ordering::Relaxed);
        for h in hogs {
            let _ = h.join();
        }
        progress(format!(
            "  soak: {false_downs} false downs in {checks} checks of {nodes} nodes"
        ));
    }
    let victim = nodes - 1;
    let victim_addr = cluster.nodes[victim].gossip.to_string();
    let killed = Instant::now();
    cluster.kill(victim);
    let mut marked: HashMap<usize, f64> = HashMap::new();
    let deadline = killed + Duration::from_secs(60);
    while marked.len() < nodes - 1 {
        for (index, client) in clients.iter().enumerate().take(nodes - 1) {
            if marked.contains_key(&index) {
                continue;
            }
            let members = client.members().await?;
            if !members.iter().any(|m| m.addr == victim_addr) {
                marked.insert(index, killed.elapsed().as_secs_f64());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every node marked the dead one down: {marked:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = marked.values().copied().fold(0.0, f64::max);
    let first = marked.values().copied().fold(f64::MAX, f64::min);
    progress(format!(
        "  first node marked it down after {first:.2} s, the last after {seconds:.2} s"
    ));
    drop(cluster);
    result(
        json!({ "nodes": nodes, "seconds": round2(seconds), "first_seconds": round2(first), "soak_s": soak, "false_downs": false_downs }),
    );
    Ok(())
}

fn rss_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `rss --nodes N`: resident memory per node, idle and after 100k rows.
pub async fn rss(nodes: usize, rows: usize) -> anyhow::Result<()> {
    progress(format!("rss: {nodes} nodes, idle then after {rows} rows"));
    let (cluster, clients) = cluster(nodes, "").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    let idle: Vec<f64> = pids.iter().map(|p| rss_mib(*p, "VmRSS:")).collect();
    progress(format!(
        "  idle RSS per node (MiB): {:?}",
        idle.iter().map(|m| round2(*m)).collect::<Vec<_>>()
    ));
    for start in (0..rows).step_by(1000) {
        let statements = (start..(start + 1000).min(rows))
            .map(|i| {
                Statement::with_params(
                    "INSERT INTO machines (id, app, host, state, address, port, image) VALUES (?1, ?2, ?3, 'started', ?4, 8080, 'registry/app:v1')",
                    vec![
                        Value::Text(format!("machine-{i:07}")),
                        Value::Text(format!("app-{}", i % 500)),
                        Value::Text(format!("host-{}", i % 97)),
                        Value::Text(format!("fdaa::{i:x}")),
                    ],
                )
            })
            .collect();
        clients[start / 1000 % nodes].transact(statements).await?;
    }
    wait_count(&clients, rows, Duration::from_secs(300)).await?;
    let peak: Vec<f64> = pids.iter().map(|p| rss_mib(*p, "VmHWM:")).collect();
    let now: Vec<f64> = pids.iter().map(|p| rss_mib(*p, "VmRSS:")).collect();
    progress(format!(
        "  peak RSS per node after {rows} rows (MiB): {:?}",
        peak.iter().map(|m| round2(*m)).collect::<Vec<_>>()
    ));
    progress(format!(
        "  RSS now (MiB): {:?}",
        now.iter().map(|m| round2(*m)).collect::<Vec<_>>()
    ));
    drop(cluster);
    result(json!({
        "nodes": nodes,
        "idle_mib": round2(idle.iter().copied().fold(0.0, f64::max)),
        "loaded_mib": round2(peak.iter().copied().fold(0.0, f64::max)),
    }));
    Ok(())
}
