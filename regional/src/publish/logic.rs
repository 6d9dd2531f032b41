//! The publisher's decisions, as a plain state machine: inputs in, actions out, no I/O.
//!
//! A region's publishers derive a per-app summary from the region's rows and send globald only
//! what changed since globald last acknowledged. This module decides *whether* this node
//! publishes, *when* to derive and *what* to send; the driver (`super::driver`) runs the query,
//! makes the gRPC call and keeps the timers.
//!
//! Rules it keeps:
//! - **Publishers come from membership alone.** The `publishers` live members with the lowest
//!   node names publish; every node computes the same set from the same view, and when one dies
//!   the next name takes over. Two views that disagree for a moment only mean an extra publisher,
//!   which is harmless: globald's writes are idempotent.
//! - **Only changes travel.** Summaries are compared with the last map globald acknowledged; a
//!   regional change that leaves every summary as it was sends nothing. The first publish after
//!   taking the role, and every `reconcile` period, send the whole map (`full`), so apps that left
//!   while nobody was looking are removed.
//! - **Paced.** A change waits `debounce` for others before the map is derived; two publishes are
//!   never closer than `publish_interval_min` (the rate cap); failures back off exponentially
//!   with jitter up to `backoff_max`. One derivation or publish is in flight at a time.
//!
//! It leaves out: how the map is derived (SQL, in the driver), retries within a call, and which
//! globald endpoint is dialed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

/// One app's Machines in the region, by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// All of the app's Machines in the region.
    pub machines: u64,
    /// Started ones.
    pub started: u64,
    /// Stopped ones.
    pub stopped: u64,
    /// In any other state.
    pub other: u64,
}

/// The region's summary: app -> counts.
pub type AppMap = BTreeMap<String, Counts>;

/// What one publish sends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publication {
    /// Summaries that are new or changed (all of them when `full`).
    pub upserts: Vec<(String, Counts)>,
    /// Apps that left the region.
    pub removed: Vec<String>,
    /// `upserts` is the whole map; globald removes the region's other apps.
    pub full: bool,
}

impl Publication {
    /// Whether sending it would change nothing.
    pub fn is_empty(&self) -> bool {
        !self.full && self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// The timers the publisher asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// Derive the map (after a debounce, a back-off or the rate cap).
    Derive,
    /// Send the whole map.
    Reconcile,
}

/// A timer: its kind and a token; a timer whose token is no longer current is ignored, so
/// rescheduling never needs a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    /// What it is for.
    pub kind: TimerKind,
    token: u64,
}

/// What happens to the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The node names of the live members, this node's included, changed.
    Members(Vec<String>),
    /// Rows of the region changed.
    Changed,
    /// A timer fired.
    Timer(Timer),
    /// A derivation asked for with [`Action::Derive`] finished.
    Derived(Result<AppMap, String>),
    /// A publish asked for with [`Action::Publish`] finished.
    Published(Result<(), String>),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the derivation query and answer with [`Input::Derived`].
    Derive,
    /// Send this to globald and answer with [`Input::Published`].
    Publish(Publication),
    /// Answer with [`Input::Timer`] at `at`.
    SetTimer {
        /// The timer.
        timer: Timer,
        /// When.
        at: Instant,
    },
    /// This node took (`true`) or left (`false`) the publisher role.
    Role(bool),
}

/// The publisher's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Live members that publish.
    pub publishers: usize,
    /// How long a change waits for others before the map is derived.
    pub debounce: Duration,
    /// How often the whole map is sent.
    pub reconcile: Duration,
    /// The least time between two publishes (the rate cap).
    pub publish_interval_min: Duration,
    /// The first retry delay after a failure.
    pub backoff_min: Duration,
    /// The longest retry delay.
    pub backoff_max: Duration,
}

/// What is in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Busy {
    Idle,
    Deriving,
    /// Publishing; on success globald holds this map.
    Publishing(AppMap),
}

