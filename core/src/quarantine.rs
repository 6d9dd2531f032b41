//! The quarantine: versions this node could not apply (or a peer could not serve), held aside
//! with a reason and retried on a jittered, capped back-off instead of at every sync round.
//!
//! A version lands here when the store rejects it (a bug, a schema mismatch, a value over a
//! limit) or when a peer reports that it cannot serve it (it does not fit a sync frame). While a
//! version waits for its next attempt, sync asks peers as if it were held ([`Quarantine::masked`]),
//! so it neither wastes a session nor holds up the versions behind it. A version leaves the
//! quarantine when it is applied.
//!
//! It owns only that set and its schedule: plain data, `now` and the random source passed in, so
//! the schedule is unit-tested without a clock. The driver keeps it behind a lock it never holds
//! across an `.await`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use strata_types::SiteId;

/// Versions held in quarantine at most: one bad peer must not grow this node's memory without
/// bound. Past it a new version is not recorded (and sync keeps asking for it at every round).
pub const QUARANTINE_MAX: usize = 4_096;

/// First pause before a quarantined version is tried again: long enough that a version every
/// peer rejects costs one attempt per few seconds, not one per sync round.
pub const RETRY_MIN: Duration = Duration::from_secs(5);

/// Longest pause between attempts: a fixed version (a schema change arrived, a limit raised)
/// is picked up within this.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// Reasons are cut to this many bytes: a peer's error text must not grow memory or log lines.
const REASON_BYTES_MAX: usize = 512;

/// A quarantined version, as health reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The version's origin.
    pub site: SiteId,
    /// The version.
    pub version: u64,
    /// Why it could not be applied or served, from the last attempt.
    pub reason: String,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// What [`Quarantine::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The version is new here: log it and count it.
    New,
    /// The version was already quarantined; its next attempt moved further out.
    Again,
    /// The set is full ([`QUARANTINE_MAX`]); the version was not recorded.
    Full,
}

#[derive(Debug, Clone)]
struct Entry {
    reason: String,
    attempts: u32,
    retry_at: Instant,
}

/// The quarantined versions with their retry schedule.
#[derive(Debug, Default)]
pub struct Quarantine {
    entries: BTreeMap<(SiteId, u64), Entry>,
}

impl Quarantine {
    /// An empty quarantine.
    pub fn new() -> Quarantine {
        Quarantine::default()
    }

    /// Records a failed attempt at `version` of `site` at `now`; the next attempt is due after a
    /// jittered pause that doubles with each failure, up to [`RETRY_MAX`].
    pub fn record<R: rand::Rng + ?Sized>(
        &mut self,
        site: SiteId,
        version: u64,
        reason: &str,
        now: Instant,
        rng: &mut R,
    ) -> Recorded {
        let reason = cut(reason);
        if let Some(entry) = self.entries.get_mut(&(site, version)) {
            entry.attempts = entry.attempts.saturating_add(1);
            entry.reason = reason;
            entry.retry_at =
                now + strata_types::backoff::jittered(RETRY_MIN, RETRY_MAX, entry.attempts, rng);
            return Recorded::Again;
        }
        if self.entries.len() >= QUARANTINE_MAX {
            return Recorded::Full;
        }
        let retry_at = now + strata_types::backoff::jittered(RETRY_MIN, RETRY_MAX, 1, rng);
        self.entries.insert(
            (site, version),
            Entry {
                reason,
                attempts: 1,
                retry_at,
            },
        );
        Recorded::New
    }

    /// `version` of `site` was applied: it leaves the quarantine. Returns whether it was in it.
    pub fn cleared(&mut self, site: SiteId, version: u64) -> bool {
        self.entries.remove(&(site, version)).is_some()
    }

    /// Whether `version` of `site` may be tried at `now`: not quarantined, or its pause is over.
    pub fn due(&self, site: SiteId, version: u64, now: Instant) -> bool {
        self.entries
            .get(&(site, version))
            .is_none_or(|entry| entry.retry_at <= now)
    }

