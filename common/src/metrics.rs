//! The node's Prometheus metrics registry and what every layer's metrics are made of: one
//! [`MetricsRegistry`] per node, built on an explicit `prometheus-client` [`Registry`], so
//! several nodes in one test process never share a series.
//!
//! Each layer owns its series in a struct of its own, registered through a [`MetricsBuilder`]:
//! the API's in `api::metrics`, readiness's in `readiness`, the certificates' in
//! `transport::metrics`, the cluster driver's in `cluster::metrics`. Counters and gauges
//! kept elsewhere (the store's bookkeeping, the transport's path statistics) are exported
//! through [`MetricSource`]s (`store::metrics`, `transport::metrics`): read at scrape time,
//! never copied on a hot path. Node assembly (`node::NodeMetrics`) is the one place that
//! registers them all. This module owns the shared label and sample types, the naming rules,
//! and the OpenMetrics text exposition ([`MetricsRegistry::encode`]).
//!
//! Rules it keeps:
//! - Every name starts with `strata_`, carries its base unit (`_seconds`, `_bytes`) and, for
//!   counters, ends in `_total` (added by `prometheus-client`, never by hand).
//! - Labels are low-cardinality by construction: enums, or `&'static str` values that callers
//!   take from a fixed list. Never a key, a site id, a peer address or an error string.
//! - No globals: nothing here registers with a process-wide registry.
//!
//! It must not do I/O, spawn tasks or block: updating a metric is an atomic operation, and a
//! scrape only takes the short [`std::sync::Mutex`] around the list of sources (never held across
//! an `.await`, never held while a source is read). It knows nothing of HTTP; `admin` serves it.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};

/// The prefix of every metric name (the registry adds the `_`).
const PREFIX: &str = "strata";

/// Upper bounds of the cluster's `apply_seconds` and the API's request durations, 0.1 ms to
/// 10 s: 1-2.5-5 steps per decade (about ×2.15 each), so the `le` labels stay readable.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Labels of the `*_dropped` families: `reason`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why it was dropped: a short snake_case word from a fixed list owned by the caller
    /// (`queue_full`, `oversized`, `decode`, ...). Never an error message.
    pub reason: &'static str,
}

impl ReasonLabel {
    /// `reason="<reason>"`; `reason` comes from a fixed list (see [`ReasonLabel::reason`]).
    pub fn new(reason: &'static str) -> ReasonLabel {
        ReasonLabel { reason }
    }
}

/// Labels of `strata_build_info`: per-process constants, so one series per process.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildInfoLabels {
    version: &'static str,
    node: String,
    tier: String,
    region: String,
}

/// Whether a [`Sample`] is a counter or a gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    /// Only goes up (restarts from zero when the process does); exposed with `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One value read from a [`MetricSource`] at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The exposed name, with the `strata_` prefix (so that a name seen on a dashboard can be
    /// found in the code), its base unit last and, for a counter, without `_total` (added):
    /// `strata_store_wal_bytes`, `strata_store_commits`. It must match `strata_[a-z0-9_]+`
    /// and be unique in the exposition; a sample that breaks a rule is left out of the scrape
    /// and logged.
    pub name: &'static str,
    /// One line saying what it counts.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: SampleKind,
    /// The value now. A counter must be finite and not negative, or it is left out.
    pub value: f64,
}

/// Something that owns counters or gauges kept elsewhere and reports them at scrape time.
///
/// `collect` runs on the scraping task: it must be quick and must not block (read atomics or
/// a snapshot, never a lock held by a hot path for long, never the database), and it must not
/// call back into the registry.
pub trait MetricSource: Send + Sync + fmt::Debug {
    /// The current values.
    fn collect(&self) -> Vec<Sample>;
}

/// A source shared with the code that updates it.
impl<T: MetricSource> MetricSource for Arc<T> {
    fn collect(&self) -> Vec<Sample> {
        (**self).collect()
    }
}

