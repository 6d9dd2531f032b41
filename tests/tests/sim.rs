//! The cluster cores in the deterministic simulator: membership forms, every node receives every
//! change, with loss and with a partition that heals. Each test prints its seed on failure;
//! `SIM_SEED` replays one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use strata_common::cluster::ClusterConfig;
use strata_tests::sim::{NetConfig, Sim};

fn seed() -> u64 {
    std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001)
}

fn converge(sim: &mut Sim, budget: Duration) {
    let done = sim.run_until(budget, Duration::from_millis(250), |s| {
        s.lacking().is_empty()
    });
    assert!(
        done,
        "seed {}: after {:?}, {} of {} nodes still lack versions (node, lacking): {:?}",
        sim.seed(),
        sim.now(),
        sim.lacking().len(),
        sim.len(),
        &sim.lacking()[..sim.lacking().len().min(10)]
    );
}

fn members_formed(sim: &mut Sim, budget: Duration) {
    let n = sim.len();
    let done = sim.run_until(budget, Duration::from_millis(250), |s| {
        (0..n).all(|i| s.live_seen_by(i) == n - 1)
    });
    let seen: Vec<usize> = (0..n).map(|i| sim.live_seen_by(i)).collect();
    assert!(
        done,
        "seed {}: membership did not form: {:?}",
        sim.seed(),
        &seen[..n.min(20)]
    );
}

#[test]
fn ten_nodes_deliver_every_change_once_by_direct_push() {
    let mut sim = Sim::new(
        10,
        ClusterConfig::default(),
        NetConfig::default(),
        seed(),
        false,
    );
    members_formed(&mut sim, Duration::from_secs(20));
    for i in 0..200 {
        sim.write(i % 10);
        sim.run_for(Duration::from_millis(5));
    }
    converge(&mut sim, Duration::from_secs(5));
    // Direct push: each node got each change exactly once (none were lost, none forwarded).
    for node in 0..10 {
        let expected = 200 - 20; // its own 20 writes are not pushed to itself
        assert_eq!(
            sim.copies(node),
            expected,
            "seed {}: node {node} copies",
            sim.seed()
        );
    }
}

#[test]
fn a_thousand_nodes_each_receive_every_change_with_loss_and_a_healed_partition() {
    let n = 1000;
    let net = NetConfig {
        loss: 0.02,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(n, ClusterConfig::default(), net, seed(), true);
    // Writes while everyone is connected, with 2% packet loss.
    for i in 0..50 {
        sim.write((i * 37) % n);
        sim.run_for(Duration::from_millis(20));
    }
    // A partition splits the cluster in two while both halves keep writing.
    sim.partition((0..n).map(|i| u32::from(i >= n / 2)).collect());
    for i in 0..50 {
        sim.write((i * 53) % n);
        sim.run_for(Duration::from_millis(20));
    }
    sim.run_for(Duration::from_secs(1));
    assert!(
        !sim.lacking().is_empty(),
        "seed {}: the partition cut nothing",
        sim.seed()
    );
    sim.heal();
    converge(&mut sim, Duration::from_secs(60));
    assert_eq!(sim.written(), 100);
}