/// A region publisher's state.
#[derive(Debug)]
pub struct Publisher {
    me: String,
    settings: Settings,
    rng: StdRng,
    /// Whether this node is one of the publishers now.
    publisher: bool,
    /// Whether it is the first of them (the lowest name).
    first: bool,
    /// The map globald acknowledged last; `None` until the first publish in this role.
    published: Option<AppMap>,
    busy: Busy,
    /// Something changed (or failed) since the last derivation began.
    dirty: bool,
    /// The next publish must send the whole map.
    full_due: bool,
    /// No publish before this (the rate cap).
    publish_not_before: Option<Instant>,
    /// The pending derive timer: its token and deadline.
    derive_timer: Option<(u64, Instant)>,
    /// The current reconcile timer's token.
    reconcile_token: u64,
    next_token: u64,
    /// Failures in a row, for the back-off.
    failures: u32,
}

impl Publisher {
    /// A publisher for node `me`; `seed` drives the retry jitter.
    pub fn new(me: impl Into<String>, settings: Settings, seed: u64) -> Publisher {
        assert!(
            settings.publishers > 0,
            "a region needs at least one publisher"
        );
        assert!(settings.backoff_min <= settings.backoff_max);
        Publisher {
            me: me.into(),
            settings,
            rng: StdRng::seed_from_u64(seed),
            publisher: false,
            first: false,
            published: None,
            busy: Busy::Idle,
            dirty: false,
            full_due: true,
            publish_not_before: None,
            derive_timer: None,
            reconcile_token: 0,
            next_token: 1,
            failures: 0,
        }
    }

    /// Whether this node publishes now.
    pub fn is_publisher(&self) -> bool {
        self.publisher
    }

    /// Whether this node is the first publisher (the lowest live name), which speaks for the
    /// region's own row when nothing is configured for it.
    pub fn is_first(&self) -> bool {
        self.first
    }

    /// The map globald last acknowledged from this node.
    pub fn published(&self) -> Option<&AppMap> {
        self.published.as_ref()
    }

