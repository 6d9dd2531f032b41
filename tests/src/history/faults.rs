//! The history test's faults: a seeded schedule of kill -9 and restart on the same address,
//! restart with a wiped data directory, and partitions (when namespaces are available), and the
//! driver that injects them one at a time while the workload runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::netns::Netns;
use super::record::{FaultEvent, Recorder};
use crate::procs::ProcCluster;

/// One kind of fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// kill -9 the node, then start it again on its ports and data.
    Kill(usize),
    /// kill -9 the node, delete its data directory, start it again empty on its ports.
    Wipe(usize),
    /// Cut these nodes off from the others (clients still reach every node).
    Partition(Vec<usize>),
}

/// A fault at a time of the run.
#[derive(Debug, Clone)]
pub struct Step {
    /// When to inject it, from the start of the workload.
    pub at: Duration,
    /// What to inject.
    pub fault: Fault,
    /// How long the node stays down, or the partition stays in place.
    pub hold: Duration,
}

/// `count` faults spread over the middle of a `workload`-long run on `nodes` nodes. The first
/// ones are one of each kind (kill, wipe, and partition when `partitions`), in a seeded order,
/// so even a short run injects every kind.
pub fn schedule(
    seed: u64,
    nodes: usize,
    workload: Duration,
    count: usize,
    partitions: bool,
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
    let mut kinds: Vec<u8> = if partitions {
        vec![0, 1, 2]
    } else {
        vec![0, 1]
    };
    kinds.shuffle(&mut rng);
    while kinds.len() < count {
        let kinds_max = if partitions { 3 } else { 2 };
        kinds.push(rng.random_range(0..kinds_max));
    }
    let begin = workload.mul_f64(0.1);
    let slot = workload.mul_f64(0.75) / u32::try_from(kinds.len()).unwrap_or(1);
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let node = rng.random_range(0..nodes);
            let hold_max = slot.mul_f64(0.5).max(Duration::from_millis(400));
            let hold = Duration::from_millis(
                rng.random_range(300..=u64::try_from(hold_max.as_millis()).unwrap_or(300).max(300)),
            )
            .min(Duration::from_secs(4));
            let fault = match kind {
                0 => Fault::Kill(node),
                1 => Fault::Wipe(node),
                _ => {
                    let mut all: Vec<usize> = (0..nodes).collect();
                    all.shuffle(&mut rng);
                    let size = rng.random_range(1..=((nodes - 1) / 2).max(1));
                    all.truncate(size);
                    all.sort_unstable();
                    Fault::Partition(all)
                }
            };
            Step {
                at: begin + slot * u32::try_from(i).unwrap_or(0),
                fault,
                hold,
            }
        })
        .collect()
}

/// Injects `steps` in order on `cluster` (blocking; run it off the async runtime), recording each
/// in `recorder` and counting wipes in `epochs`. A step is waited for until its time; a step
/// whose time is past `end` is skipped. Every fault is healed before the next begins.
pub fn drive(
    cluster: &mut ProcCluster,
    net: Option<&Netns>,
    steps: &[Step],
    recorder: &Recorder,
    epochs: &[AtomicUsize],
    end: Duration,
) {
    for step in steps {
        if step.at > end {
            break;
        }
        // The schedule's own clock: faults are injected at seeded times, not waited on.
        if let Some(wait) = step.at.checked_sub(recorder.now()) {
            std::thread::sleep(wait);
        }
        let start = recorder.now();
        let what = match &step.fault {
            Fault::Kill(node) => {
                cluster.kill(*node);
                std::thread::sleep(step.hold);
                cluster.restart(*node);
                format!("kill -9 node {node}, down {:?}, restart", step.hold)
            }
            Fault::Wipe(node) => {
                cluster.kill(*node);
                cluster.wipe(*node);
                epochs[*node].fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(step.hold);
                cluster.restart(*node);
                format!(
                    "kill -9 node {node}, wipe its data, down {:?}, restart empty",
                    step.hold
                )
            }
            Fault::Partition(side) => {
                let net = net.expect("partitions are scheduled only with namespaces");
                net.partition(side)
                    .unwrap_or_else(|e| panic!("partition {side:?}: {e}"));
                std::thread::sleep(step.hold);
                net.heal().unwrap_or_else(|e| panic!("heal: {e}"));
                format!("partition {side:?} from the rest for {:?}", step.hold)
            }
        };
        let event = FaultEvent {
            start,
            end: recorder.now(),
            what,
        };
        eprintln!(
            "history: fault [{:.3}s..{:.3}s] {}",
            event.start.as_secs_f64(),
            event.end.as_secs_f64(),
            event.what
        );
        recorder.fault(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schedule_has_a_kill_and_a_wipe_and_a_partition_when_namespaces_exist() {
        for seed in 0..200 {
            for partitions in [false, true] {
                let steps = schedule(seed, 3, Duration::from_secs(30), 3, partitions);
                let has = |f: fn(&Fault) -> bool| steps.iter().any(|s| f(&s.fault));
                assert!(
                    has(|f| matches!(f, Fault::Kill(_))),
                    "seed {seed}: {steps:?}"
                );
                assert!(
                    has(|f| matches!(f, Fault::Wipe(_))),
                    "seed {seed}: {steps:?}"
                );
                assert_eq!(
                    has(|f| matches!(f, Fault::Partition(_))),
                    partitions,
                    "seed {seed}: {steps:?}"
                );
                for pair in steps.windows(2) {
                    assert!(
                        pair[0].at + pair[0].hold < pair[1].at,
                        "seed {seed}: {steps:?}"
                    );
                }
                assert!(steps.iter().all(|s| s.at < Duration::from_secs(30)));
                for step in &steps {
                    if let Fault::Partition(side) = &step.fault {
                        assert!(!side.is_empty() && side.len() < 3, "seed {seed}: {side:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn one_seed_gives_one_schedule() {
        let a = schedule(7, 5, Duration::from_secs(240), 20, true);
        let b = schedule(7, 5, Duration::from_secs(240), 20, true);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(a.len(), 20);
    }
}
