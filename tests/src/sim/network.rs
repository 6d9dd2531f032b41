//! The simulated network: one-way latency, datagram loss, partitions that heal, and which
//! nodes are up.
//!
//! Datagrams (SWIM packets) may be lost. Streams (pushes, sync sessions) survive loss by
//! retransmission, which costs them a round trip, but not a partition or a dead peer. Every
//! random choice comes from the network's own RNG, seeded from the run's seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The simulated network's settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// One-way latency bounds.
    pub latency_min: Duration,
    /// See `latency_min`.
    pub latency_max: Duration,
    /// Probability that a packet (datagram) is lost.
    pub loss: f64,
    /// How long a client waits for a sync answer that never comes (the driver's idle timeout).
    pub sync_timeout: Duration,
    /// Encode and decode every push and sync frame with `message::encode`/`decode`, counting
    /// bytes (costs time in large runs).
    pub encode: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            latency_min: Duration::from_micros(200),
            latency_max: Duration::from_millis(2),
            loss: 0.0,
            sync_timeout: Duration::from_secs(2),
            encode: false,
        }
    }
}

/// The network's state: settings, partitions, randomness.
pub struct Network {
    /// Settings (loss may change during a run).
    pub config: NetConfig,
    /// Partition group of each node; messages between groups are cut.
    groups: Option<Vec<u32>>,
    rng: StdRng,
}

impl Network {
    /// A network with no partition.
    pub fn new(config: NetConfig, seed: u64) -> Network {
        Network {
            config,
            groups: None,
            rng: StdRng::seed_from_u64(seed ^ 0x6e65_7477_6f72_6b00),
        }
    }

    /// Splits the nodes into partition groups (`group_of[i]` for node `i`).
    pub fn partition(&mut self, group_of: Vec<u32>) {
        self.groups = Some(group_of);
    }

    /// Heals every partition.
    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Whether a partition is in place.
    pub fn partitioned(&self) -> bool {
        self.groups.is_some()
    }

    /// Whether a partition separates `a` from `b`.
    pub fn cut(&self, a: usize, b: usize) -> bool {
        self.groups.as_ref().is_some_and(|g| g[a] != g[b])
    }

    /// A one-way latency.
    pub fn latency(&mut self) -> Duration {
        let min = self.config.latency_min.as_nanos() as u64;
        let max = self.config.latency_max.as_nanos() as u64;
        Duration::from_nanos(if max > min {
            self.rng.random_range(min..=max)
        } else {
            min
        })
    }

    /// Whether a datagram is lost.
    pub fn lost(&mut self) -> bool {
        self.config.loss > 0.0 && self.rng.random_bool(self.config.loss)
    }

    /// The latency of a stream's frame: a lost packet costs it a retransmission.
    pub fn stream_latency(&mut self) -> Duration {
        let mut after = self.latency();
        if self.lost() {
            after += 2 * self.latency() + Duration::from_millis(5);
        }
        after
    }
}
