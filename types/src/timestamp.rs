//! The hybrid logical timestamp that orders writes: the value only. The clock that reads wall
//! time and hands timestamps out stays in the store (`strata_common::store`'s `hlc`).
//!
//! A timestamp is `(wall milliseconds << 16) | counter`: writes are ordered by wall time, and
//! the counter orders writes within one millisecond or after a remote timestamp from ahead.

use serde::{Deserialize, Serialize};

/// Bits of a timestamp that hold the logical counter.
const COUNTER_BITS: u32 = 16;

/// A hybrid logical clock timestamp. Zero is "before every write": a cell with no clock entry
/// holds its column's default at timestamp zero.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp before every write.
    pub const ZERO: Timestamp = Timestamp(0);

    /// The wall-clock part, in milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    /// The smallest timestamp at the given wall-clock milliseconds.
    pub fn from_millis(ms: u64) -> Timestamp {
        Timestamp(ms << COUNTER_BITS)
    }

    /// The value as SQLite stores it (always non-negative for the next few thousand years).
    pub fn as_sql(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// Reads a stored timestamp; negative values (never written by us) read as zero.
    pub fn from_sql(raw: i64) -> Timestamp {
        Timestamp(u64::try_from(raw).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_part_survives_the_counter() {
        let ts = Timestamp(Timestamp::from_millis(1_234).0 + 7);
        assert_eq!(ts.millis(), 1_234);
        assert!(ts > Timestamp::from_millis(1_234) && ts < Timestamp::from_millis(1_235));
    }

    #[test]
    fn stored_timestamps_read_back_and_negative_ones_read_as_zero() {
        let ts = Timestamp::from_millis(1_700_000_000_000);
        assert_eq!(Timestamp::from_sql(ts.as_sql()), ts);
        assert_eq!(Timestamp::from_sql(-1), Timestamp::ZERO);
    }
}
