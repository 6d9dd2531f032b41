//! Recovery after a restart. A `regiond` killed with SIGKILL and restarted on the same address
//! hears its peers' pushes again at once: the survivors drop their connections to the dead
//! process (the new process dials them, or answers their next packet with a stateless reset)
//! instead of sending into them until the idle timeout. Ready means in step: a restarted node
//! finds the members it knew, catches up with what they held, and only then says it is ready; a
//! node told to refuse writes until then says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use strata_client::{Client, ClientError};
use strata_common::store::{Statement, Value};
use strata_tests::cluster::{TestCluster, wait_for};
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

async fn count(client: &Client) -> i64 {
    let rows = client
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
    let held = count(&cluster.client(2).await).await;
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
        count(&cluster.client(1).await).await,
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
        let held = count(&cluster.client(2).await).await;
        if held == written {
            Ok(())
        } else {
            Err(format!("node 2 holds {held} of {written}"))
        }
    })
    .await;
}