    /// Versions whose pause is not over at `now`: sync treats them as held, so peers do not
    /// send them again before their time.
    pub fn masked(&self, now: Instant) -> Vec<(SiteId, u64)> {
        self.entries
            .iter()
            .filter(|(_, entry)| entry.retry_at > now)
            .map(|(key, _)| *key)
            .collect()
    }

    /// How many versions are quarantined.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is quarantined.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first `max` quarantined versions, in (site, version) order, for health.
    pub fn list(&self, max: usize) -> Vec<Quarantined> {
        self.entries
            .iter()
            .take(max)
            .map(|(&(site, version), entry)| Quarantined {
                site,
                version,
                reason: entry.reason.clone(),
                attempts: entry.attempts,
            })
            .collect()
    }

    /// When the version's next attempt is due, if it is quarantined.
    pub fn retry_at(&self, site: SiteId, version: u64) -> Option<Instant> {
        self.entries.get(&(site, version)).map(|e| e.retry_at)
    }
}

/// `reason`, cut at a character boundary to [`REASON_BYTES_MAX`].
fn cut(reason: &str) -> String {
    if reason.len() <= REASON_BYTES_MAX {
        return reason.to_owned();
    }
    let mut end = REASON_BYTES_MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const SITE: SiteId = SiteId([7; 16]);

    #[test]
    fn a_rejected_version_waits_a_jittered_pause_that_doubles_up_to_the_cap() {
        let mut q = Quarantine::new();
        let mut rng = StdRng::seed_from_u64(3);
        let start = Instant::now();
        assert_eq!(q.record(SITE, 5, "bad", start, &mut rng), Recorded::New);
        let first = q.retry_at(SITE, 5).unwrap() - start;
        assert!(
            first >= RETRY_MIN / 2 && first <= RETRY_MIN,
            "first pause {first:?}"
        );
        assert!(!q.due(SITE, 5, start));
        assert!(q.due(SITE, 5, start + RETRY_MIN));
        // Each further failure at least doubles the floor of the pause, until the cap.
        let mut now = start;
        for attempt in 2..=20u32 {
            now += RETRY_MAX;
            assert_eq!(q.record(SITE, 5, "bad", now, &mut rng), Recorded::Again);
            let pause = q.retry_at(SITE, 5).unwrap() - now;
            let ceiling = RETRY_MIN
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(RETRY_MAX);
            assert!(
                pause <= ceiling && pause >= ceiling / 2,
                "attempt {attempt}: pause {pause:?}, ceiling {ceiling:?}"
            );
        }
        assert_eq!(q.list(10)[0].attempts, 20);
    }

    #[test]
    fn a_version_not_due_is_masked_and_an_applied_one_leaves() {
        let mut q = Quarantine::new();
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        q.record(SITE, 5, "bad", now, &mut rng);
        q.record(SITE, 9, "worse", now, &mut rng);
        assert_eq!(q.masked(now), vec![(SITE, 5), (SITE, 9)]);
        assert!(q.masked(now + RETRY_MIN).is_empty());
        assert!(q.due(SITE, 6, now), "other versions are always due");
        assert!(q.cleared(SITE, 5));
        assert!(!q.cleared(SITE, 5));
        assert_eq!(q.len(), 1);
        assert_eq!(q.list(10)[0].reason, "worse");
    }

    #[test]
    fn the_set_is_bounded() {
        let mut q = Quarantine::new();
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        for v in 0..QUARANTINE_MAX as u64 {
            assert_eq!(q.record(SITE, v, "x", now, &mut rng), Recorded::New);
        }
        assert_eq!(q.record(SITE, u64::MAX, "x", now, &mut rng), Recorded::Full);
        assert_eq!(q.len(), QUARANTINE_MAX);
        // A known version is still rescheduled when the set is full.
        assert_eq!(q.record(SITE, 0, "y", now, &mut rng), Recorded::Again);
    }

    #[test]
    fn a_long_reason_is_cut() {
        let mut q = Quarantine::new();
        let mut rng = StdRng::seed_from_u64(1);
        q.record(SITE, 1, &"é".repeat(1000), Instant::now(), &mut rng);
        assert!(q.list(1)[0].reason.len() <= REASON_BYTES_MAX + 3);
    }
}
