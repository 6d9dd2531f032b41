//! In-process clusters of real nodes (store, QUIC, SWIM, gRPC) on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use strata_common::store::{Statement, Value};
use strata_tests::cluster::metric;
use strata_tests::cluster::{TestCluster, wait_for};

fn upsert(id: &str, app: &str, state: &str, port: i64) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state, port) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET app = excluded.app, state = excluded.state,
         port = excluded.port",
        vec![
            Value::Text(id.into()),
            Value::Text(app.into()),
            Value::Text(state.into()),
            Value::Integer(port),
        ],
    )
}

/// Random upserts and deletes of a few Machines through random nodes' gRPC APIs.
async fn random_writes(cluster: &TestCluster, writes: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let running = cluster.running();
    let mut clients = Vec::new();
    for i in &running {
        clients.push(cluster.client(*i).await);
    }
    for w in 0..writes {
        let client = &clients[rng.random_range(0..clients.len())];
        let id = format!("m{}", rng.random_range(0..40));
        let statement = if rng.random_range(0..10) == 0 {
            Statement::with_params("DELETE FROM machines WHERE id = ?1", vec![Value::Text(id)])
        } else {
            let state = ["created", "started", "stopped"][rng.random_range(0..3)];
            upsert(
                &id,
                &format!("app{}", rng.random_range(0..5)),
                state,
                w as i64,
            )
        };
        client.transact(vec![statement]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_after_random_writes_through_random_nodes() {
    let cluster = TestCluster::start(3, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    random_writes(&cluster, 300, 1).await;
    cluster.wait_converged(Duration::from_secs(20)).await;
    let rows = cluster
        .store(2)
        .query("SELECT count(*) FROM machines", &[])
        .unwrap();
    assert!(matches!(rows.rows[0][0], Value::Integer(n) if n > 0));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_converge_after_random_writes_through_random_nodes() {
    let cluster = TestCluster::start(10, "ams").await;
    cluster.wait_members(Duration::from_secs(30)).await;
    random_writes(&cluster, 300, 2).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_while_others_write_converges_after_the_partition_heals() {
    let cluster = TestCluster::start(3, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    // Cut node 2 off from both others, in both directions.
    let (a, b, c) = (
        cluster.gossip_addr(0),
        cluster.gossip_addr(1),
        cluster.gossip_addr(2),
    );
    cluster.node(0).cluster.faults().block(c);
    cluster.node(1).cluster.faults().block(c);
    cluster.node(2).cluster.faults().block(a);
    cluster.node(2).cluster.faults().block(b);
    let writer = cluster.client(0).await;
    let isolated = cluster.client(2).await;
    for i in 0..50 {
        writer
            .transact(vec![upsert(&format!("a{i}"), "web", "started", i)])
            .await
            .unwrap();
        isolated
            .transact(vec![upsert(&format!("c{i}"), "db", "started", i)])
            .await
            .unwrap();
    }
    // The cut is real: node 2 holds none of node 0's writes, and is seen as gone.
    wait_for(
        Duration::from_secs(20),
        "node 2 to be declared down",
        || async {
            let seen = cluster.node(0).cluster.view().members.len();
            if seen == 1 {
                Ok(())
            } else {
                Err(format!("node 0 sees {seen} members"))
            }
        },
    )
    .await;
    let at_c = cluster
        .store(2)
        .query("SELECT count(*) FROM machines WHERE id LIKE 'a%'", &[])
        .unwrap();
    assert_eq!(at_c.rows[0][0], Value::Integer(0));
    for i in 0..3 {
        cluster.node(i).cluster.faults().clear();
    }
    cluster.wait_members(Duration::from_secs(30)).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    let total = cluster
        .store(2)
        .query("SELECT count(*) FROM machines", &[])
        .unwrap();
    assert_eq!(total.rows[0][0], Value::Integer(100));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_joining_a_cluster_with_100k_rows_catches_up_completely() {
    let mut cluster = TestCluster::start(2, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let rows = 100_000;
    for start in (0..rows).step_by(2_000) {
        let statements = (start..start + 2_000)
            .map(|i| {
                upsert(
                    &format!("machine-{i:06}"),
                    &format!("app-{}", i % 300),
                    "started",
                    i as i64,
                )
            })
            .collect();
        cluster.store(0).transact(statements).await.unwrap();
    }
    cluster.wait_converged(Duration::from_secs(120)).await;
    let started = Instant::now();
    let fresh = cluster.add_node(|_| {}).await;
    wait_for(
        Duration::from_secs(120),
        "the fresh node to hold every row",
        || async {
            let count = cluster
                .store(fresh)
                .query("SELECT count(*) FROM machines", &[])
                .unwrap();
            if count.rows[0][0] == Value::Integer(rows as i64) {
                Ok(())
            } else {
                Err(format!("{:?} rows", count.rows[0][0]))
            }
        },
    )
    .await;
    eprintln!(
        "fresh node caught up with {rows} rows in {:?}",
        started.elapsed()
    );
    cluster.wait_converged(Duration::from_secs(60)).await;
    let health = cluster.client(fresh).await.health().await.unwrap();
    assert!(health.caught_up, "{health:?}");
    assert_eq!(health.gaps, 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_of_another_ca_or_region_cannot_join() {
    let cluster = TestCluster::start(2, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let bootstrap = vec![cluster.gossip_addr(0).to_string()];
    // Another CA, same region and names.
    let rogue_dir = cluster.dir.path().join("rogue");
    let rogue_ca = strata_tests::cluster::Certs::new(&rogue_dir, "rogue CA");
    let rogue = strata_tests::cluster::test_config(
        &rogue_dir,
        "ams-9",
        "ams",
        rogue_ca.node("ams-9", strata_common::transport::Tier::Regional, "ams"),
        bootstrap.clone(),
    );
    // The right CA, but another region.
    let other = strata_tests::cluster::test_config(
        cluster.dir.path(),
        "fra-1",
        "fra",
        cluster
            .certs
            .node("fra-1", strata_common::transport::Tier::Regional, "fra"),
        bootstrap,
    );
    let spec = strata_regional::spec();
    let rogue = strata_common::node::Node::start(rogue, spec.clone())
        .await
        .unwrap();
    let other = strata_common::node::Node::start(other, spec).await.unwrap();
    // Positive evidence first: the cluster refused their handshakes.
    wait_for(
        Duration::from_secs(20),
        "both intruders' handshakes to fail",
        || async {
            let failed: f64 = metric(
                &cluster.node(0).metrics.encode(),
                "strata_transport_handshakes_failed_total",
            );
            if failed >= 2.0 {
                Ok(())
            } else {
                Err(format!("{failed} failed handshakes"))
            }
        },
    )
    .await;
    for node in [&rogue, &other] {
        assert!(
            node.cluster.view().members.is_empty(),
            "an intruder sees members"
        );
    }
    for i in 0..2 {
        let members = cluster.node(i).cluster.view().members;
        assert_eq!(
            members.len(),
            1,
            "node {i} admitted an intruder: {members:?}"
        );
    }
    rogue.shutdown().await;
    other.shutdown().await;
    cluster.shutdown().await;
}

/// The value of a sample in an OpenMetrics exposition (0 when absent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_in_place_rejoins_and_catches_up() {
    let mut cluster = TestCluster::start(3, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    cluster.stop(2).await;
    let writer = cluster.client(0).await;
    for i in 0..100 {
        writer
            .transact(vec![upsert(&format!("m{i}"), "web", "started", i)])
            .await
            .unwrap();
    }
    cluster.restart(2).await;
    cluster.wait_members(Duration::from_secs(30)).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    // The old identity does not linger: each node sees exactly two others.
    for i in 0..3 {
        let members = cluster.node(i).cluster.view().members;
        assert_eq!(members.len(), 2, "node {i}: {members:?}");
    }
    cluster.shutdown().await;
}
