//! The two tiers together, in one process: regions publish their app map to globald, globald
//! enforces region ownership and caps, and neither tier joins the other.
//!
//! The tests here start several clusters each; they take turns (`SERIAL`) so that the timing
//! assertions measure the code, not two tests fighting over two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use strata_client::router::{Router, RouterConfig};
use strata_common::store::{Statement, Value};
use strata_common::transport::Tier;
use strata_proto::v1 as pb;
use strata_tests::cluster::{metric, wait_for};
use strata_tests::tiers::{GLOBAL, Tiers, TiersOptions, counts_by_app, machine};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

/// One multi-cluster test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rows(entries: &[(&str, i64, i64)]) -> BTreeMap<String, (i64, i64)> {
    entries
        .iter()
        .map(|(app, m, s)| (app.to_string(), (*m, *s)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_changes_reach_every_globald_within_2s_and_apps_that_leave_disappear() {
    let _serial = SERIAL.lock().await;
    let tiers = Tiers::start(TiersOptions {
        globals: 3,
        regions: vec![("ams", 3)],
        tune_region: |_, c| c.publish.reconcile_ms = 1_000,
        ..TiersOptions::default()
    })
    .await;
    let ams = tiers.region("ams").client(0).await;
    ams.transact(vec![
        machine("m1", "web", "ams", "started"),
        machine("m2", "web", "ams", "started"),
        machine("m3", "api", "ams", "stopped"),
    ])
    .await
    .unwrap();
    tiers
        .wait_global(
            "ams",
            &rows(&[("web", 2, 2), ("api", 1, 0)]),
            Duration::from_secs(10),
        )
        .await;

    // A Machine stopped, one started, through different nodes: each reaches every globald
    // within 2 s.
    for (node, id, app, state, expected) in [
        (
            1,
            "m2",
            "web",
            "stopped",
            rows(&[("web", 2, 1), ("api", 1, 0)]),
        ),
        (
            2,
            "m3",
            "api",
            "started",
            rows(&[("web", 2, 1), ("api", 1, 1)]),
        ),
    ] {
        let client = tiers.region("ams").client(node).await;
        let started = Instant::now();
        client
            .transact(vec![machine(id, app, "ams", state)])
            .await
            .unwrap();
        tiers
            .wait_global("ams", &expected, Duration::from_secs(2))
            .await;
        eprintln!(
            "{id} {state}: on every globald after {:?}",
            started.elapsed()
        );
    }

    // An app that leaves the region disappears from the global map.
    ams.transact(vec![Statement::new(
        "DELETE FROM machines WHERE app = 'api'",
    )])
    .await
    .unwrap();
    tiers
        .wait_global("ams", &rows(&[("web", 2, 1)]), Duration::from_secs(2))
        .await;

    // A row the region never published (written by an operator) goes at the next reconcile.
    let operator = tiers.global_client(0).await;
    operator
        .transact(vec![Statement::new(
            "INSERT INTO app_regions (app, region, machines, started) VALUES ('ghost', 'ams', 9, 9)",
        )])
        .await
        .unwrap();
    tiers
        .wait_global("ams", &rows(&[("web", 2, 1)]), Duration::from_secs(10))
        .await;

    // The region's own row names its API and schema.
    let region_row = tiers
        .global
        .store(1)
        .query(
            "SELECT endpoints, schema_version FROM regions WHERE region = 'ams'",
            &[],
        )
        .unwrap();
    let [Value::Text(endpoints), Value::Text(schema)] = &region_row.rows[0][..] else {
        panic!("no region row: {region_row:?}");
    };
    assert!(endpoints.contains("http://127.0.0.1:"), "{endpoints}");
    assert_eq!(schema.len(), 16, "{schema}");

    // The two publishers (the lowest names) go; the third node takes over.
    let publisher = |tiers: &Tiers, index: usize| {
        metric(
            &tiers.region("ams").node(index).metrics.encode(),
            "strata_publish_publisher",
        )
    };
    assert_eq!(
        publisher(&tiers, 2),
        0.0,
        "ams-2 is not among the two lowest names"
    );
    let mut tiers = tiers;
    tiers.region_mut("ams").stop(0).await;
    tiers.region_mut("ams").stop(1).await;
    wait_for(
        Duration::from_secs(20),
        "ams-2 to take over publishing",
        || async {
            match publisher(&tiers, 2) {
                1.0 => Ok(()),
                seen => Err(format!("publisher gauge {seen}")),
            }
        },
    )
    .await;
    tiers
        .region("ams")
        .client(2)
        .await
        .transact(vec![machine("m4", "web", "ams", "started")])
        .await
        .unwrap();
    tiers
        .wait_global("ams", &rows(&[("web", 3, 2)]), Duration::from_secs(5))
        .await;
    tiers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_writes_only_its_own_rows_within_its_caps() {
    let _serial = SERIAL.lock().await;
    let tiers = Tiers::start(TiersOptions {
        globals: 1,
        regions: vec![("ams", 1)],
        tune_global: |c| {
            c.global.rows_per_region_max = 3;
            c.global.publish_rate_per_region = 1;
            c.global.publish_burst = 5;
        },
        ..TiersOptions::default()
    })
    .await;
    tiers
        .region("ams")
        .client(0)
        .await
        .transact(vec![machine("m1", "web", "ams", "started")])
        .await
        .unwrap();
    tiers
        .wait_global("ams", &rows(&[("web", 1, 1)]), Duration::from_secs(10))
        .await;
    // Changes that alter no summary send nothing: two of them, each derived in turn (one
    // derivation runs at a time, so once the second has run the first was fully handled).
    let node = &tiers.region("ams").node(0).metrics;
    let sent = |name| metric(&node.encode(), name);
    let publishes = sent("strata_publish_publishes_total");
    let derivations = sent("strata_publish_derivations_total");
    let region = tiers.region("ams").client(0).await;
    for round in 1..=2 {
        region
            .transact(vec![Statement::new(format!(
                "UPDATE machines SET version = version + 1, address = '10.0.0.{round}'"
            ))])
            .await
            .unwrap();
        wait_for(
            Duration::from_secs(10),
            "the change to be derived",
            || async {
                let done = sent("strata_publish_derivations_total") - derivations;
                if done >= f64::from(round) {
                    Ok(())
                } else {
                    Err(format!("{done} derivations"))
                }
            },
        )
        .await;
    }
    assert_eq!(
        sent("strata_publish_publishes_total"),
        publishes,
        "a change that altered no summary was published"
    );

    let before = tiers.global.store(0).dump().unwrap();
    let ams = tiers
        .global_client_with(0, tiers.global_tls("ams-rogue", Tier::Regional, "ams"))
        .await;
    let summary = |app: &str, region: &str| pb::AppSummary {
        app: app.into(),
        region: region.into(),
        machines: 5,
        started: 5,
        stopped: 0,
        other: 0,
    };

    // A row of region iad from ams's certificate, even beside a row of its own.
    let err = ams
        .publish(pb::PublishRequest {
            upserts: vec![summary("web", "ams"), summary("web", "iad")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&err, Code::PermissionDenied, "iad");
    // Regions do not write through Transact.
    let err = ams
        .transact(vec![Statement::new(
            "INSERT INTO app_regions (app, region) VALUES ('x', 'iad')",
        )])
        .await
        .unwrap_err();
    assert_status(&err, Code::PermissionDenied, "Publish");
    // The row cap.
    let err = ams
        .publish(pb::PublishRequest {
            upserts: ["a", "b", "c", "d"]
                .iter()
                .map(|app| summary(app, "ams"))
                .collect(),
            full: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&err, Code::ResourceExhausted, "cap of 3");
    // A malformed row.
    let err = ams
        .publish(pb::PublishRequest {
            upserts: vec![summary("", "ams")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&err, Code::InvalidArgument, "app name");
    assert_eq!(
        tiers.global.store(0).dump().unwrap(),
        before,
        "a refused publish changed the global map"
    );

    // A global-tier certificate is no publisher.
    let operator = tiers.global_client(0).await;
    let err = operator
        .publish(pb::PublishRequest {
            upserts: vec![summary("web", GLOBAL)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&err, Code::PermissionDenied, "only regions publish");

    // The rate cap: a burst of 5, then 1 a second.
    let mut limited = 0;
    for _ in 0..10 {
        match ams
            .publish(pb::PublishRequest {
                upserts: vec![summary("web", "ams")],
                ..Default::default()
            })
            .await
        {
            Ok(_) => {}
            Err(err) => {
                assert_status(&err, Code::ResourceExhausted, "times a second");
                limited += 1;
            }
        }
    }
    assert!(
        limited >= 4,
        "only {limited} of 10 publishes were rate limited"
    );
    tiers.shutdown().await;
}

fn assert_status(err: &strata_client::ClientError, code: Code, says: &str) {
    match err {
        strata_client::ClientError::Status(status) => {
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(
                status.message().contains(says),
                "{:?} should say {says:?}",
                status.message()
            );
        }
        other => panic!("expected a status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regiond_never_joins_globald_nor_the_reverse() {
    let _serial = SERIAL.lock().await;
    let mut tiers = Tiers::start(TiersOptions {
        globals: 1,
        regions: vec![("ams", 1)],
        ..TiersOptions::default()
    })
    .await;
    let global_seed = tiers.global.gossip_addr(0).to_string();
    let region_seed = tiers.region("ams").gossip_addr(0).to_string();
    // A regiond with its region's certificate, told to join globald.
    let ams = tiers.region_mut("ams");
    let intruder = ams
        .add_node(|c| c.gossip.bootstrap = vec![global_seed.clone()])
        .await;
    // A regiond presenting the certificate the global CA issued for its region's publishers.
    let publisher_cert = tiers.global.certs.node("ams-2", Tier::Regional, "ams");
    let ams = tiers.region_mut("ams");
    let wrong_ca = ams
        .add_node(|c| {
            c.gossip.bootstrap = vec![global_seed.clone()];
            c.gossip.tls = publisher_cert.clone();
        })
        .await;
    // A globald told to join the region.
    let stray = tiers
        .global
        .add_node(|c| {
            c.api.tls = Some(c.gossip.tls.clone());
            c.gossip.bootstrap = vec![region_seed.clone()];
        })
        .await;
    wait_for(
        Duration::from_secs(20),
        "the handshakes to be refused",
        || async {
            let global_refused = metric(
                &tiers.global.node(0).metrics.encode(),
                "strata_transport_handshakes_failed_total",
            );
            let region_refused = metric(
                &tiers.region("ams").node(0).metrics.encode(),
                "strata_transport_handshakes_failed_total",
            );
            if global_refused >= 2.0 && region_refused >= 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "globald refused {global_refused}, ams-0 refused {region_refused}"
                ))
            }
        },
    )
    .await;
    let tiers_of = |cluster: &strata_tests::cluster::TestCluster, index: usize| -> Vec<Tier> {
        cluster
            .node(index)
            .cluster
            .view()
            .members
            .iter()
            .filter_map(|(_, identity)| identity.as_ref().map(|i| i.tier))
            .collect()
    };
    assert!(
        tiers_of(&tiers.global, 0)
            .iter()
            .all(|t| *t == Tier::Global)
    );
    assert!(
        tiers_of(&tiers.global, stray)
            .iter()
            .all(|t| *t == Tier::Global)
    );
    for index in [0, intruder, wrong_ca] {
        assert!(
            tiers_of(tiers.region("ams"), index)
                .iter()
                .all(|t| *t == Tier::Regional)
        );
    }
    assert!(
        tiers
            .region("ams")
            .node(wrong_ca)
            .cluster
            .view()
            .members
            .is_empty(),
        "a node with the global CA's certificate joined someone"
    );
    tiers.shutdown().await;
}

/// Region ams's derivation reads a JSON label from `image`: a Machine whose image is not JSON
/// makes the query fail (a poison row).
const POISONABLE_DERIVATION: &str = "SELECT app, count(*) AS machines, \
     count(*) FILTER (WHERE state = 'started') AS started, \
     count(*) FILTER (WHERE state = 'stopped') AS stopped, \
     count(*) FILTER (WHERE state NOT IN ('started', 'stopped')) AS other \
     FROM machines WHERE json_extract(coalesce(image, '{}'), '$.hidden') IS NOT 1 \
     GROUP BY app";

/// An edge router in `local`, following the global tier of `tiers`.
fn edge_router(tiers: &Tiers, local: &str, cancel: &CancellationToken) -> Router {
    Router::edge(
        RouterConfig {
            local_region: local.to_owned(),
            prefer: Vec::new(),
            machines_query: strata_common::config::DEFAULT_MACHINES_QUERY.to_owned(),
            region_tls: None,
            region_timeout: Duration::from_millis(500),
            regions_max: 8,
        },
        tiers.global_endpoints(),
        Some(tiers.global_tls("edge", Tier::Global, GLOBAL)),
        TaskTracker::new(),
        cancel.clone(),
    )
}

/// Writes `per_app` started Machines of each app in `region` through node 0.
async fn seed(tiers: &Tiers, region: &str, apps: &[String], per_app: usize) {
    let client = tiers.region(region).client(0).await;
    let mut statements = Vec::new();
    for app in apps {
        for i in 0..per_app {
            statements.push(machine(
                &format!("{region}-{app}-{i}"),
                app,
                region,
                "started",
            ));
        }
    }
    client.transact(statements).await.unwrap();
}

/// Region iad as it must stay whatever happens in ams: its rows, its global rows on every
/// globald, and routes to its apps from an edge in iad.
struct Witness {
    apps: Vec<String>,
    per_app: i64,
}

impl Witness {
    async fn check(&self, tiers: &Tiers, router: &Router) -> Result<(), String> {
        let rows = tiers
            .region("iad")
            .store(0)
            .query(
                "SELECT app, count(*) FROM machines WHERE state = 'started' GROUP BY app",
                &[],
            )
            .map_err(|e| e.to_string())?;
        if rows.rows.len() != self.apps.len()
            || rows
                .rows
                .iter()
                .any(|r| r.get(1) != Some(&Value::Integer(self.per_app)))
        {
            return Err(format!("iad's rows changed: {:?}", rows.rows));
        }
        let expected: BTreeMap<String, (i64, i64)> = self
            .apps
            .iter()
            .map(|a| (a.clone(), (self.per_app, self.per_app)))
            .collect();
        for index in tiers.global.running() {
            let held = tiers.global_rows(index, "iad");
            if held != expected {
                return Err(format!("globald {index} holds {held:?} for iad"));
            }
        }
        for app in &self.apps {
            match router.route(app).await {
                Ok(route)
                    if route.region == "iad" && route.machines.len() == self.per_app as usize => {}
                Ok(route) => {
                    return Err(format!(
                        "route {app}: {} in {}",
                        route.machines.len(),
                        route.region
                    ));
                }
                Err(err) => return Err(format!("route {app}: {err}")),
            }
        }
        Ok(())
    }
}

/// The publishes ams's nodes have sent (acknowledged or not).
fn ams_publishes(tiers: &Tiers) -> f64 {
    tiers
        .region("ams")
        .running()
        .iter()
        .map(|i| {
            let text = tiers.region("ams").node(*i).metrics.encode();
            metric(&text, "strata_publish_publishes_total")
                + metric(&text, "strata_publish_failures_total")
        })
        .sum()
}

fn ams_derive_failures(tiers: &Tiers) -> f64 {
    tiers
        .region("ams")
        .running()
        .iter()
        .map(|i| {
            metric(
                &tiers.region("ams").node(*i).metrics.encode(),
                "strata_publish_derive_failures_total",
            )
        })
        .sum()
}

/// What ams's rows say its global rows should be.
fn ams_summary(tiers: &Tiers, index: usize) -> BTreeMap<String, (i64, i64)> {
    let rows = tiers
        .region("ams")
        .store(index)
        .query(
            "SELECT app, count(*), count(*) FILTER (WHERE state = 'started') FROM machines \
             GROUP BY app",
            &[],
        )
        .unwrap();
    counts_by_app(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_storm_a_poison_row_and_a_dead_region_stay_in_their_region() {
    let _serial = SERIAL.lock().await;
    let mut tiers = Tiers::start(TiersOptions {
        globals: 2,
        regions: vec![("ams", 3), ("iad", 2)],
        tune_region: |region, c| {
            if region == "ams" {
                c.publish.derivation = POISONABLE_DERIVATION.to_owned();
            }
        },
        ..TiersOptions::default()
    })
    .await;
    let ams_apps: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    // "shared" runs in both regions.
    let iad_apps: Vec<String> = (0..5)
        .map(|i| format!("b{i}"))
        .chain(["shared".to_owned()])
        .collect();
    seed(&tiers, "ams", &ams_apps, 20).await;
    seed(&tiers, "ams", &["shared".to_owned()], 2).await;
    seed(&tiers, "iad", &iad_apps, 3).await;
    let witness = Witness {
        apps: iad_apps.clone(),
        per_app: 3,
    };
    let cancel = CancellationToken::new();
    let router = edge_router(&tiers, "iad", &cancel);
    wait_for(
        Duration::from_secs(20),
        "iad to be seen from the edge",
        || witness.check(&tiers, &router),
    )
    .await;

    // (a) A write storm in ams: Machines flipping state as fast as ams takes them, for 10 s.
    let storm_for = Duration::from_secs(10);
    let publishes_before = ams_publishes(&tiers);
    let started = Instant::now();
    let mut writers = Vec::new();
    for node in 0..2 {
        let client = tiers.region("ams").client(node).await;
        let apps = ams_apps.clone();
        writers.push(tokio::spawn(async move {
            let mut written = 0usize;
            let mut round = 0usize;
            while started.elapsed() < storm_for {
                round += 1;
                let statements: Vec<Statement> = (0..100)
                    .map(|i| {
                        let app = &apps[(round + i) % apps.len()];
                        let id = format!("ams-{app}-{}", (round * 7 + i) % 20);
                        let state = if (round + i + node).is_multiple_of(3) {
                            "stopped"
                        } else {
                            "started"
                        };
                        machine(&id, app, "ams", state)
                    })
                    .collect();
                client.transact(statements).await.unwrap();
                written += 100;
            }
            written
        }));
    }
    let mut checks = 0;
    while started.elapsed() < storm_for {
        witness
            .check(&tiers, &router)
            .await
            .unwrap_or_else(|e| panic!("during the storm: {e}"));
        checks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let publishes = ams_publishes(&tiers) - publishes_before;
    // Two publishers, each capped at rate_max_per_s (4 by default), plus one in flight each.
    let cap = 2.0 * 4.0 * elapsed + 2.0;
    eprintln!(
        "storm: {written} updates in {elapsed:.1} s ({:.0}/s); ams published {publishes} times \
         ({:.1}/s, cap {cap:.0} in all); iad checked {checks} times",
        written as f64 / elapsed,
        publishes / elapsed
    );
    assert!(
        written as f64 / elapsed >= 1000.0,
        "the storm was too weak to mean anything"
    );
    assert!(
        publishes <= cap,
        "ams published {publishes} times, over its cap of {cap:.0}"
    );
    let limited: f64 = tiers
        .global
        .running()
        .iter()
        .map(|i| {
            metric(
                &tiers.global.node(*i).metrics.encode(),
                "strata_global_publishes_rate_limited_total",
            )
        })
        .sum();
    assert_eq!(limited, 0.0, "ams's publishers hit globald's rate cap");
    tiers
        .region("ams")
        .wait_converged(Duration::from_secs(30))
        .await;
    let after_storm = ams_summary(&tiers, 0);
    tiers
        .wait_global("ams", &after_storm, Duration::from_secs(10))
        .await;

    // (b) A poison row makes ams's derivation fail: ams's global rows stay as they were, iad
    // is untouched; once the row is gone, publishing resumes.
    let ams = tiers.region("ams").client(0).await;
    let failures_before = ams_derive_failures(&tiers);
    let poison = Statement::with_params(
        "INSERT INTO machines (id, app, state, image) VALUES ('poison', 'a0', 'started', ?1)",
        vec![Value::Text("not json {".into())],
    );
    ams.transact(vec![poison]).await.unwrap();
    ams.transact(vec![Statement::new(
        "UPDATE machines SET state = 'stopped' WHERE app = 'a1'",
    )])
    .await
    .unwrap();
    wait_for(
        Duration::from_secs(10),
        "ams's derivation to fail",
        || async {
            let failures = ams_derive_failures(&tiers) - failures_before;
            if failures >= 2.0 {
                Ok(())
            } else {
                Err(format!("{failures} failed derivations"))
            }
        },
    )
    .await;
    witness
        .check(&tiers, &router)
        .await
        .unwrap_or_else(|e| panic!("with a poison row in ams: {e}"));
    for index in tiers.global.running() {
        assert_eq!(
            tiers.global_rows(index, "ams"),
            after_storm,
            "ams's global rows changed while its derivation failed"
        );
    }
    ams.transact(vec![Statement::new(
        "DELETE FROM machines WHERE id = 'poison'",
    )])
    .await
    .unwrap();
    tiers
        .region("ams")
        .wait_converged(Duration::from_secs(10))
        .await;
    let healed = ams_summary(&tiers, 0);
    assert_eq!(healed["a1"].1, 0, "a1 was stopped");
    tiers
        .wait_global("ams", &healed, Duration::from_secs(30))
        .await;

    // (c) Every regiond of ams dies. iad stays right; an edge in ams falls through to iad.
    for index in 0..3 {
        tiers.region_mut("ams").stop(index).await;
    }
    let ams_edge = edge_router(&tiers, "ams", &cancel);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        witness
            .check(&tiers, &router)
            .await
            .unwrap_or_else(|e| panic!("with ams dead: {e}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let route = ams_edge.route("shared").await.unwrap();
    assert_eq!(route.region, "iad", "{route:?}");
    assert_eq!(route.candidates, vec!["ams", "iad"]);
    assert_eq!(route.skipped.len(), 1);
    assert_eq!(route.skipped[0].0, "ams");
    assert!(route.skipped[0].1.contains("unreachable"), "{route:?}");
    cancel.cancel();
    tiers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_lookups_prefer_the_local_region_and_fall_through_when_its_nodes_are_gone() {
    let _serial = SERIAL.lock().await;
    let mut tiers = Tiers::start(TiersOptions {
        globals: 2,
        regions: vec![("ams", 2), ("iad", 2), ("syd", 1)],
        ..TiersOptions::default()
    })
    .await;
    for (region, n) in [("ams", 2), ("iad", 3), ("syd", 1)] {
        seed(&tiers, region, &["web".to_owned()], n).await;
    }
    let cancel = CancellationToken::new();
    let edge = edge_router(&tiers, "ams", &cancel);
    // Cached once the caches are filled.
    wait_for(
        Duration::from_secs(20),
        "a cached answer from ams",
        || async {
            match edge.route("web").await {
                Ok(route) if route.cached && route.region == "ams" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let route = edge.route("web").await.unwrap();
    assert_eq!(route.machines.len(), 2);
    assert_eq!(route.candidates, vec!["ams", "iad", "syd"]);
    assert!(route.columns.contains(&"address".to_owned()));
    // Another caller's region, a preference.
    let route = edge.route_from("web", "syd", &[]).await.unwrap();
    assert_eq!((route.region.as_str(), route.machines.len()), ("syd", 1));
    let route = edge
        .route_from("web", "lhr", &["iad".to_owned()])
        .await
        .unwrap();
    assert_eq!(route.region, "iad");
    // Direct answers agree with cached ones.
    let direct = edge.route_direct("web", "ams", &[]).await.unwrap();
    assert_eq!(
        (direct.region.as_str(), direct.machines.len(), direct.cached),
        ("ams", 2, false)
    );
    // An app nobody runs.
    assert!(matches!(
        edge.route("nope").await,
        Err(strata_client::router::RouteError::NotFound(_))
    ));
    // globald's Route agrees, for proxies in other languages.
    let global = tiers.global_client(0).await;
    let answer = global.route("web", "iad", vec![]).await.unwrap();
    assert_eq!((answer.region.as_str(), answer.machines.len()), ("iad", 3));

    // ams's nodes go away: the edge in ams falls through to the next region by name.
    for index in 0..2 {
        tiers.region_mut("ams").stop(index).await;
    }
    let route = edge.route("web").await.unwrap();
    assert_eq!(route.region, "iad", "{route:?}");
    assert_eq!(route.skipped[0].0, "ams");
    let answer = global.route("web", "ams", vec![]).await.unwrap();
    assert_eq!(answer.region, "iad");
    assert_eq!(answer.skipped[0].region, "ams");
    // With every region running it gone, the lookup says so.
    for index in 0..2 {
        tiers.region_mut("iad").stop(index).await;
    }
    tiers.region_mut("syd").stop(0).await;
    let err = global.route("web", "ams", vec![]).await.unwrap_err();
    assert_status(&err, Code::Unavailable, "ams");
    cancel.cancel();
    tiers.shutdown().await;
}