    /// Failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Feeds one input at `now` (never earlier than the previous call's) and returns what to do.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Members(names) => self.on_members(names, now, &mut out),
            Input::Changed => {
                self.dirty = true;
                self.schedule_after_change(now, &mut out);
            }
            Input::Timer(timer) => self.on_timer(timer, now, &mut out),
            Input::Derived(result) => self.on_derived(result, now, &mut out),
            Input::Published(result) => self.on_published(result, now, &mut out),
        }
        out
    }

    fn on_members(&mut self, mut names: Vec<String>, now: Instant, out: &mut Vec<Action>) {
        names.sort();
        names.dedup();
        let chosen = names
            .iter()
            .take(self.settings.publishers)
            .any(|n| *n == self.me);
        self.first = names.first() == Some(&self.me);
        if chosen == self.publisher {
            return;
        }
        self.publisher = chosen;
        // A new role starts from nothing: the first publish sends the whole map.
        self.published = None;
        self.full_due = true;
        self.failures = 0;
        self.derive_timer = None;
        self.reconcile_token = self.token();
        out.push(Action::Role(chosen));
        if chosen {
            self.dirty = true;
            self.schedule_derive(now, out);
            self.set_reconcile_timer(now, out);
        }
    }

    fn on_timer(&mut self, timer: Timer, now: Instant, out: &mut Vec<Action>) {
        match timer.kind {
            TimerKind::Derive => {
                if self.derive_timer.map(|(token, _)| token) != Some(timer.token) {
                    return; // superseded
                }
                self.derive_timer = None;
                if !self.publisher || self.busy != Busy::Idle {
                    return; // the end of what is in flight schedules the next one
                }
                self.busy = Busy::Deriving;
                self.dirty = false;
                out.push(Action::Derive);
            }
            TimerKind::Reconcile => {
                if timer.token != self.reconcile_token || !self.publisher {
                    return;
                }
                self.full_due = true;
                self.dirty = true;
                if self.busy == Busy::Idle {
                    self.schedule_derive(now, out);
                }
                self.set_reconcile_timer(now, out);
            }
        }
    }

    fn on_derived(&mut self, result: Result<AppMap, String>, now: Instant, out: &mut Vec<Action>) {
        if self.busy != Busy::Deriving {
            return; // a stale answer from before a role change
        }
        self.busy = Busy::Idle;
        if !self.publisher {
            return;
        }
        let map = match result {
            Ok(map) => map,
            Err(_) => return self.failed(now, out),
        };
        let publication = match (&self.published, self.full_due) {
            (Some(published), false) => diff(published, &map),
            _ => Publication {
                upserts: map.iter().map(|(app, c)| (app.clone(), *c)).collect(),
                removed: Vec::new(),
                full: true,
            },
        };
        if publication.is_empty() {
            // Nothing globald does not hold already: send nothing.
            self.failures = 0;
            self.schedule_after_change(now, out);
            return;
        }
        debug_assert!(self.publish_not_before.is_none_or(|t| t <= now));
        self.publish_not_before = Some(now + self.settings.publish_interval_min);
        self.busy = Busy::Publishing(map);
        out.push(Action::Publish(publication));
    }

    fn on_published(&mut self, result: Result<(), String>, now: Instant, out: &mut Vec<Action>) {
        let Busy::Publishing(map) = std::mem::replace(&mut self.busy, Busy::Idle) else {
            return;
        };
        if !self.publisher {
            return;
        }
        match result {
            Ok(()) => {
                self.published = Some(map);
                self.full_due = false;
                self.failures = 0;
                self.schedule_after_change(now, out);
            }
            Err(_) => self.failed(now, out),
        }
    }

    /// After a failed derivation or publish: try again after a jittered back-off. What globald
    /// acknowledged is unchanged, so the retry sends the difference from there.
    fn failed(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.failures = self.failures.saturating_add(1);
        self.dirty = true;
        let delay = strata_common::backoff::jittered(
            self.settings.backoff_min,
            self.settings.backoff_max,
            self.failures,
            &mut self.rng,
        );
        self.set_derive_timer(now + delay, out);
    }

    /// Schedules a derivation `debounce` from now if something is waiting and nothing is in
    /// flight or already scheduled.
    fn schedule_after_change(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.publisher || !self.dirty || self.busy != Busy::Idle || self.derive_timer.is_some()
        {
            return;
        }
        self.set_derive_timer(now + self.settings.debounce, out);
    }

    /// Schedules a derivation as soon as the rate cap allows.
    fn schedule_derive(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some((_, at)) = self.derive_timer
            && at <= now
        {
            return;
        }
        self.set_derive_timer(now, out);
    }

    fn set_derive_timer(&mut self, at: Instant, out: &mut Vec<Action>) {
        let at = self.publish_not_before.map_or(at, |t| at.max(t));
        let token = self.token();
        self.derive_timer = Some((token, at));
        out.push(Action::SetTimer {
            timer: Timer {
                kind: TimerKind::Derive,
                token,
            },
            at,
        });
    }

    fn set_reconcile_timer(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.reconcile_token = self.token();
        out.push(Action::SetTimer {
            timer: Timer {
                kind: TimerKind::Reconcile,
                token: self.reconcile_token,
            },
            at: now + self.settings.reconcile,
        });
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }
}

