//! Anti-entropy: periodically, with a few random members, compare bookkeeping and fetch what is
//! missing. Broadcast is fast but can lose a change (a member down, a full queue, a partition);
//! anti-entropy makes every member hold every version eventually, and is how a new node catches
//! up.
//!
//! A session: the client sends its per-site heads and gaps; the server computes the versions it
//! holds that the client lacks ([`missing`]) and streams them newest first in bounded chunks,
//! up to a budget per session, then says whether it sent everything. If not, the client asks
//! again at once, so a fresh node streams the whole region back to back.
//!
//! No I/O: the scheduler emits `Sync` actions; the session itself is the state machine in
//! `session`, built on the functions here, and run by the driver (or the simulator).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use rand::RngExt;
use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rangemap::RangeInclusiveSet;
use serde::{Deserialize, Serialize};

use crate::machine::{Action, Timer};
use strata_types::{SiteId, SiteState};

/// Anti-entropy settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Time between sync rounds, ms (jittered by up to half).
    pub interval_ms: u64,
    /// Members synced with per round (one after another).
    pub peers: usize,
    /// Sessions this node serves at most at once; beyond it, clients are told to come back.
    pub serve_max: usize,
    /// Versions one session serves at most before the client must ask again.
    pub session_versions_max: u64,
    /// Bytes one sync frame carries at most (about).
    pub frame_bytes_max: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            // A lost broadcast is repaired within about a second.
            interval_ms: 1_000,
            peers: 2,
            serve_max: 8,
            // Bounds one session's memory and time on the server; large enough that a fresh
            // node catching up pays few round trips.
            session_versions_max: 20_000,
            frame_bytes_max: 1 << 20,
        }
    }
}

/// Versions of each site that `ours` holds and `theirs` lacks, as ranges, newest first per site.
/// A version `theirs` holds only in part counts as lacking (it is served whole).
pub fn missing(ours: &[SiteState], theirs: &[SiteState]) -> Vec<(SiteId, RangeInclusive<u64>)> {
    let theirs: HashMap<SiteId, &SiteState> = theirs.iter().map(|s| (s.site, s)).collect();
    let mut out = Vec::new();
    for mine in ours {
        let mut lack: RangeInclusiveSet<u64> = RangeInclusiveSet::new();
        match theirs.get(&mine.site) {
            None => {
                if mine.head > 0 {
                    lack.insert(1..=mine.head);
                }
            }
            Some(other) => {
                if mine.head > other.head {
                    lack.insert(other.head + 1..=mine.head);
                }
                for gap in &other.gaps {
                    lack.insert(gap.clone());
                }
                for &partial in &other.partials {
                    lack.insert(partial..=partial);
                }
            }
        }
        // Only what we hold ourselves can be served.
        for gap in &mine.gaps {
            lack.remove(gap.clone());
        }
        for &partial in &mine.partials {
            lack.remove(partial..=partial);
        }
        let held: Vec<RangeInclusive<u64>> = lack
            .iter()
            .filter(|r| *r.start() <= mine.head)
            .map(|r| *r.start()..=(*r.end()).min(mine.head))
            .collect();
        for range in held.into_iter().rev() {
            out.push((mine.site, range));
        }
    }
    out
}

/// `books` as if the versions in `held` were held completely: a client leaves out of its request
/// what it does not want sent yet (quarantined versions waiting for their next attempt), so the
/// server skips them and serves everything else.
pub fn mask(books: &[SiteState], held: &[(SiteId, u64)]) -> Vec<SiteState> {
    let mut out: Vec<SiteState> = books.to_vec();
    for &(site, version) in held {
        if version == 0 {
            continue;
        }
        let index = match out.iter().position(|s| s.site == site) {
            Some(index) => index,
            None => {
                out.push(SiteState {
                    site,
                    head: 0,
                    gaps: Vec::new(),
                    partials: Vec::new(),
                });
                out.len() - 1
            }
        };
        let state = &mut out[index];
        let mut gaps: RangeInclusiveSet<u64> = state.gaps.iter().cloned().collect();
        if version > state.head {
            if version > state.head + 1 {
                gaps.insert(state.head + 1..=version - 1);
            }
            state.head = version;
        } else {
            gaps.remove(version..=version);
        }
        state.gaps = gaps.iter().cloned().collect();
        state.partials.retain(|&p| p != version);
    }
    out
}

/// Cuts `missing` ranges to at most `budget` versions in all, keeping the newest, and splits them
/// into windows of at most `window` versions (one extraction each).
pub fn plan(
    missing: &[(SiteId, RangeInclusive<u64>)],
    budget: u64,
    window: u64,
) -> (Vec<(SiteId, RangeInclusive<u64>)>, bool) {
    let mut left = budget;
    let mut out = Vec::new();
    let mut complete = true;
    for (site, range) in missing {
        let mut hi = *range.end();
        let lo = *range.start();
        while hi >= lo {
            if left == 0 {
                complete = false;
                return (out, complete);
            }
            let take = (hi - lo + 1).min(window).min(left);
            let start = hi + 1 - take;
            out.push((*site, start..=hi));
            left -= take;
            if start == lo || start == 0 {
                break;
            }
            hi = start - 1;
        }
    }
    (out, complete)
}

