//! Our own history checker on real `regiond` processes: a seeded mixed workload under kill -9,
//! wiped disks and (where network namespaces are available) partitions, then checks of the
//! recorded history and the converged state. The seed is printed; rerun a failure with
//! `STRATA_HISTORY_SEED=<seed>`. Needs `cargo build -p strata-regional` first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use strata_tests::history::{HistoryOptions, run, seed};

fn assert_clean(outcome: &strata_tests::history::Outcome, options: &HistoryOptions) {
    assert!(
        outcome.violations.is_empty(),
        "seed {}: {} violation(s) (printed above), of checks {:?}",
        options.seed,
        outcome.violations.len(),
        outcome
            .violations
            .iter()
            .map(|v| v.check)
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert_eq!(
        outcome.faults.len(),
        options.faults,
        "seed {}: not every scheduled fault was injected: {:?}",
        options.seed,
        outcome.faults
    );
    assert!(
        outcome.summary.acked > 0 && outcome.summary.reads > 0,
        "seed {}: the workload did nothing: {:?}",
        options.seed,
        outcome.summary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_kills_wipes_and_partitions_lose_no_acknowledged_write_and_end_identical()
{
    let options = HistoryOptions {
        nodes: 3,
        clients_per_node: 2,
        pace: Duration::from_millis(20),
        workload: Duration::from_secs(30),
        faults: 3,
        seed: seed(),
    };
    let outcome = run(&options).await;
    assert_clean(&outcome, &options);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: five nodes for minutes; run with --ignored"]
async fn five_nodes_under_many_faults_for_minutes_keep_every_history_property() {
    let options = HistoryOptions {
        nodes: 5,
        clients_per_node: 2,
        pace: Duration::from_millis(20),
        workload: Duration::from_secs(240),
        faults: 20,
        seed: seed(),
    };
    let outcome = run(&options).await;
    assert_clean(&outcome, &options);
}