/// What changed from `old` to `new`: new or changed summaries, and apps gone.
pub fn diff(old: &AppMap, new: &AppMap) -> Publication {
    Publication {
        upserts: new
            .iter()
            .filter(|(app, counts)| old.get(*app) != Some(counts))
            .map(|(app, counts)| (app.clone(), *counts))
            .collect(),
        removed: old
            .keys()
            .filter(|app| !new.contains_key(*app))
            .cloned()
            .collect(),
        full: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            publishers: 2,
            debounce: Duration::from_millis(200),
            reconcile: Duration::from_secs(30),
            publish_interval_min: Duration::from_millis(250),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }

    fn counts(started: u64) -> Counts {
        Counts {
            machines: started,
            started,
            stopped: 0,
            other: 0,
        }
    }

    fn map(entries: &[(&str, u64)]) -> AppMap {
        entries
            .iter()
            .map(|(app, n)| (app.to_string(), counts(*n)))
            .collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// The derive timer among `actions`.
    fn derive_timer(actions: &[Action]) -> (Timer, Instant) {
        actions
            .iter()
            .rev()
            .find_map(|a| match a {
                Action::SetTimer { timer, at } if timer.kind == TimerKind::Derive => {
                    Some((*timer, *at))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no derive timer in {actions:?}"))
    }

    fn publication(actions: &[Action]) -> Option<Publication> {
        actions.iter().find_map(|a| match a {
            Action::Publish(p) => Some(p.clone()),
            _ => None,
        })
    }

    /// A publisher that took the role and published `initial` in full.
    fn publishing(initial: &AppMap, t0: Instant) -> Publisher {
        let mut p = Publisher::new("a", settings(), 7);
        let out = p.handle(Input::Members(names(&["a", "b", "c"])), t0);
        assert!(out.contains(&Action::Role(true)), "{out:?}");
        let (timer, at) = derive_timer(&out);
        assert_eq!(at, t0, "the first derivation waits for nothing");
        assert_eq!(p.handle(Input::Timer(timer), t0), vec![Action::Derive]);
        let out = p.handle(Input::Derived(Ok(initial.clone())), t0);
        let sent = publication(&out).expect("a first publish");
        assert!(sent.full);
        assert_eq!(sent.upserts.len(), initial.len());
        assert!(p.handle(Input::Published(Ok(())), t0).is_empty());
        assert_eq!(p.published(), Some(initial));
        p
    }

    #[test]
    fn the_lowest_names_publish_and_the_next_takes_over_when_one_dies() {
        let t0 = Instant::now();
        let mut c = Publisher::new("c", settings(), 1);
        assert!(
            c.handle(Input::Members(names(&["c", "a", "b"])), t0)
                .is_empty()
        );
        assert!(!c.is_publisher());
        let out = c.handle(Input::Members(names(&["c", "b"])), t0);
        assert!(out.contains(&Action::Role(true)), "{out:?}");
        assert!(c.is_publisher());
        assert!(!c.is_first(), "b is first");
        c.handle(Input::Members(names(&["c"])), t0);
        assert!(c.is_first());
        let out = c.handle(Input::Members(names(&["c", "b", "a"])), t0);
        assert_eq!(out, vec![Action::Role(false)]);
        // Its stale answers are ignored.
        assert!(
            c.handle(Input::Derived(Ok(map(&[("x", 1)]))), t0)
                .is_empty()
        );
    }

    #[test]
    fn a_change_is_debounced_and_only_what_changed_is_sent() {
        let t0 = Instant::now();
        let mut p = publishing(&map(&[("web", 2), ("api", 1), ("db", 1)]), t0);
        let t1 = t0 + Duration::from_secs(1);
        let out = p.handle(Input::Changed, t1);
        let (timer, at) = derive_timer(&out);
        assert_eq!(at, t1 + Duration::from_millis(200));
        // More changes within the debounce ask for nothing more.
        assert!(p.handle(Input::Changed, t1).is_empty());
        assert_eq!(p.handle(Input::Timer(timer), at), vec![Action::Derive]);
        let out = p.handle(Input::Derived(Ok(map(&[("web", 3), ("api", 1)]))), at);
        assert_eq!(
            publication(&out),
            Some(Publication {
                upserts: vec![("web".into(), counts(3))],
                removed: vec!["db".into()],
                full: false,
            })
        );
    }

    #[test]
    fn a_change_that_leaves_every_summary_alone_sends_nothing() {
        let t0 = Instant::now();
        let initial = map(&[("web", 2)]);
        let mut p = publishing(&initial, t0);
        let t1 = t0 + Duration::from_secs(1);
        let (timer, at) = derive_timer(&p.handle(Input::Changed, t1));
        p.handle(Input::Timer(timer), at);
        let out = p.handle(Input::Derived(Ok(initial)), at);
        assert!(publication(&out).is_none(), "{out:?}");
    }

    #[test]
    fn publishes_are_never_closer_than_the_rate_cap() {
        let t0 = Instant::now();
        let mut p = publishing(&map(&[("web", 1)]), t0);
        let mut now = t0;
        let mut sent_at = vec![t0];
        for n in 2..40 {
            let out = p.handle(Input::Changed, now);
            let (timer, at) = derive_timer(&out);
            now = at;
            p.handle(Input::Timer(timer), now);
            let out = p.handle(Input::Derived(Ok(map(&[("web", n)]))), now);
            assert!(publication(&out).is_some());
            sent_at.push(now);
            p.handle(Input::Published(Ok(())), now);
        }
        for pair in sent_at.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(250), "{pair:?}");
        }
    }

    #[test]
    fn failures_back_off_with_jitter_up_to_the_cap_and_keep_what_globald_holds() {
        let t0 = Instant::now();
        let initial = map(&[("web", 1)]);
        let mut p = publishing(&initial, t0);
        let mut now = t0 + Duration::from_secs(1);
        let (timer, at) = derive_timer(&p.handle(Input::Changed, now));
        now = at;
        p.handle(Input::Timer(timer), now);
        let mut delays = Vec::new();
        for _ in 0..12 {
            let out = p.handle(Input::Derived(Ok(map(&[("web", 2)]))), now);
            assert!(publication(&out).is_some());
            let out = p.handle(Input::Published(Err("unavailable".into())), now);
            let (timer, at) = derive_timer(&out);
            delays.push(at - now);
            now = at;
            assert_eq!(p.handle(Input::Timer(timer), now), vec![Action::Derive]);
        }
        assert_eq!(
            p.published(),
            Some(&initial),
            "a failure changes nothing acknowledged"
        );
        assert!(delays[0] >= Duration::from_millis(125) && delays[0] <= Duration::from_millis(250));
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(30)),
            "{delays:?}"
        );
        assert!(delays[11] >= Duration::from_secs(15), "{delays:?}");
        // Success resets the back-off.
        p.handle(Input::Derived(Ok(map(&[("web", 2)]))), now);
        p.handle(Input::Published(Ok(())), now);
        assert_eq!(p.failures(), 0);
    }

    #[test]
    fn a_failed_derivation_keeps_the_last_map_and_retries() {
        let t0 = Instant::now();
        let initial = map(&[("web", 1)]);
        let mut p = publishing(&initial, t0);
        let now = t0 + Duration::from_secs(1);
        let (timer, at) = derive_timer(&p.handle(Input::Changed, now));
        p.handle(Input::Timer(timer), at);
        let out = p.handle(Input::Derived(Err("malformed JSON".into())), at);
        assert!(publication(&out).is_none());
        let (_, retry) = derive_timer(&out);
        assert!(retry > at);
        assert_eq!(p.published(), Some(&initial));
        assert_eq!(p.failures(), 1);
    }

    #[test]
    fn the_reconcile_timer_sends_the_whole_map() {
        let t0 = Instant::now();
        let mut q = Publisher::new("a", settings(), 7);
        let out = q.handle(Input::Members(names(&["a"])), t0);
        let reconcile = out
            .iter()
            .find_map(|a| match a {
                Action::SetTimer { timer, at } if timer.kind == TimerKind::Reconcile => {
                    Some((*timer, *at))
                }
                _ => None,
            })
            .expect("a reconcile timer");
        assert_eq!(reconcile.1, t0 + Duration::from_secs(30));
        let (first, _) = derive_timer(&out);
        q.handle(Input::Timer(first), t0);
        q.handle(Input::Derived(Ok(map(&[("web", 1)]))), t0);
        q.handle(Input::Published(Ok(())), t0);
        let out = q.handle(Input::Timer(reconcile.0), reconcile.1);
        let (timer, at) = derive_timer(&out);
        q.handle(Input::Timer(timer), at);
        let out = q.handle(Input::Derived(Ok(map(&[("web", 1)]))), at);
        let sent = publication(&out).expect("the whole map, even unchanged");
        assert!(sent.full);
        assert_eq!(sent.upserts, vec![("web".into(), counts(1))]);
    }
}
