//! The store's metrics: its bookkeeping counters (commits, applied and refused changesets,
//! parked and waiting cells, sliced merges) and its head, exported as a [`MetricSource`] read
//! at scrape time, never copied on the writer's path. Node assembly registers it.

use crate::metrics::{MetricSource, Sample, SampleKind};

use super::Store;

/// The store's counters and gauges ([`Store::stats`], [`Store::head`]), read at scrape time.
#[derive(Debug)]
pub struct StoreSource(pub Store);

impl MetricSource for StoreSource {
    fn collect(&self) -> Vec<Sample> {
        let s = self.0.stats();
        let counter = |name, help, value: u64| Sample {
            name,
            help,
            kind: SampleKind::Counter,
            value: value as f64,
        };
        vec![
            counter(
                "strata_store_commits",
                "Group commits of the store's writer.",
                s.commits_total,
            ),
            counter(
                "strata_store_local_versions",
                "Local versions committed.",
                s.local_versions_total,
            ),
            counter(
                "strata_store_applied_versions",
                "Remote versions applied.",
                s.applied_versions_total,
            ),
            counter(
                "strata_store_duplicate_changesets",
                "Remote changesets already held.",
                s.duplicates_total,
            ),
            counter(
                "strata_store_rejected_changesets",
                "Remote changesets refused as malformed.",
                s.rejected_total,
            ),
            counter(
                "strata_store_buffered_chunks",
                "Chunks buffered as parts of incomplete versions.",
                s.buffered_chunks_total,
            ),
            counter(
                "strata_store_parked_changes",
                "Changes parked for an unknown table or column.",
                s.parked_total,
            ),
            counter(
                "strata_store_merged_changes",
                "Remote changes merged.",
                s.merged_changes_total,
            ),
            counter(
                "strata_store_far_future_timestamps",
                "Remote timestamps far ahead of the wall clock.",
                s.far_future_total,
            ),
            counter(
                "strata_store_stopped_statements",
                "Client statements stopped for their deadline, their caller leaving or shutdown.",
                s.stopped_total,
            ),
            counter(
                "strata_store_waiting_cells",
                "Remote cells that arrived before the row event of their row life and waited.",
                s.waiting_total,
            ),
            Sample {
                name: "strata_store_waiting_cells_now",
                help: "Cells waiting for the row event of their row life now.",
                kind: SampleKind::Gauge,
                value: s.waiting_now as f64,
            },
            counter(
                "strata_store_sliced_versions",
                "Large remote versions merged in slices with client reads pinned.",
                s.sliced_versions_total,
            ),
            counter(
                "strata_store_slices",
                "Slices committed for large remote versions.",
                s.slices_total,
            ),
            Sample {
                name: "strata_store_sliced_pending",
                help: "Large remote versions waiting for or in a sliced merge.",
                kind: SampleKind::Gauge,
                value: s.sliced_pending as f64,
            },
            Sample {
                name: "strata_store_head",
                help: "This node's latest version.",
                kind: SampleKind::Gauge,
                value: self.0.head() as f64,
            },
        ]
    }
}
