//! Real `regiond` processes on loopback: replication between processes, the database files
//! read by the stock sqlite3 tool, and kill -9 during writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use strata_common::store::{Statement, Value};
use strata_tests::cluster::wait_for;
use strata_tests::procs::{ProcCluster, ProcOptions};

fn insert(id: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state) VALUES (?1, 'web', 'started')",
        vec![Value::Text(id.into())],
    )
}

async fn ids(cluster: &ProcCluster, index: usize) -> BTreeSet<String> {
    let rows = cluster
        .client(index)
        .await
        .query("SELECT id FROM machines", vec![])
        .await
        .unwrap();
    rows.rows
        .into_iter()
        .map(|r| match &r[0] {
            Value::Text(s) => s.clone(),
            other => panic!("unexpected id {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_process_is_read_on_all_others_and_by_sqlite3() {
    let cluster = ProcCluster::start(3, ProcOptions::region("ams"));
    let writer = cluster.client(0).await;
    for i in 0..20 {
        writer
            .transact(vec![insert(&format!("m{i}"))])
            .await
            .unwrap();
    }
    for index in 1..3 {
        wait_for(
            Duration::from_secs(30),
            "the rows to reach every process",
            || async {
                let held = ids(&cluster, index).await.len();
                if held == 20 {
                    Ok(())
                } else {
                    Err(format!(
                        "node {index} holds {held}:\n{}",
                        cluster.log_tail(index, 10)
                    ))
                }
            },
        )
        .await;
    }
    for node in &cluster.nodes {
        let out = std::process::Command::new("sqlite3")
            .arg(&node.db)
            .arg("SELECT count(*) FROM machines;")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "20",
            "{}",
            node.name
        );
        let write = std::process::Command::new("sqlite3")
            .arg(&node.db)
            .arg("UPDATE machines SET state = 'x';")
            .output()
            .unwrap();
        assert!(
            !write.status.success(),
            "{}: a stray write succeeded",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_writes_restarts_catches_up_and_no_acknowledged_write_is_lost() {
    let mut cluster = ProcCluster::start(3, ProcOptions::region("ams"));
    let mut clients = Vec::new();
    for index in 0..3 {
        clients.push(cluster.client(index).await);
    }
    let mut acknowledged = BTreeSet::new();
    // Writes through every node, the victim included, then kill -9 it mid-stream.
    for i in 0..300 {
        let target = i % 3;
        if i == 150 {
            cluster.kill(2);
        }
        if i >= 150 && target == 2 {
            continue;
        }
        let id = format!("m{i:04}");
        if clients[target].transact(vec![insert(&id)]).await.is_ok() {
            acknowledged.insert(id);
        }
    }
    cluster.restart(2);
    let victim = cluster.client(2).await;
    wait_for(
        Duration::from_secs(60),
        "every process to hold every acknowledged write",
        || async {
            let mut missing = Vec::new();
            for index in 0..3 {
                let held = ids(&cluster, index).await;
                let lost: Vec<&String> = acknowledged.difference(&held).collect();
                if !lost.is_empty() {
                    missing.push(format!(
                        "node {index} lacks {} (e.g. {:?})",
                        lost.len(),
                        lost.first()
                    ));
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing.join("; "))
            }
        },
    )
    .await;
    // The restarted node kept its identity (a process crash loses nothing) and is caught up.
    let health = victim.health().await.unwrap();
    assert!(health.caught_up, "{health:?}");
    assert_eq!(acknowledged.len(), 250);
}
