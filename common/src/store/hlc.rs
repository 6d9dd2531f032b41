//! The hybrid logical clock that orders writes.
//!
//! A timestamp is `(wall milliseconds << 16) | counter`. Every local transaction takes a timestamp
//! greater than every timestamp this node has produced or observed, so a write that has seen
//! another write is ordered after it (causality), while concurrent writes are ordered by wall time,
//! which is what operators expect ("the later write wins").
//!
//! No I/O: the caller passes the wall clock in. A remote timestamp far ahead of the wall clock is
//! still observed (rejecting it would lose a write) but reported, so it can be counted.
//!
//! The timestamp value itself is [`Timestamp`] of `strata-types`, re-exported here.

pub use strata_types::Timestamp;

/// The clock: the greatest timestamp produced or observed so far.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    last: Timestamp,
    /// How far ahead of the wall clock a remote timestamp may be before it is reported.
    drift_max_ms: u64,
}

/// What observing a remote timestamp found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observed {
    /// Within the tolerated drift.
    Normal,
    /// Ahead of our wall clock by more than the tolerated drift; applied anyway.
    FarFuture,
}

impl Clock {
    /// A clock that starts after `last` (the greatest timestamp persisted by an earlier run).
    pub(crate) fn new(last: Timestamp, drift_max_ms: u64) -> Clock {
        Clock { last, drift_max_ms }
    }

    /// The greatest timestamp produced or observed.
    pub(crate) fn last(&self) -> Timestamp {
        self.last
    }

    /// A new timestamp for a local transaction, greater than everything seen.
    pub(crate) fn tick(&mut self, wall_ms: u64) -> Timestamp {
        let wall = Timestamp::from_millis(wall_ms);
        let next = if wall > self.last {
            wall
        } else {
            Timestamp(self.last.0 + 1)
        };
        assert!(next > self.last, "the local clock must never go backwards");
        self.last = next;
        next
    }

    /// Advances the clock past a remote timestamp, so later local writes are ordered after it.
    pub(crate) fn observe(&mut self, remote: Timestamp, wall_ms: u64) -> Observed {
        if remote > self.last {
            self.last = remote;
        }
        if remote.millis() > wall_ms.saturating_add(self.drift_max_ms) {
            Observed::FarFuture
        } else {
            Observed::Normal
        }
    }
}

/// Where the store reads wall-clock time. Tests and simulations drive a manual clock.
#[derive(Debug, Clone, Default)]
pub enum WallClock {
    /// The system clock.
    #[default]
    System,
    /// Milliseconds since the Unix epoch, set by the owner of the cell.
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl WallClock {
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match self {
            WallClock::System => wall_clock_ms(),
            WallClock::Manual(ms) => ms.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Milliseconds since the Unix epoch from the system clock (0 if the clock is before 1970).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_increasing_even_when_wall_clock_stalls_or_goes_back() {
        let mut clock = Clock::new(Timestamp::ZERO, 1000);
        let a = clock.tick(1_000);
        let b = clock.tick(1_000);
        let c = clock.tick(900);
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(a.millis(), 1_000);
    }

    #[test]
    fn observing_a_remote_timestamp_orders_later_local_writes_after_it() {
        let mut clock = Clock::new(Timestamp::ZERO, 1000);
        let remote = Timestamp::from_millis(5_000);
        assert_eq!(clock.observe(remote, 4_500), Observed::Normal);
        let local = clock.tick(4_500);
        assert!(local > remote);
    }

    #[test]
    fn far_future_timestamps_are_applied_and_reported() {
        let mut clock = Clock::new(Timestamp::ZERO, 1000);
        let remote = Timestamp::from_millis(1_000_000);
        assert_eq!(clock.observe(remote, 1_000), Observed::FarFuture);
        assert!(clock.tick(1_000) > remote);
    }

    #[test]
    fn a_restarted_clock_starts_after_the_persisted_timestamp() {
        let persisted = Timestamp::from_millis(10_000);
        let mut clock = Clock::new(persisted, 1000);
        assert!(clock.tick(5_000) > persisted);
    }
}
