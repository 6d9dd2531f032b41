//! Ready means in step: a restarted node finds the members it knew, catches up with what they
//! held, and only then says it is ready; a node told to refuse writes until then says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use strata_common::client::ClientError;
use strata_common::store::{Statement, Value};
use strata_tests::cluster::{TestCluster, wait_for};

fn insert(id: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state) VALUES (?1, 'web', 'started')",
        vec![Value::Text(id.into())],
    )
}

async fn count(cluster: &TestCluster, index: usize) -> i64 {
    let rows = cluster
        .client(index)
        .await
        .query("SELECT count(*) FROM machines", vec![])
        .await
        .unwrap();
    match rows.rows[0][0] {
        Value::Integer(n) => n,
        ref other => panic!("count is {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_is_ready_only_once_it_holds_what_its_peers_held() {
    let mut cluster = TestCluster::start(3, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let writer = cluster.client(0).await;
    for i in 0..100 {
        writer
            .transact(vec![insert(&format!("a{i}"))])
            .await
            .unwrap();
    }
    cluster.wait_converged(Duration::from_secs(30)).await;
    cluster.stop(2).await;

    // What it knew is on disk: the two other members.
    let file = strata_common::cluster::known::path_in(&cluster.nodes[2].config.node.data_dir);
    let known: BTreeSet<SocketAddr> = strata_common::cluster::known::load(&file)
        .into_iter()
        .collect();
    let others: BTreeSet<SocketAddr> = [cluster.gossip_addr(0), cluster.gossip_addr(1)].into();
    assert_eq!(known, others, "{}", file.display());

    // The cluster moves on while it is away.
    for i in 0..400 {
        writer
            .transact(vec![insert(&format!("b{i}"))])
            .await
            .unwrap();
    }
    let started = Instant::now();
    cluster.restart(2).await;
    let readiness = cluster.node(2).cluster.watch_readiness();
    let mut reasons_seen = BTreeSet::new();
    wait_for(
        Duration::from_secs(30),
        "the restarted node to be ready",
        || {
            let readiness = readiness.borrow().clone();
            for reason in &readiness.reasons {
                reasons_seen.insert(reason.split(':').next().unwrap_or("").to_owned());
            }
            async move {
                if readiness.ready {
                    Ok(())
                } else {
                    Err(format!("not ready: {:?}", readiness.reasons))
                }
            }
        },
    )
    .await;
    // Rows only ever grow, so whatever it holds now it held at least when it became ready.
    let held = count(&cluster, 2).await;
    assert_eq!(
        held,
        500,
        "ready after {:?} while holding {held} of 500 rows; reasons seen before: {reasons_seen:?}",
        started.elapsed()
    );
    let step = cluster.node(2).cluster.view().step;
    assert!(step.joined && step.caught_up, "{step:?}");
    assert_eq!((step.known, step.known_live), (2, 2), "{step:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_set_to_refuse_writes_until_in_step_refuses_them_naming_what_it_waits_for() {
    let mut cluster = TestCluster::start(2, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    cluster.nodes[1].config.api.writes_before_caught_up = false;
    cluster.stop(0).await;
    cluster.stop(1).await;

    // Node 1 comes back while the only member it knew is still down.
    cluster.restart(1).await;
    let client = cluster.client(1).await;
    let refused = client.transact(vec![insert("early")]).await;
    match refused {
        Err(ClientError::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("joining"), "{}", status.message());
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    let health = client.health().await.unwrap();
    assert!(!health.ready, "{health:?}");
    assert!(
        health
            .not_ready_reasons
            .iter()
            .any(|r| r.contains("joining")),
        "{health:?}"
    );
    assert_eq!(
        count(&cluster, 1).await,
        0,
        "a refused write changed nothing"
    );

    // Once the member is back, the node joins, catches up, and takes writes.
    cluster.restart(0).await;
    wait_for(Duration::from_secs(30), "node 1 to take writes", || async {
        match client.transact(vec![insert("later")]).await {
            Ok(_) => Ok(()),
            Err(err) => Err(format!("{err}")),
        }
    })
    .await;
    cluster.shutdown().await;
}
