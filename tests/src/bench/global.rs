//! `global --regions R --nodes-per-region N`: the two tiers as real processes on loopback.
//!
//! Three globald (API over mTLS) and R regions of N regiond publishing to them. It measures:
//! - from a Machine change in a region (just before its gRPC call) to the app's row changing on
//!   every globald (each followed by a subscription), over changes that alter a summary;
//! - bytes of publish requests globald receives per regional change, for changes that leave
//!   every summary alone (the common case: a republish, an address change) and for ones that
//!   alter one;
//! - route lookups of an edge router in the benchmark process: from its caches, and asking the
//!   global tier and the region directly (the baseline a cache must beat).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use strata_client::router::{Router, RouterConfig};
use strata_client::{Client, ClientTls};
use strata_common::config::DEFAULT_MACHINES_QUERY;
use strata_common::store::{Statement, Value};
use strata_common::transport::Tier;
use strata_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cluster::{percentile, round2, scrape};
use super::{progress, result};
use crate::cluster::metric;
use crate::procs::{ProcCluster, ProcOptions};

/// Apps per region in the benchmark.
const APPS: usize = 10;

/// The global cluster's name.
const GLOBAL: &str = "global";

/// Runs the scenario.
pub async fn global(regions: usize, nodes_per_region: usize, changes: usize) -> anyhow::Result<()> {
    progress(format!(
        "global: 3 globald, {regions} regions of {nodes_per_region} regiond, {changes} changes"
    ));
    let started = Instant::now();
    let global =
        tokio::task::spawn_blocking(|| ProcCluster::start(3, ProcOptions::global(GLOBAL))).await?;
    let operator = global.certs.node("bench-edge", Tier::Global, GLOBAL);
    let tls = ClientTls::load(
        &operator.ca,
        &operator.cert,
        &operator.key,
        format!("{GLOBAL}.global.strata"),
    )?;
    let endpoints: Vec<String> = global
        .nodes
        .iter()
        .map(|n| format!("https://{}", n.api))
        .collect();
    let names: Vec<String> = ["ams", "iad", "syd", "fra", "nrt", "gru", "ord", "sin"]
        .iter()
        .cycle()
        .take(regions)
        .enumerate()
        .map(|(i, r)| {
            if i < 8 {
                r.to_string()
            } else {
                format!("{r}{i}")
            }
        })
        .collect();
    let mut clusters = Vec::new();
    for region in &names {
        let publisher = global
            .certs
            .node(&format!("{region}-publisher"), Tier::Regional, region);
        let mut options = ProcOptions::region(region);
        options.extra_toml = format!(
            "[publish]\nto = [{}]\n[publish.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            endpoints
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", "),
            publisher.ca.display(),
            publisher.cert.display(),
            publisher.key.display(),
        );
        let cluster =
            tokio::task::spawn_blocking(move || ProcCluster::start(nodes_per_region, options))
                .await?;
        clusters.push(cluster);
    }
    progress(format!(
        "  {} processes started in {:.1} s",
        3 + regions * nodes_per_region,
        started.elapsed().as_secs_f64()
    ));

    // Every region runs APPS apps of two started Machines each.
    let mut region_clients = Vec::new();
    for (region, cluster) in names.iter().zip(&clusters) {
        let mut clients = Vec::new();
        for index in 0..cluster.nodes.len() {
            clients.push(cluster.client(index).await);
        }
        let statements = (0..APPS)
            .flat_map(|a| (0..2).map(move |m| (a, m)))
            .map(|(a, m)| {
                machine(
                    &format!("{region}-app{a}-m{m}"),
                    &format!("app{a}"),
                    "started",
                )
            })
            .collect();
        clients[0].transact(statements).await?;
        region_clients.push(clients);
    }
    let mut globals = Vec::new();
    for endpoint in &endpoints {
        globals.push(Client::connect(endpoint, Some(tls.clone())).await?);
    }
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    for (index, client) in globals.iter().enumerate() {
        follow_global(index, client.clone(), seen_tx.clone()).await?;
    }
    // The latest (started) count of each (app, region) on each globald.
    let mut held: HashMap<(usize, String, String), i64> = HashMap::new();
    let want_all =
        |held: &HashMap<(usize, String, String), i64>, app: &str, region: &str, n: i64| {
            (0..3).all(|g| held.get(&(g, app.to_owned(), region.to_owned())) == Some(&n))
        };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !names
        .iter()
        .all(|r| (0..APPS).all(|a| want_all(&held, &format!("app{a}"), r, 2)))
    {
        anyhow::ensure!(Instant::now() < deadline, "the regions never published");
        if let Ok(Some((g, app, region, n, _))) =
            tokio::time::timeout(Duration::from_millis(100), seen.recv()).await
        {
            held.insert((g, app, region), n);
        }
    }
    progress(format!(
        "  every region published in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // Region to global: a Machine started or stopped (a summary changes) until every globald
    // holds the new row.
    let bytes_before = publish_bytes(&global).await?;
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        let r = i % names.len();
        let region = &names[r];
        let app = format!("app{}", (i / names.len()) % APPS);
        let key = (app.clone(), region.clone());
        let now = held
            .get(&(0, key.0.clone(), key.1.clone()))
            .copied()
            .unwrap_or(0);
        // Alternate: start a third Machine, then stop it again.
        let (state, expected) = if now == 2 {
            ("started", 3)
        } else {
            ("stopped", 2)
        };
        let id = format!("{region}-{app}-extra");
        let client = &region_clients[r][i % region_clients[r].len()];
        let t0 = Instant::now();
        client.transact(vec![machine(&id, &app, state)]).await?;
        let deadline = t0 + Duration::from_secs(10);
        while !want_all(&held, &key.0, &key.1, expected) {
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(!left.is_zero(), "change {i} never reached every globald");
            if let Ok(Some((g, app, region, n, _))) = tokio::time::timeout(left, seen.recv()).await
            {
                held.insert((g, app, region), n);
            }
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        if (i + 1) % 25 == 0 {
            progress(format!("  {} changes", i + 1));
        }
    }
    let summary_bytes = publish_bytes(&global).await? - bytes_before;
    latencies.sort_by(f64::total_cmp);

    // Changes that leave every summary alone: a host republishing its Machines with a new
    // version and address.
    let quiet_changes = 1_000;
    let bytes_before = publish_bytes(&global).await?;
    for i in 0..quiet_changes {
        let r = i % names.len();
        let region = &names[r];
        let a = (i / names.len()) % APPS;
        let id = format!("{region}-app{a}-m{}", i % 2);
        let update = Statement::with_params(
            "UPDATE machines SET version = version + 1, address = ?2 WHERE id = ?1",
            vec![
                Value::Text(id),
                Value::Text(format!("10.0.{}.{}", i / 250, i % 250)),
            ],
        );
        region_clients[r][i % region_clients[r].len()]
            .transact(vec![update])
            .await?;
    }
    // Let any publish they caused land (debounce, rate cap).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let quiet_bytes = publish_bytes(&global).await? - bytes_before;

    // Route lookups from an edge in the first region.
    let cancel = CancellationToken::new();
    let router = Router::edge(
        RouterConfig {
            local_region: names[0].clone(),
            prefer: Vec::new(),
            machines_query: DEFAULT_MACHINES_QUERY.to_owned(),
            region_tls: None,
            region_timeout: Duration::from_secs(1),
            regions_max: 64,
        },
        endpoints.clone(),
        Some(tls.clone()),
        TaskTracker::new(),
        cancel.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match router.route("app0").await {
            Ok(route) if route.cached => break,
            other => anyhow::ensure!(
                Instant::now() < deadline,
                "the edge caches never filled: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cached = Vec::with_capacity(20_000);
    for i in 0..20_000 {
        let app = format!("app{}", i % APPS);
        let t0 = Instant::now();
        let route = router.route(&app).await?;
        cached.push(t0.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(route.cached && route.machines.len() >= 2, "{route:?}");
    }
    let mut direct = Vec::with_capacity(500);
    for i in 0..500 {
        let app = format!("app{}", i % APPS);
        let t0 = Instant::now();
        let route = router.route_direct(&app, &names[0], &[]).await?;
        direct.push(t0.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(route.machines.len() >= 2, "{route:?}");
    }
    cancel.cancel();
    cached.sort_by(f64::total_cmp);
    direct.sort_by(f64::total_cmp);

    let per_summary_change = summary_bytes / changes as f64;
    let per_quiet_change = quiet_bytes / quiet_changes as f64;
    progress(format!(
        "  region -> every globald: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0.0)
    ));
    progress(format!(
        "  bytes to the global tier: {per_quiet_change:.1} per change that alters no summary \
         ({quiet_bytes} B for {quiet_changes}), {per_summary_change:.0} per change that alters one"
    ));
    progress(format!(
        "  route lookup: cached p50 {:.1} us, p99 {:.1} us; direct (global + region over gRPC) \
         p50 {:.0} us, p99 {:.0} us",
        percentile(&cached, 50.0),
        percentile(&cached, 99.0),
        percentile(&direct, 50.0),
        percentile(&direct, 99.0)
    ));
    result(json!({
        "regions": regions,
        "nodes_per_region": nodes_per_region,
        "changes": changes,
        "region_to_global_p50_ms": round2(percentile(&latencies, 50.0)),
        "region_to_global_p99_ms": round2(percentile(&latencies, 99.0)),
        "global_bytes_per_regional_change": round2(per_quiet_change),
        "global_bytes_per_summary_change": round2(per_summary_change),
        "route_cached_p50_us": round2(percentile(&cached, 50.0)),
        "route_cached_p99_us": round2(percentile(&cached, 99.0)),
        "route_uncached_p50_us": round2(percentile(&direct, 50.0)),
        "route_uncached_p99_us": round2(percentile(&direct, 99.0)),
    }));
    drop(clusters);
    drop(global);
    Ok(())
}

/// A Machine's whole-row upsert.
fn machine(id: &str, app: &str, state: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state, host, address, port, version) \
         VALUES (?1, ?2, ?3, 'bench-host', '10.0.0.1', 8080, 1) \
         ON CONFLICT (id) DO UPDATE SET app = excluded.app, state = excluded.state, \
           host = excluded.host, address = excluded.address, port = excluded.port, \
           version = excluded.version",
        vec![
            Value::Text(id.into()),
            Value::Text(app.into()),
            Value::Text(state.into()),
        ],
    )
}

/// Bytes of publish requests all globald received so far.
async fn publish_bytes(global: &ProcCluster) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for node in &global.nodes {
        total += metric(
            &scrape(node.admin).await?,
            "strata_global_publish_received_bytes_total",
        );
    }
    Ok(total)
}

/// Follows `app_regions` on globald `index`; sends (index, app, region, started, when) for
/// every row seen.
async fn follow_global(
    index: usize,
    client: Client,
    tx: mpsc::UnboundedSender<(usize, String, String, i64, Instant)>,
) -> anyhow::Result<()> {
    let mut stream = client
        .subscribe(
            Statement::new("SELECT app, region, started FROM app_regions"),
            vec!["app".into(), "region".into()],
            None,
        )
        .await?;
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            let row = match event.event {
                Some(pb::subscribe_event::Event::Row(row)) => row,
                Some(pb::subscribe_event::Event::Change(change)) => match change.row {
                    Some(row) => row,
                    None => continue,
                },
                _ => continue,
            };
            let values: Vec<Value> = row
                .values
                .into_iter()
                .map(strata_proto::convert::value_from_pb)
                .collect();
            if let [Value::Text(app), Value::Text(region), Value::Integer(n)] = &values[..] {
                let seen = (index, app.clone(), region.clone(), *n, Instant::now());
                if tx.send(seen).is_err() {
                    return;
                }
            }
        }
    });
    Ok(())
}
