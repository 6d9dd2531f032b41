//! The two tiers together, in one process: regions publish their app map to globald, globald
//! enforces region ownership and caps, and neither tier joins the other.
//!
//! The tests here start several clusters each; they take turns (`SERIAL`) so that the timing
//! assertions measure the code, not two tests fighting over two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use strata_common::store::{Statement, Value};
use strata_common::transport::Tier;
use strata_proto::v1 as pb;
use strata_tests::cluster::{metric, wait_for};
use strata_tests::tiers::{GLOBAL, Tiers, TiersOptions, machine};
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
    // A full publish of ams's own rows cannot remove iad's either: the delete is the region's.
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

fn assert_status(err: &strata_common::client::ClientError, code: Code, says: &str) {
    match err {
        strata_common::client::ClientError::Status(status) => {
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
