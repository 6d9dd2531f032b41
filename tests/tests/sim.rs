//! The real protocol code in the deterministic simulator: membership forms, every node receives
//! every change, with loss, partitions that heal, crashes and restarts and busy sync servers;
//! the checkers catch a broken invariant at the event; and CI runs the fault scenario over many
//! seeds. A failing seed prints itself; `SIM_SEED=<n>` replays exactly it and `SIM_SEEDS=<count>`
//! runs more.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use strata_common::store::{Change, Changeset, SiteId, Timestamp, Value};
use strata_tests::sim::publisher::PublishConfig;
use strata_tests::sim::scenario::{self, Scenario};
use strata_tests::sim::{NetConfig, Sim, SimConfig};

fn seed() -> u64 {
    scenario::seeds(0x5eed_0001, 1)[0]
}

fn converge(sim: &mut Sim, budget: Duration) {
    let done = sim.run_until(budget, Duration::from_millis(250), |s| {
        s.lacking().is_empty()
    });
    assert!(
        done,
        "seed {}: after {:?}, {} of {} nodes still lack versions (node, lacking): {:?}; \
         violation: {:?}",
        sim.seed(),
        sim.now(),
        sim.lacking().len(),
        sim.len(),
        &sim.lacking()[..sim.lacking().len().min(10)],
        sim.violation().map(ToString::to_string),
    );
}

