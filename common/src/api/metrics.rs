//! The API's metrics: requests by method and status code, their durations, subscriptions
//! and subscribers ([`ApiMetrics`]), and the TLS listener's failed handshakes
//! ([`ApiTlsSource`], read at scrape time). Labels are fixed lists: method names and the gRPC
//! spec's code names, never a status message. Node assembly registers them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use crate::metrics::{MetricSource, MetricsBuilder, Sample, SampleKind, seconds_histogram};

use super::ApiTls;

/// Labels of [`ApiMetrics::api_requests`]: `method` and `code`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ApiLabels {
    /// The gRPC method's name (`Transact`, `Query`, ...): a fixed list.
    pub method: &'static str,
    /// The status code's name as the gRPC spec writes it (`OK`, `INVALID_ARGUMENT`,
    /// `RESOURCE_EXHAUSTED`, ...). Never the status message.
    pub code: &'static str,
}

/// Labels of [`ApiMetrics::api_request_seconds`]: `method`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MethodLabel {
    /// The gRPC method's name (`Transact`, `Query`, ...): a fixed list.
    pub method: &'static str,
}

impl ApiLabels {
    /// `method="<method>",code="<code>"`; `code` is the gRPC spec's name (`OK`,
    /// `INVALID_ARGUMENT`, ...), see [`ApiLabels::code`].
    pub fn new(method: &'static str, code: &'static str) -> ApiLabels {
        ApiLabels { method, code }
    }
}

impl MethodLabel {
    /// `method="<method>"`.
    pub fn new(method: &'static str) -> MethodLabel {
        MethodLabel { method }
    }
}

/// The API's series.
#[derive(Debug)]
pub struct ApiMetrics {
    /// `strata_api_requests_total{method,code}`: gRPC requests finished.
    pub api_requests: Family<ApiLabels, Counter>,
    /// `strata_api_request_seconds{method}`: gRPC request duration.
    pub api_request_seconds: Family<MethodLabel, Histogram>,

    /// `strata_subscriptions`: distinct subscribed queries.
    pub subscriptions: Gauge,
    /// `strata_subscribers`: open subscription streams.
    pub subscribers: Gauge,
    /// `strata_subscribers_cut_total`: subscribers cut off for being too slow.
    pub subscribers_cut: Counter,
}

impl ApiMetrics {
    /// Registers the API's series with `b`.
    pub fn register(b: &mut MetricsBuilder) -> ApiMetrics {
        ApiMetrics {
            api_requests: b.add(
                "api_requests",
                "gRPC requests finished, by method and status code",
                Family::default(),
            ),
            api_request_seconds: b.add_with_unit(
                "api_request",
                "gRPC request duration, by method",
                Unit::Seconds,
                Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            ),

            subscriptions: b.add(
                "subscriptions",
                "Distinct subscribed queries",
                Gauge::default(),
            ),
            subscribers: b.add("subscribers", "Open subscription streams", Gauge::default()),
            subscribers_cut: b.add(
                "subscribers_cut",
                "Subscribers cut off for being too slow",
                Counter::default(),
            ),
        }
    }
}

/// The API's TLS handshake failures ([`ApiTls::handshakes_failed`]), read at scrape time.
#[derive(Debug)]
pub struct ApiTlsSource(pub ApiTls);

impl MetricSource for ApiTlsSource {
    fn collect(&self) -> Vec<Sample> {
        vec![Sample {
            name: "strata_api_tls_handshakes_failed",
            help: "API TLS handshakes that failed (bad or missing client certificates, garbage).",
            kind: SampleKind::Counter,
            value: self.0.handshakes_failed() as f64,
        }]
    }
}
