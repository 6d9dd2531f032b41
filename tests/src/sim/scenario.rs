//! The randomized fault scenario that CI runs over many seeds, and how a seed is chosen.
//!
//! One run: a cluster forms, then for a while nodes write while faults come and go at random
//! (packet loss throughout, partitions that heal, crashes followed by restarts, sync servers
//! that answer `Busy`); then the faults end and the run must become quiet within a budget:
//! every live node holds every written version, every node sees every other, and globald holds
//! the map derived from all writes with the publishers the rules choose. The checkers run at
//! every event meanwhile. Everything follows from the seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::publisher::PublishConfig;
use super::{NetConfig, Sim, SimConfig, SimStats};

/// The seeds a test runs: `SIM_SEED=<n>` replays exactly that one; otherwise `SIM_SEEDS=<count>`
/// (or `default`) seeds starting from `first`.
pub fn seeds(first: u64, default: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (first..first + count).collect()
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Nodes in the cluster.
    pub nodes: usize,
    /// How long writes and faults go on (virtual time).
    pub chaos: Duration,
    /// Time between two writes (each by a random live node).
    pub write_every: Duration,
    /// Packet loss, throughout.
    pub loss: f64,
    /// Partitions that heal.
    pub partitions: bool,
    /// Crashes followed by restarts.
    pub restarts: bool,
    /// Sync servers that answer `Busy` for a while.
    pub busy: bool,
    /// How long the run may take to become quiet once the faults end (virtual time).
    pub quiet_budget: Duration,
}

impl Scenario {
    /// The CI run: 20 nodes, a few seconds of faults.
    pub fn ci() -> Scenario {
        Scenario {
            nodes: 20,
            chaos: Duration::from_secs(6),
            write_every: Duration::from_millis(20),
            loss: 0.05,
            partitions: true,
            restarts: true,
            busy: true,
            quiet_budget: Duration::from_secs(60),
        }
    }

    /// The long run: more nodes, longer.
    pub fn long() -> Scenario {
        Scenario {
            nodes: 60,
            chaos: Duration::from_secs(40),
            ..Scenario::ci()
        }
    }
}

/// What a run that passed did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Versions written.
    pub written: usize,
    /// Virtual time it took to become quiet after the faults ended.
    pub quiet_after: Duration,
    /// Totals.
    pub stats: SimStats,
}

enum Undo {
    Heal,
    Restart(usize),
    Unbusy(usize),
}

/// Per step of the chaos phase: the chance of each fault starting.
const FAULT_CHANCE: f64 = 0.01;

/// Crashed nodes at most at once: a region that loses most of its nodes is another scenario.
const DOWN_MAX: usize = 2;

/// Runs `scenario` from `seed`; the error says what broke, when, and how to replay it.
pub fn run(seed: u64, scenario: &Scenario) -> Result<Outcome, String> {
    let config = SimConfig {
        net: NetConfig {
            loss: scenario.loss,
            encode: true,
            ..NetConfig::default()
        },
        publish: Some(PublishConfig::default()),
        ..SimConfig::default()
    };
    let n = scenario.nodes;
    let mut sim = Sim::new(n, config, seed);
    let mut rng = StdRng::seed_from_u64(seed.rotate_left(29) ^ 0x5ce7_a210);
    let step = scenario.write_every;
    let end = sim.now() + scenario.chaos;
    let mut undo: Vec<(Duration, Undo)> = Vec::new();
    let mut down = 0;
    while sim.now() < end && sim.violation().is_none() {
        let live: Vec<usize> = (0..n).filter(|i| sim.alive(*i)).collect();
        if !live.is_empty() {
            sim.write(live[rng.random_range(0..live.len())]);
        }
        let now = sim.now();
        if scenario.partitions && !sim.partitioned() && rng.random_bool(FAULT_CHANCE) {
            sim.partition((0..n).map(|_| u32::from(rng.random_bool(0.5))).collect());
            let after = Duration::from_millis(rng.random_range(300..2_000));
            undo.push((now + after, Undo::Heal));
        }
        if scenario.restarts && down < DOWN_MAX && rng.random_bool(FAULT_CHANCE) {
            let node = live[rng.random_range(0..live.len())];
            sim.crash(node);
            down += 1;
            let after = Duration::from_millis(rng.random_range(300..3_000));
            undo.push((now + after, Undo::Restart(node)));
        }
        if scenario.busy && rng.random_bool(FAULT_CHANCE) {
            let node = rng.random_range(0..n);
            sim.set_busy(node, true);
            let after = Duration::from_millis(rng.random_range(500..2_000));
            undo.push((now + after, Undo::Unbusy(node)));
        }
        sim.run_for(step);
        let now = sim.now();
        let (due, later): (Vec<_>, Vec<_>) = undo.into_iter().partition(|(at, _)| *at <= now);
        undo = later;
        for (_, action) in due {
            match action {
                Undo::Heal => sim.heal(),
                Undo::Restart(node) => {
                    sim.restart(node);
                    down -= 1;
                }
                Undo::Unbusy(node) => sim.set_busy(node, false),
            }
        }
    }
    // The faults end (loss stays): heal, restart, and wait for quiet.
    sim.heal();
    for (_, action) in undo {
        match action {
            Undo::Heal => {}
            Undo::Restart(node) => sim.restart(node),
            Undo::Unbusy(node) => sim.set_busy(node, false),
        }
    }
    let calm = sim.now();
    let quiet = sim.run_until(scenario.quiet_budget, Duration::from_millis(250), |s| {
        (0..n).all(|i| s.live_seen_by(i) == n - 1)
            && s.lacking().is_empty()
            && s.publish_problems().is_empty()
    });
    if let Some(violation) = sim.violation() {
        return Err(violation.to_string());
    }
    if !quiet {
        let lacking = sim.lacking();
        let seen: Vec<usize> = (0..n).map(|i| sim.live_seen_by(i)).collect();
        return Err(format!(
            "seed {seed} (replay with SIM_SEED={seed}): not quiet {:?} after the faults ended \
             (at {:?}): members seen per node {seen:?}; (node, versions lacking) {:?} of {} \
             written; publishing: {:?}; stats {:?}",
            scenario.quiet_budget,
            sim.now(),
            &lacking[..lacking.len().min(10)],
            sim.written(),
            sim.publish_problems(),
            sim.stats
        ));
    }
    Ok(Outcome {
        seed,
        written: sim.written(),
        quiet_after: sim.now() - calm,
        stats: sim.stats.clone(),
    })
}
