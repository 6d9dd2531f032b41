//! Health tells the truth: a version no receiver can apply is quarantined, reported and does
//! not hold up the rest; a node that lost every peer says so; the watchdog's exit is real; a
//! poison row in a region does not stop its other apps from reaching globald.
//!
//! The cluster tests take turns (`SERIAL`) so that their deadlines measure the code, not tests
//! fighting over two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_common::store::{SiteId, Statement, Value};
use strata_tests::cluster::{TestCluster, metric, wait_for};
use strata_tests::tiers::{Tiers, TiersOptions, machine};

/// One multi-node test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn upsert(id: &str, app: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app) VALUES (?1, ?2)
         ON CONFLICT (id) DO UPDATE SET app = excluded.app",
        vec![Value::Text(id.into()), Value::Text(app.into())],
    )
}

/// Which of `versions` of `site` node `index` holds.
fn held(cluster: &TestCluster, index: usize, site: SiteId, versions: &[u64]) -> Vec<u64> {
    versions
        .iter()
        .copied()
        .filter(|v| cluster.store(index).has(site, *v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_every_receiver_refuses_is_quarantined_reported_and_blocks_nothing_else() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start(3, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let origin = cluster.store(0).site();
    let head = cluster.store(0).head();
    let poison = head + 2;
    for receiver in [1, 2] {
        cluster
            .node(receiver)
            .cluster
            .faults()
            .refuse(origin, poison);
    }
    let client = cluster.client(0).await;
    for i in 1..=3 {
        client
            .transact(vec![upsert(&format!("m{i}"), "web")])
            .await
            .unwrap();
    }
    // Another site writes after the poison version.
    let other = cluster.store(1).site();
    cluster
        .client(1)
        .await
        .transact(vec![upsert("n1", "api")])
        .await
        .unwrap();
    let other_version = cluster.store(1).head();

    let versions = [head + 1, poison, head + 3];
    wait_for(
        Duration::from_secs(20),
        "the versions around the poison one, and another site's, to replicate",
        || async {
            let seen: Vec<_> = [1, 2]
                .iter()
                .map(|i| {
                    (
                        held(&cluster, *i, origin, &versions),
                        cluster.node(*i).cluster.quarantined(),
                        cluster.store(2).has(other, other_version),
                    )
                })
                .collect();
            let want = (vec![head + 1, head + 3], 1, true);
            if seen.iter().all(|s| *s == want) {
                Ok(())
            } else {
                Err(format!(
                    "(held, quarantined, other site held) per receiver: {seen:?}"
                ))
            }
        },
    )
    .await;

    // Health, readiness and the metrics say why.
    let health = cluster.client(1).await.health().await.unwrap();
    assert_eq!(health.quarantined, 1, "{health:?}");
    wait_for(
        Duration::from_secs(10),
        "readiness to name the quarantine",
        || async {
            let readiness = cluster.node(1).cluster.readiness();
            if !readiness.ready && readiness.reason.contains("quarantined") {
                Ok(())
            } else {
                Err(format!("{readiness:?}"))
            }
        },
    )
    .await;
    let health = cluster.client(1).await.health().await.unwrap();
    assert!(!health.ready, "{health:?}");
    assert!(
        health
            .not_ready_reasons
            .iter()
            .any(|r| r.contains("refused by fault injection")),
        "{health:?}"
    );
    let text = cluster.node(1).metrics.encode();
    assert_eq!(metric(&text, "strata_quarantined_versions"), 1.0, "{text}");
    assert_eq!(metric(&text, "strata_quarantined_total"), 1.0, "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("strata_not_ready{")
            && l.contains("quarantine")
            && l.ends_with(" 1")),
        "{text}"
    );

    // Once the receivers accept it again, the retry (after its back-off) applies it and the
    // nodes are ready again.
    for receiver in [1, 2] {
        cluster.node(receiver).cluster.faults().clear();
    }
    wait_for(
        Duration::from_secs(30),
        "the quarantined version to be applied on retry",
        || async {
            let seen: Vec<_> = [1, 2]
                .iter()
                .map(|i| {
                    (
                        held(&cluster, *i, origin, &versions).len(),
                        cluster.node(*i).cluster.quarantined(),
                        cluster.node(*i).cluster.readiness().ready,
                    )
                })
                .collect();
            if seen.iter().all(|s| *s == (3, 0, true)) {
                Ok(())
            } else {
                Err(format!("(held, quarantined, ready) per receiver: {seen:?}"))
            }
        },
    )
    .await;
    cluster.wait_converged(Duration::from_secs(20)).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_every_peer_reports_it_and_recovers_when_one_returns() {
    let _serial = SERIAL.lock().await;
    let mut cluster = TestCluster::start(2, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    wait_for(Duration::from_secs(20), "node 0 to be ready", || async {
        let readiness = cluster.node(0).cluster.readiness();
        if readiness.ready {
            Ok(())
        } else {
            Err(format!("{readiness:?}"))
        }
    })
    .await;

    cluster.stop(1).await;
    wait_for(
        Duration::from_secs(20),
        "node 0 to say it lost its peers",
        || async {
            let health = cluster.client(0).await.health().await.unwrap();
            if !health.ready
                && health
                    .not_ready_reasons
                    .iter()
                    .any(|r| r.contains("lost every peer"))
            {
                Ok(())
            } else {
                Err(format!("{health:?}"))
            }
        },
    )
    .await;
    let text = cluster.node(0).metrics.encode();
    assert_eq!(metric(&text, "strata_ready"), 0.0, "{text}");
    let readyz = get(cluster.node(0).admin_addr(), "/readyz").await;
    assert!(
        readyz.starts_with("HTTP/1.1 503") && readyz.contains("lost every peer"),
        "{readyz}"
    );

    cluster.restart(1).await;
    wait_for(
        Duration::from_secs(30),
        "node 0 to be ready again",
        || async {
            let readiness = cluster.node(0).cluster.readiness();
            if readiness.ready {
                Ok(())
            } else {
                Err(format!("{readiness:?}"))
            }
        },
    )
    .await;
    cluster.shutdown().await;
}

/// The raw HTTP answer of the admin listener at `admin` to `GET path`.
async fn get(admin: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    response
}

/// Runs the stall child in `mode` and returns its exit code and standard error, killing it if
/// it does not exit within 30 s.
fn run_stall_child(mode: &str) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stall-child"))
        .arg(mode)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the {mode} child did not exit within 30 s; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_stalled_runtime_makes_the_process_exit_with_the_stall_code_and_an_error_line() {
    let (code, stderr) = run_stall_child("runtime");
    assert_eq!(
        code,
        Some(strata_common::watchdog::STALL_EXIT_CODE),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("ERROR") && stderr.contains("exiting: the async runtime stalled"),
        "stderr: {stderr}"
    );
}

#[test]
fn a_stuck_store_thread_makes_the_process_exit_with_the_stall_code_and_an_error_line() {
    let (code, stderr) = run_stall_child("store");
    assert_eq!(
        code,
        Some(strata_common::watchdog::STALL_EXIT_CODE),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("ERROR") && stderr.contains("exiting: a store thread is stuck"),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("writer"),
        "names the thread; stderr: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_in_a_region_does_not_stop_its_other_apps_from_reaching_globald() {
    let _serial = SERIAL.lock().await;
    let tiers = Tiers::start(TiersOptions {
        globals: 1,
        regions: vec![("ams", 2)],
        tune_region: |_, c| c.publish.reconcile_ms = 1_000,
        ..TiersOptions::default()
    })
    .await;
    let ams = tiers.region("ams").client(0).await;
    ams.transact(vec![
        machine("m1", "web", "ams", "started"),
        // Its app name is empty: the derivation cannot publish it.
        machine("m2", "", "ams", "started"),
        machine("m3", "api", "ams", "stopped"),
    ])
    .await
    .unwrap();
    let expected: BTreeMap<String, (i64, i64)> =
        [("web".to_string(), (1, 1)), ("api".to_string(), (1, 0))]
            .into_iter()
            .collect();
    tiers
        .wait_global("ams", &expected, Duration::from_secs(20))
        .await;
    // Later changes keep flowing while the poison row stays.
    ams.transact(vec![machine("m4", "web", "ams", "started")])
        .await
        .unwrap();
    let expected: BTreeMap<String, (i64, i64)> =
        [("web".to_string(), (2, 2)), ("api".to_string(), (1, 0))]
            .into_iter()
            .collect();
    tiers
        .wait_global("ams", &expected, Duration::from_secs(20))
        .await;
    let region = tiers.region("ams");
    let skipped: f64 = region
        .running()
        .iter()
        .map(|i| {
            metric(
                &region.node(*i).metrics.encode(),
                "strata_publish_skipped_rows_total",
            )
        })
        .sum();
    assert!(skipped >= 1.0, "the skipped row is counted: {skipped}");
    tiers.shutdown().await;
}