/// A fresh histogram with [`SECONDS_BUCKETS`], for families of durations.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// Locks the source list. Poisoning is ignored: a push cannot leave the list half-written.
fn lock_sources(
    sources: &Mutex<Vec<Arc<dyn MetricSource>>>,
) -> std::sync::MutexGuard<'_, Vec<Arc<dyn MetricSource>>> {
    sources.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where each layer registers its series while a node is assembled: it remembers their exposed
/// family names, so that no two layers (and no [`MetricSource`]) expose the same one.
pub struct MetricsBuilder {
    registry: Registry,
    /// Family names as exposed, without the prefix: `members`, `apply_seconds`.
    names: HashSet<String>,
}

impl MetricsBuilder {
    /// A builder whose registry already holds `strata_build_info{version,node,tier,region} 1`.
    /// `node`, `tier` and `region` are constants of the process, so they appear there only.
    pub fn new(node: &str, tier: &str, region: &str) -> MetricsBuilder {
        let mut b = MetricsBuilder {
            registry: Registry::with_prefix(PREFIX),
            names: HashSet::new(),
        };
        let build_info = b.add(
            "build_info",
            "Build and identity of this process (always 1)",
            Family::<BuildInfoLabels, Gauge>::default(),
        );
        build_info
            .get_or_create(&BuildInfoLabels {
                version: env!("CARGO_PKG_VERSION"),
                node: node.to_owned(),
                tier: tier.to_owned(),
                region: region.to_owned(),
            })
            .set(1);
        b
    }

    /// Registers `metric` as `strata_<name>` and returns it (a handle to the same series).
    pub fn add<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        let fresh = self.names.insert(name.to_owned());
        debug_assert!(fresh, "metric {name} registered twice");
        self.registry.register(name, help, metric.clone());
        metric
    }

    /// Registers `metric` as `strata_<name>_<unit>` and returns it.
    pub fn add_with_unit<M: Metric + Clone>(
        &mut self,
        name: &str,
        help: &str,
        unit: Unit,
        metric: M,
    ) -> M {
        let fresh = self.names.insert(format!("{name}_{}", unit.as_str()));
        debug_assert!(fresh, "metric {name} registered twice");
        self.registry
            .register_with_unit(name, help, unit, metric.clone());
        metric
    }

    /// Registers a collector that exposes the family `strata_<exposed>`.
    pub fn add_collector(&mut self, exposed: &str, collector: Box<dyn Collector>) {
        let fresh = self.names.insert(exposed.to_owned());
        debug_assert!(fresh, "metric {exposed} registered twice");
        self.registry.register_collector(collector);
    }

    /// Adds the collector of the [`MetricSource`]s and returns the finished registry.
    pub fn finish(mut self) -> MetricsRegistry {
        let sources = Arc::new(Mutex::new(Vec::new()));
        // Last, so that `reserved` holds every other name.
        self.registry.register_collector(Box::new(SourceCollector {
            sources: Arc::clone(&sources),
            reserved: self.names,
        }));
        MetricsRegistry {
            registry: self.registry,
            sources,
        }
    }
}

/// Every series of one node, as the layers registered them, and the sources read at scrape
/// time: what `/metrics` renders. Share it as `Arc<MetricsRegistry>`.
#[derive(Debug)]
pub struct MetricsRegistry {
    /// Every layer's families, `strata_build_info` and the collectors; immutable once built.
    registry: Registry,
    /// The sources added with [`MetricsRegistry::add_source`], shared with their collector.
    sources: Arc<Mutex<Vec<Arc<dyn MetricSource>>>>,
}

impl MetricsRegistry {
    /// Exports the samples of `source`, read at every scrape from now on.
    pub fn add_source(&self, source: Box<dyn MetricSource>) {
        lock_sources(&self.sources).push(Arc::from(source));
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    ///
    /// Encoding into a `String` fails only if a metric refuses to encode, which none here
    /// does; if it ever happens the failure is logged and an empty exposition returned, rather
    /// than a truncated one that a scraper would misread.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            Ok(()) => out,
            Err(error) => {
                tracing::error!(%error, "could not encode the metrics");
                "# EOF\n".to_owned()
            }
        }
    }
}