/// The anti-entropy scheduler: when to sync, and with whom.
///
/// One client session at a time: sessions run back to back, each starting from the
/// bookkeeping the previous one left, so two peers are never asked for the same versions at
/// once (which would double the work of a catching-up node for nothing).
pub struct AntiEntropy {
    config: SyncConfig,
    /// The peer of the session under way.
    running: Option<SocketAddr>,
    /// Peers to sync with next, this round.
    planned: VecDeque<SocketAddr>,
}

impl AntiEntropy {
    /// A scheduler with the given settings.
    pub fn new(config: SyncConfig) -> AntiEntropy {
        AntiEntropy {
            config,
            running: None,
            planned: VecDeque::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    /// Whether a session is under way.
    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts the periodic rounds.
    pub fn start(&mut self, rng: &mut StdRng, out: &mut Vec<Action>) {
        self.schedule(rng, out);
    }

    /// A round: sync with a few random live members, one after another. A round still under
    /// way when the next is due is left to finish.
    pub fn tick<'a>(
        &mut self,
        live: impl Iterator<Item = &'a SocketAddr>,
        rng: &mut StdRng,
        out: &mut Vec<Action>,
    ) {
        if self.running.is_none() && self.planned.is_empty() {
            self.planned = live.copied().sample(rng, self.config.peers).into();
            self.start_next(out);
        }
        self.schedule(rng, out);
    }

    /// A node that is catching up syncs with these peers next, before any random choice, and
    /// starts at once if no session runs (instead of waiting for the next round).
    pub fn catch_up<'a>(
        &mut self,
        peers: impl Iterator<Item = &'a SocketAddr>,
        out: &mut Vec<Action>,
    ) {
        for peer in peers {
            if self.running != Some(*peer) && !self.planned.contains(peer) {
                self.planned.push_front(*peer);
            }
        }
        self.start_next(out);
    }

    /// A session ended. `complete`: the server sent everything we lacked. `failed`: it did not
    /// finish (the peer is busy, gone or sent garbage).
    pub fn finished(
        &mut self,
        peer: SocketAddr,
        complete: bool,
        failed: bool,
        out: &mut Vec<Action>,
    ) {
        if self.running != Some(peer) {
            return;
        }
        self.running = None;
        if !failed && !complete {
            // The server stopped at its budget: continue with it at once.
            self.planned.push_front(peer);
        }
        self.start_next(out);
    }

    fn start_next(&mut self, out: &mut Vec<Action>) {
        if self.running.is_none()
            && let Some(peer) = self.planned.pop_front()
        {
            self.running = Some(peer);
            out.push(Action::Sync { peer });
        }
    }

    fn schedule(&self, rng: &mut StdRng, out: &mut Vec<Action>) {
        // Between three quarters and five quarters of the interval: rounds of different nodes
        // drift apart instead of meeting in lockstep.
        let interval = self.config.interval_ms.max(1);
        let jitter = rng.random_range(0..=interval / 2);
        out.push(Action::Schedule {
            after: Duration::from_millis(interval * 3 / 4 + jitter),
            timer: Timer::SyncRound,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(site: u8, head: u64, gaps: Vec<RangeInclusive<u64>>, partials: Vec<u64>) -> SiteState {
        SiteState {
            site: SiteId([site; 16]),
            head,
            gaps,
            partials,
        }
    }

    #[test]
    fn missing_is_what_we_hold_and_they_lack_newest_first() {
        let ours = vec![
            state(1, 10, vec![4..=4], vec![]),
            state(2, 3, vec![], vec![]),
        ];
        let theirs = vec![state(1, 6, vec![2..=3], vec![5])];
        let got = missing(&ours, &theirs);
        assert_eq!(
            got,
            vec![
                (SiteId([1; 16]), 7..=10),
                (SiteId([1; 16]), 5..=5),
                (SiteId([1; 16]), 2..=3),
                (SiteId([2; 16]), 1..=3),
            ]
        );
    }

    #[test]
    fn nothing_is_missing_between_equals() {
        let both = vec![state(1, 10, vec![4..=5], vec![7])];
        assert!(missing(&both, &both).is_empty());
    }

    #[test]
    fn masked_versions_are_not_served_but_the_ones_around_them_are() {
        let ours = vec![state(1, 10, vec![], vec![])];
        let theirs = vec![state(1, 3, vec![2..=2], vec![])];
        let masked = mask(&theirs, &[(SiteId([1; 16]), 2), (SiteId([1; 16]), 6)]);
        assert_eq!(masked, vec![state(1, 6, vec![4..=5], vec![])]);
        assert_eq!(
            missing(&ours, &masked),
            vec![(SiteId([1; 16]), 7..=10), (SiteId([1; 16]), 4..=5)]
        );
        // A site the client has never heard of: only the masked version is left out.
        let masked = mask(&[], &[(SiteId([1; 16]), 10)]);
        assert_eq!(missing(&ours, &masked), vec![(SiteId([1; 16]), 1..=9)]);
    }

    #[test]
    fn plans_respect_the_budget_and_windows_newest_first() {
        let missing = vec![(SiteId([1; 16]), 1..=10), (SiteId([2; 16]), 5..=6)];
        let (windows, complete) = plan(&missing, 7, 3);
        assert!(!complete);
        assert_eq!(
            windows,
            vec![
                (SiteId([1; 16]), 8..=10),
                (SiteId([1; 16]), 5..=7),
                (SiteId([1; 16]), 4..=4)
            ]
        );
        let (windows, complete) = plan(&missing, 100, 100);
        assert!(complete);
        assert_eq!(windows.len(), 2);
    }
}
