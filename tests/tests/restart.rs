//! A `regiond` killed with SIGKILL and restarted on the same address hears its peers' pushes
//! again at once: the survivors drop their connections to the dead process (the new process
//! dials them, or answers their next packet with a stateless reset) instead of sending into
//! them until the idle timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use strata_common::store::{Statement, Value};
use strata_tests::cluster::wait_for;
use strata_tests::procs::{ProcCluster, ProcOptions, admin_get, metric_value};

/// Pushes the restarted node must receive within this long after it logged its start. The
/// bug this guards against took 3-8 s (the 10 s idle timeout of the dead connection); 2 s
/// leaves room for a debug build on a busy machine.
const FIRST_PUSH_MAX: Duration = Duration::from_secs(2);

fn insert(id: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state) VALUES (?1, 'web', 'started')",
        vec![Value::Text(id.into())],
    )
}

async fn count(cluster: &ProcCluster, index: usize) -> i64 {
    let rows = cluster
        .client(index)
        .await
        .query("SELECT count(*) FROM machines", vec![])
        .await
        .unwrap();
    match rows.rows[0][0] {
        Value::Integer(n) => n,
        ref other => panic!("unexpected count {other:?}"),
    }
}

async fn pushes_received(cluster: &ProcCluster, index: usize) -> (f64, String) {
    let (_, page) = admin_get(cluster.nodes[index].admin, "/metrics")
        .await
        .unwrap_or_default();
    let pushed =
        metric_value(&page, "strata_changesets_received_total{via=\"broadcast\"}").unwrap_or(0.0);
    let members = metric_value(&page, "strata_members").unwrap_or(-1.0);
    (
        pushed,
        format!("pushes received {pushed}, members {members}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_kill_9_receives_pushes_within_a_second_or_two() {
    let cluster = ProcCluster::start(3, ProcOptions::region("ams"));
    // Every pair connected and in use: node 1's writes reach node 2 by push.
    let writer = cluster.client(1).await;
    let mut written = 0;
    let warm_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        written += 1;
        writer
            .transact(vec![insert(&format!("warm-{written}"))])
            .await
            .unwrap();
        let (pushed, seen) = pushes_received(&cluster, 2).await;
        if pushed > 0.0 {
            break;
        }
        assert!(
            Instant::now() < warm_deadline,
            "no push from node 1 reached node 2 before the kill; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kill -9 and restart at once: node 1 still holds its connection to the dead process.
    let mut cluster = cluster;
    cluster.kill(2);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(2);
        cluster
    })
    .await
    .unwrap();
    let started = Instant::now();

    // A light load on node 1 (the restarted node joins through node 0, so node 1's old
    // connection is the one that must be replaced or reset).
    let mut last = String::new();
    let first_push = loop {
        writer
            .transact(vec![insert(&format!("after-{written}"))])
            .await
            .unwrap();
        written += 1;
        let (pushed, seen) = pushes_received(&cluster, 2).await;
        if pushed > 0.0 {
            break started.elapsed();
        }
        last = seen;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no push reached the restarted node in 15 s; last seen: {last}\n{}",
            cluster.log_tail(2, 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        first_push < FIRST_PUSH_MAX,
        "first push after {first_push:?} (want under {FIRST_PUSH_MAX:?}); before it: {last}\n{}",
        cluster.log_tail(2, 30)
    );

    // And everything written arrives.
    wait_for(Duration::from_secs(30), "every row on node 2", || async {
        let held = count(&cluster, 2).await;
        if held == written {
            Ok(())
        } else {
            Err(format!("node 2 holds {held} of {written}"))
        }
    })
    .await;
}
