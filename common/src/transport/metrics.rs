//! The transport's metrics: the QUIC endpoint's counters, exported as a [`MetricSource`] read
//! at scrape time, and the state of every configured certificate ([`CertMetrics`], set from
//! what the certificate watcher polls). Node assembly registers both.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;

use crate::metrics::{MetricSource, MetricsBuilder, Sample, SampleKind};

use super::{CertState, CertStatus, Transport};

/// The QUIC endpoint's counters ([`Transport::stats`]), read at scrape time.
#[derive(Debug)]
pub struct TransportSource(pub Transport);

impl MetricSource for TransportSource {
    fn collect(&self) -> Vec<Sample> {
        let s = self.0.stats();
        let counter = |name, help, value: u64| Sample {
            name,
            help,
            kind: SampleKind::Counter,
            value: value as f64,
        };
        vec![
            Sample {
                name: "strata_transport_connections",
                help: "QUIC connections open.",
                kind: SampleKind::Gauge,
                value: s.connections_open as f64,
            },
            counter(
                "strata_transport_handshakes_failed",
                "QUIC handshakes that failed (bad certificates, garbage).",
                s.handshakes_failed_total,
            ),
            counter(
                "strata_transport_dials_failed",
                "Dials that failed.",
                s.dials_failed_total,
            ),
            counter(
                "strata_transport_dials",
                "Dials started.",
                s.dials_attempted_total,
            ),
            counter(
                "strata_transport_dials_backed_off",
                "Sends to a peer refused without dialing while its back-off lasts.",
                s.dials_backed_off_total,
            ),
            counter(
                "strata_transport_tls_reloads",
                "Renewed certificates swapped into the QUIC endpoint.",
                s.tls_reloads_total,
            ),
            counter(
                "strata_transport_connections_superseded",
                "Cached connections replaced because their peer connected anew or restarted.",
                s.connections_superseded_total,
            ),
            counter(
                "strata_transport_connections_reset",
                "Connections ended by a peer's stateless reset (it restarted and no longer knew them).",
                s.connections_reset_total,
            ),
            counter(
                "strata_transport_sent_bytes",
                "Bytes sent over QUIC (UDP payload).",
                s.bytes_sent_total,
            ),
            counter(
                "strata_transport_received_bytes",
                "Bytes received over QUIC (UDP payload).",
                s.bytes_received_total,
            ),
        ]
    }
}

/// Labels of [`CertMetrics::certificate_expiry_seconds`] and [`CertMetrics::certificate_expiring`]:
/// `certificate`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CertLabel {
    /// Which configured certificate: `gossip`, `api`, `publish`, `route`, or their CAs
    /// (`gossip_ca`, ...): a fixed list.
    pub certificate: &'static str,
}

/// The state of every configured certificate and CA.
#[derive(Debug, Clone)]
pub struct CertMetrics {
    /// `strata_certificate_expiry_seconds{certificate}`: seconds until the certificate in use
    /// expires (negative once it has).
    pub certificate_expiry_seconds: Family<CertLabel, Gauge>,
    /// `strata_certificate_expiring{certificate}`: 1 when within the warning threshold or
    /// expired, else 0.
    pub certificate_expiring: Family<CertLabel, Gauge>,
}

impl CertMetrics {
    /// Registers the certificate series with `b`.
    pub fn register(b: &mut MetricsBuilder) -> CertMetrics {
        CertMetrics {
            certificate_expiry_seconds: b.add_with_unit(
                "certificate_expiry",
                "Seconds until the certificate in use expires, by certificate",
                Unit::Seconds,
                Family::default(),
            ),
            certificate_expiring: b.add(
                "certificate_expiring",
                "1 when the certificate is within the warning threshold or expired, by certificate",
                Family::default(),
            ),
        }
    }

    /// Sets the gauges of every certificate in `statuses` (one poll of the watcher).
    pub fn publish(&self, statuses: &[CertStatus]) {
        for s in statuses {
            let label = CertLabel {
                certificate: s.label,
            };
            self.certificate_expiry_seconds
                .get_or_create(&label)
                .set(s.seconds_left);
            self.certificate_expiring
                .get_or_create(&label)
                .set(i64::from(s.state != CertState::Valid));
        }
    }
}
