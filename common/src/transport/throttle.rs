//! A per-remote-address limit on repeated log lines.
//!
//! A peer that keeps failing its handshake with us controls how often we would log about it;
//! the accepting side cannot make it back off, so it logs at most once per [`LOG_INTERVAL`] per
//! remote IP address, with the number of failures suppressed since. The map is bounded
//! ([`REMOTES_MAX`]); when it is full the oldest entry is dropped, so a flood of addresses costs
//! at most one extra log line per dropped address, never unbounded memory.
//!
//! It must not: log by itself (the caller logs when [`LogThrottle::admit`] says so).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most one line per remote address per minute: enough to see a misconfigured peer in the
/// logs within a minute of its first attempt, few enough that a peer redialing twice a second
/// costs one line instead of 120.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Remote addresses remembered at most: 1,024 entries of a few dozen bytes each. A real cluster
/// has far fewer misbehaving peers; beyond it the oldest is forgotten.
const REMOTES_MAX: usize = 1024;

/// Per remote: when it was last logged and how many events were not logged since.
#[derive(Debug, Clone, Copy)]
struct Seen {
    logged_at: Instant,
    suppressed: u64,
}

/// Decides which repeated events get a log line. Thread-safe; the lock is never held across
/// an `.await` (there is none inside).
#[derive(Debug, Default)]
pub struct LogThrottle {
    seen: Mutex<HashMap<IpAddr, Seen>>,
}

impl LogThrottle {
    /// A throttle with nothing seen.
    pub fn new() -> LogThrottle {
        LogThrottle::default()
    }

    /// Records an event from `remote` at `now`. `Some(suppressed)` means: log it, mentioning
    /// the `suppressed` events not logged since the last line; `None` means: stay quiet.
    pub fn admit(&self, remote: IpAddr, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = seen.get_mut(&remote) {
            if now.saturating_duration_since(entry.logged_at) < LOG_INTERVAL {
                entry.suppressed += 1;
                return None;
            }
            let suppressed = entry.suppressed;
            *entry = Seen {
                logged_at: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if seen.len() >= REMOTES_MAX {
            // Drop the entries whose interval is over; if none is, the oldest one.
            seen.retain(|_, s| now.saturating_duration_since(s.logged_at) < LOG_INTERVAL);
            if seen.len() >= REMOTES_MAX
                && let Some(oldest) = seen
                    .iter()
                    .min_by_key(|(_, s)| s.logged_at)
                    .map(|(a, _)| *a)
            {
                seen.remove(&oldest);
            }
        }
        seen.insert(
            remote,
            Seen {
                logged_at: now,
                suppressed: 0,
            },
        );
        Some(0)
    }

    /// Remote addresses remembered now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_is_logged_once_per_interval_with_the_count_it_suppressed() {
        let throttle = LogThrottle::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(throttle.admit(ip, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(throttle.admit(ip, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(throttle.admit(ip, t0 + LOG_INTERVAL), Some(5));
        // Another address is independent.
        assert_eq!(throttle.admit("10.0.0.2".parse().unwrap(), t0), Some(0));
    }

    #[test]
    fn the_map_never_grows_past_its_bound() {
        let throttle = LogThrottle::new();
        let t0 = Instant::now();
        for i in 0..(REMOTES_MAX as u32 + 100) {
            let ip = IpAddr::from(i.to_be_bytes());
            assert_eq!(throttle.admit(ip, t0), Some(0));
        }
        assert_eq!(throttle.len(), REMOTES_MAX);
    }
}