fn members_formed(sim: &mut Sim, budget: Duration) {
    let n = sim.len();
    let done = sim.run_until(budget, Duration::from_millis(250), |s| {
        (0..n).all(|i| !s.alive(i) || s.live_seen_by(i) == n - 1)
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
    let mut sim = Sim::new(10, SimConfig::default(), seed());
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
    assert_eq!(sim.apply_dropped(), 0, "seed {}", sim.seed());
}

#[test]
fn a_thousand_nodes_each_receive_every_change_with_loss_and_a_healed_partition() {
    let n = 1000;
    let config = SimConfig {
        net: NetConfig {
            loss: 0.02,
            ..NetConfig::default()
        },
        known_members: true,
        ..SimConfig::default()
    };
    let mut sim = Sim::new(n, config, seed());
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

#[test]
fn a_restarted_node_rejoins_with_a_higher_incarnation_and_catches_up_on_what_it_missed() {
    let mut sim = Sim::new(8, SimConfig::default(), seed());
    members_formed(&mut sim, Duration::from_secs(20));
    sim.write(3);
    sim.run_for(Duration::from_millis(50));
    sim.crash(3);
    for i in 0..40 {
        sim.write([0, 1, 2, 4, 5, 6, 7][i % 7]);
        sim.run_for(Duration::from_millis(10));
    }
    // The others declare it down; its writes from before are still held everywhere.
    let down = sim.run_until(Duration::from_secs(30), Duration::from_millis(100), |s| {
        (0..8).filter(|i| *i != 3).all(|i| s.live_seen_by(i) == 6)
    });
    assert!(down, "seed {}: node 3 was never declared down", sim.seed());
    let before = sim.replica(3).versions();
    sim.restart(3);
    members_formed(&mut sim, Duration::from_secs(30));
    converge(&mut sim, Duration::from_secs(30));
    assert_eq!(
        before,
        1,
        "seed {}: node 3 held only its own write",
        sim.seed()
    );
    assert_eq!(sim.replica(3).versions(), 41, "seed {}", sim.seed());
    assert_eq!(sim.stats.restarts, 1);
    assert!(sim.violation().is_none(), "{:?}", sim.violation());
}

#[test]
fn a_busy_sync_server_answers_busy_and_the_client_gets_its_versions_from_another() {
    let mut sim = Sim::new(6, SimConfig::default(), seed());
    members_formed(&mut sim, Duration::from_secs(20));
    // Node 5 misses everything written while it is cut off; node 0 answers every sync `Busy`.
    sim.partition(vec![0, 0, 0, 0, 0, 1]);
    for i in 0..30 {
        sim.write(i % 5);
        sim.run_for(Duration::from_millis(5));
    }
    sim.set_busy(0, true);
    sim.heal();
    converge(&mut sim, Duration::from_secs(30));
    assert!(
        sim.stats.syncs_busy > 0,
        "seed {}: no sync was answered busy: {:?}",
        sim.seed(),
        sim.stats
    );
}

#[test]
fn a_forged_version_stops_the_run_at_its_apply_naming_seed_time_node_and_version() {
    let mut sim = Sim::new(3, SimConfig::default(), seed());
    members_formed(&mut sim, Duration::from_secs(20));
    let forged = Changeset {
        site: SiteId([9; 16]),
        version: 7,
        ts: Timestamp::from_millis(1),
        seq_first: 0,
        seq_last: 0,
        last_seq: 0,
        changes: vec![Change {
            table: "machines".into(),
            pk: vec![1],
            column: Some("app".into()),
            value: Value::Text("forged".into()),
            cl: 1,
            seq: 0,
        }],
    };
    sim.receive(1, 0, vec![forged]);
    sim.run_for(Duration::from_secs(1));
    let violation = sim.violation().expect("the forged version is caught");
    assert_eq!(violation.node, 1);
    assert_eq!(violation.seed, sim.seed());
    let text = violation.to_string();
    assert!(
        text.contains("version 7 which nobody wrote") && text.contains("SIM_SEED="),
        "{text}"
    );
    // The run stopped at the event: time did not go on to the end of the second.
    assert!(sim.now() < Duration::from_secs(1) + violation.at, "{text}");
}

#[test]
fn globald_ends_with_the_map_of_all_writes_and_the_lowest_named_live_nodes_publish() {
    let config = SimConfig {
        publish: Some(PublishConfig::default()),
        ..SimConfig::default()
    };
    let mut sim = Sim::new(6, config, seed());
    members_formed(&mut sim, Duration::from_secs(20));
    for i in 0..60 {
        sim.write(i % 6);
        sim.run_for(Duration::from_millis(10));
    }
    // The first publisher dies: the third name takes its place.
    sim.crash(0);
    for i in 0..30 {
        sim.write(1 + i % 5);
        sim.run_for(Duration::from_millis(10));
    }
    let quiet = sim.run_until(Duration::from_secs(30), Duration::from_millis(250), |s| {
        s.lacking().is_empty() && s.publish_problems().is_empty()
    });
    assert!(
        quiet,
        "seed {}: {:?}; lacking {:?}",
        sim.seed(),
        sim.publish_problems(),
        sim.lacking()
    );
    let machines: u64 = sim.globald().map.values().map(|c| c.machines).sum();
    assert_eq!(machines, 90, "seed {}", sim.seed());
    assert!(sim.stats.publishes > 0);
}

fn run_seeds(seeds: &[u64], scenario: &Scenario) {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut restarts = 0;
    let mut busy = 0;
    let mut lost = 0;
    let mut written = 0;
    for &seed in seeds {
        match scenario::run(seed, scenario) {
            Ok(outcome) => {
                restarts += outcome.stats.restarts;
                busy += outcome.stats.syncs_busy;
                lost += outcome.stats.packets_lost;
                written += outcome.written;
            }
            Err(failure) => {
                eprintln!("FAILED {failure}");
                failures.push(failure);
            }
        }
    }
    eprintln!(
        "{} seeds of {} nodes in {:?}: {written} versions written, {restarts} restarts, \
         {busy} busy answers, {lost} packets lost",
        seeds.len(),
        scenario.nodes,
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed; the first: {}",
        failures.len(),
        seeds.len(),
        failures[0]
    );
    // The faults happened: a run without them would prove nothing.
    if seeds.len() >= 10 {
        assert!(restarts > 0 && busy > 0 && lost > 0 && written > 0);
    }
}

#[test]
fn fifty_seeds_of_twenty_nodes_with_loss_partitions_restarts_and_busy_servers_keep_every_invariant()
{
    run_seeds(&scenario::seeds(1, 50), &Scenario::ci());
}

#[test]
#[ignore = "long: more seeds, more nodes, longer runs (SIM_SEEDS=<count> for more)"]
fn many_long_seeds_of_sixty_nodes_keep_every_invariant() {
    run_seeds(&scenario::seeds(1_000, 200), &Scenario::long());
}