/// Reads every [`MetricSource`] at scrape time.
#[derive(Debug)]
struct SourceCollector {
    sources: Arc<Mutex<Vec<Arc<dyn MetricSource>>>>,
    /// Names of the registered families, which a sample may not reuse.
    reserved: HashSet<String>,
}

impl Collector for SourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        // Copy the handles so that no lock is held while the sources are read.
        let sources: Vec<Arc<dyn MetricSource>> = lock_sources(&self.sources).clone();
        let mut seen: HashSet<&'static str> = HashSet::new();
        for source in &sources {
            for sample in source.collect() {
                let name = match self.check(&sample, &seen) {
                    Ok(name) => name,
                    Err(problem) => {
                        tracing::warn!(
                            name = sample.name,
                            ?source,
                            problem,
                            "metric sample left out of the scrape"
                        );
                        continue;
                    }
                };
                seen.insert(name);
                match sample.kind {
                    SampleKind::Counter => {
                        let counter = ConstCounter::new(sample.value);
                        let metric_encoder = encoder.encode_descriptor(
                            name,
                            sample.help,
                            None,
                            counter.metric_type(),
                        )?;
                        counter.encode(metric_encoder)?;
                    }
                    SampleKind::Gauge => {
                        let gauge = ConstGauge::new(sample.value);
                        let metric_encoder = encoder.encode_descriptor(
                            name,
                            sample.help,
                            None,
                            gauge.metric_type(),
                        )?;
                        gauge.encode(metric_encoder)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl SourceCollector {
    /// The name to encode (without the prefix, which the registry adds), or why `sample`
    /// cannot be exposed.
    fn check(
        &self,
        sample: &Sample,
        seen: &HashSet<&'static str>,
    ) -> Result<&'static str, &'static str> {
        let Some(name) = sample
            .name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('_'))
        else {
            return Err("the name does not start with strata_");
        };
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        if name.is_empty() || !name.chars().all(valid) {
            return Err("the name is not snake_case ASCII");
        }
        if name.starts_with('_') || name.contains("__") || sample.help.contains('\n') {
            return Err("the name has a double underscore or the help a newline");
        }
        if sample.kind == SampleKind::Counter {
            if name.ends_with("_total") {
                return Err("a counter's name must not end in _total (it is added)");
            }
            if !sample.value.is_finite() || sample.value < 0.0 {
                return Err("a counter must be finite and not negative");
            }
        }
        if self.reserved.contains(name) || seen.contains(name) {
            return Err("the name is already exposed");
        }
        Ok(name)
    }
}

/// Walks an exposition and returns how many counter families it has and every sample of a
/// counter family not named `<family>_total` (or `_created`). Shared with `admin`'s tests.
#[cfg(test)]
pub(crate) fn counter_samples_without_total(exposition: &str) -> (usize, Vec<&str>) {
    let mut family: Option<(&str, &str)> = None;
    let mut counters = 0;
    let mut offending = Vec::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest.split_once(' ');
            counters += usize::from(family.is_some_and(|(_, kind)| kind == "counter"));
        } else if !line.starts_with('#') {
            let series = line.split(['{', ' ']).next().unwrap_or_default();
            if let Some((name, "counter")) = family {
                let total = series.strip_prefix(name) == Some("_total");
                let created = series.strip_prefix(name) == Some("_created");
                if !total && !created {
                    offending.push(line);
                }
            }
        }
    }
    (counters, offending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metrics::{
        ClusterMetrics as Metrics, EventLabel, MemberEvent, Role, SyncLabels, SyncResult, Via,
        ViaLabel,
    };

    #[derive(Debug)]
    struct Fixed(Vec<Sample>);

    impl MetricSource for Fixed {
        fn collect(&self) -> Vec<Sample> {
            self.0.clone()
        }
    }

    /// A registry with the cluster's series, as a node registers them.
    fn registered(node: &str) -> (MetricsRegistry, Metrics) {
        let mut b = MetricsBuilder::new(node, "regional", "eu-west");
        let metrics = Metrics::register(&mut b);
        (b.finish(), metrics)
    }

    fn sample(name: &'static str, kind: SampleKind, value: f64) -> Sample {
        Sample {
            name,
            help: "A test sample.",
            kind,
            value,
        }
    }

    /// Every `# TYPE name kind` line of an exposition.
    fn families(text: &str) -> Vec<(&str, &str)> {
        text.lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            .collect()
    }

    #[test]
    fn exposition_has_every_metric_with_prefix_units_and_eof() {
        let (registry, metrics) = registered("n1");
        metrics
            .datagrams_dropped
            .get_or_create(&ReasonLabel {
                reason: "oversized",
            })
            .inc();
        metrics
            .broadcast_dropped
            .get_or_create(&ReasonLabel {
                reason: "queue_full",
            })
            .inc();
        metrics.apply_seconds.observe(0.003);
        let text = registry.encode();

        assert!(text.ends_with("# EOF\n"), "{text}");
        let names: Vec<&str> = families(&text).iter().map(|(name, _)| *name).collect();
        for expected in [
            "strata_build_info",
            "strata_members",
            "strata_member_events",
            "strata_swim_backlog",
            "strata_datagrams_sent",
            "strata_datagrams_received",
            "strata_datagrams_dropped",
            "strata_broadcast_changesets_sent",
            "strata_broadcast_sent_bytes",
            "strata_broadcast_dropped",
            "strata_changesets_received",
            "strata_changesets_received_bytes",
            "strata_changesets_duplicate",
            "strata_apply_batches",
            "strata_apply_batch_changesets",
            "strata_apply_seconds",
            "strata_apply_queue_depth",
            "strata_apply_dropped",
            "strata_replication_lag_seconds",
            "strata_replication_lag_max_seconds",
            "strata_sync_sessions",
            "strata_sync_sessions_active",
            "strata_peer_queue_depth",
            "strata_caught_up",
        ] {
            assert!(names.contains(&expected), "{expected} missing from\n{text}");
        }
        assert!(
            names.iter().all(|name| name.starts_with("strata_")),
            "{names:?}"
        );
        assert!(
            text.contains(&format!(
                "strata_build_info{{version=\"{}\",node=\"n1\",tier=\"regional\",region=\"eu-west\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(
            text.contains("# UNIT strata_apply_seconds seconds\n"),
            "{text}"
        );
        assert!(
            text.contains("strata_apply_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("strata_apply_batch_changesets_bucket{le=\"16384.0\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("strata_replication_lag_seconds_bucket{le=\"60.0\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn every_counter_sample_ends_in_total() {
        let (metrics, _) = registered("n1");
        metrics.add_source(Box::new(Fixed(vec![sample(
            "strata_wal_checkpoints",
            SampleKind::Counter,
            3.0,
        )])));
        let text = metrics.encode();
        let (counters, offending) = counter_samples_without_total(&text);
        assert!(counters > 10, "only {counters} counter families in\n{text}");
        assert!(offending.is_empty(), "{offending:?}");
        assert!(
            text.contains("strata_wal_checkpoints_total 3.0\n"),
            "{text}"
        );
    }

    #[test]
    fn fixed_label_combinations_start_at_zero_in_lower_case() {
        let text = registered("n1").0.encode();
        for line in [
            "strata_member_events_total{event=\"up\"} 0",
            "strata_member_events_total{event=\"down\"} 0",
            "strata_changesets_received_total{via=\"broadcast\"} 0",
            "strata_changesets_received_bytes_total{via=\"sync\"} 0",
            "strata_sync_sessions_total{role=\"client\",result=\"busy\"} 0",
            "strata_sync_sessions_total{role=\"server\",result=\"complete\"} 0",
            "strata_sync_sessions_active{role=\"server\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    #[test]
    fn updates_show_in_the_exposition() {
        let (registry, metrics) = registered("n1");
        metrics.members.set(4);
        metrics
            .member_events
            .get_or_create(&EventLabel {
                event: MemberEvent::Down,
            })
            .inc();
        metrics
            .bytes_received
            .get_or_create(&ViaLabel { via: Via::Sync })
            .inc_by(1500);
        metrics
            .sync_sessions
            .get_or_create(&SyncLabels {
                role: Role::Server,
                result: SyncResult::Partial,
            })
            .inc();
        metrics.apply_seconds.observe(0.0002);
        metrics.replication_lag_max_ms.set(1250);
        let text = registry.encode();
        for line in [
            "strata_members 4",
            "strata_member_events_total{event=\"down\"} 1",
            "strata_changesets_received_bytes_total{via=\"sync\"} 1500",
            "strata_sync_sessions_total{role=\"server\",result=\"partial\"} 1",
            "strata_apply_seconds_bucket{le=\"0.00025\"} 1",
            "strata_apply_seconds_count 1",
            "strata_replication_lag_max_seconds 1.25",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    #[test]
    fn nodes_in_one_process_do_not_share_series() {
        let (a, a_series) = registered("a");
        let (b, _) = registered("b");
        a_series.datagrams_sent.inc_by(7);
        assert!(a.encode().contains("strata_datagrams_sent_total 7\n"));
        assert!(b.encode().contains("strata_datagrams_sent_total 0\n"));
    }

    #[test]
    fn sources_are_read_at_scrape_time() {
        #[derive(Debug, Default)]
        struct Live(std::sync::atomic::AtomicU64);
        impl MetricSource for Live {
            fn collect(&self) -> Vec<Sample> {
                let value = self.0.load(std::sync::atomic::Ordering::Relaxed) as f64;
                vec![Sample {
                    name: "strata_wal_bytes",
                    help: "Size of the write-ahead log.",
                    kind: SampleKind::Gauge,
                    value,
                }]
            }
        }
        let live = Arc::new(Live::default());
        #[derive(Debug)]
        struct Shared(Arc<Live>);
        impl MetricSource for Shared {
            fn collect(&self) -> Vec<Sample> {
                self.0.collect()
            }
        }

        let (metrics, _) = registered("n1");
        metrics.add_source(Box::new(Shared(Arc::clone(&live))));
        metrics.add_source(Box::new(Fixed(vec![sample(
            "strata_store_commits",
            SampleKind::Counter,
            12.0,
        )])));
        assert!(metrics.encode().contains("\nstrata_wal_bytes 0.0\n"));
        live.0.store(4096, std::sync::atomic::Ordering::Relaxed);
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE strata_wal_bytes gauge\nstrata_wal_bytes 4096.0\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE strata_store_commits counter\nstrata_store_commits_total 12.0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn bad_samples_are_left_out_not_encoded() {
        let (metrics, _) = registered("n1");
        metrics.add_source(Box::new(Fixed(vec![
            sample("strata_members", SampleKind::Gauge, 1.0),
            sample("strata_apply_seconds", SampleKind::Gauge, 1.0),
            sample("wal_bytes", SampleKind::Gauge, 1.0),
            sample("strata_bad-name", SampleKind::Gauge, 1.0),
            sample("strata_Upper", SampleKind::Gauge, 1.0),
            sample("strata_", SampleKind::Gauge, 1.0),
            sample("strata__double", SampleKind::Gauge, 1.0),
            sample("", SampleKind::Gauge, 1.0),
            sample("strata_sent_total", SampleKind::Counter, 1.0),
            sample("strata_negative", SampleKind::Counter, -1.0),
            sample("strata_not_a_number", SampleKind::Counter, f64::NAN),
            sample("strata_twice", SampleKind::Gauge, 1.0),
            sample("strata_twice", SampleKind::Gauge, 2.0),
        ])));
        let text = metrics.encode();
        assert_eq!(text.matches("# TYPE strata_members ").count(), 1, "{text}");
        assert_eq!(
            text.matches("# TYPE strata_apply_seconds ").count(),
            1,
            "{text}"
        );
        for absent in [
            "wal_bytes",
            "bad-name",
            "Upper",
            "double",
            "strata_sent_total",
            "negative",
            "not_a_number",
            "strata_strata",
            "strata_ ",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        assert!(text.contains("\nstrata_twice 1.0\n"), "{text}");
        assert!(!text.contains("\nstrata_twice 2.0\n"), "{text}");
    }
}
