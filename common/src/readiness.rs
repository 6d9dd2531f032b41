//! Readiness as one pure function: from a snapshot of what the node knows about itself
//! ([`Inputs`]) to whether it should receive traffic and every reason it should not
//! ([`evaluate`]).
//!
//! It owns the reasons, their thresholds and their wording. It reads nothing itself: the node's
//! readiness task (`node::follow_readiness`) takes the snapshot (cluster view, quarantine, store
//! health, the API listener's state) and publishes the result to `/readyz`, `Health` and the
//! `strata_ready` / `strata_not_ready{reason}` gauges ([`ReadinessMetrics`], registered here).

use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{MetricsBuilder, ReasonLabel};
use crate::store::StoreHealth;

/// The writer may take this long on one group while requests wait behind it before the node
/// stops taking traffic: a healthy group commits in milliseconds, a slow disk in a second or two.
pub const WRITER_QUEUED_STUCK_MAX: Duration = Duration::from_secs(10);

/// The writer may be busy this long even with nothing queued: a migration or a huge apply can
/// take a while, but not this long while the node still claims to serve writes.
pub const WRITER_BUSY_MAX: Duration = Duration::from_secs(60);

/// Sync sessions may all fail for this long before the node says it is cut off: several rounds
/// (one a second) with every peer, longer than a peer's restart.
pub const SYNC_FAILING_MAX: Duration = Duration::from_secs(30);

/// Whether the node should receive traffic, as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// True when the node serves reads and writes (database open, cluster joined, caught up).
    pub ready: bool,
    /// Why it is not ready (`catching up with 3 peers`); shown by `/readyz` when `ready` is
    /// false, ignored otherwise. Every reason of `reasons`, joined by `; `.
    pub reason: String,
    /// Each reason it is not ready, most severe first; empty when ready.
    pub reasons: Vec<String>,
}

impl Readiness {
    /// Ready.
    pub fn ready() -> Readiness {
        Readiness {
            ready: true,
            reason: String::new(),
            reasons: Vec::new(),
        }
    }

    /// Not ready, for `reason`.
    pub fn not_ready(reason: impl Into<String>) -> Readiness {
        let reason = reason.into();
        Readiness {
            ready: false,
            reasons: vec![reason.clone()],
            reason,
        }
    }

    /// Not ready, for each of `reasons`.
    pub fn not_ready_for(reasons: Vec<String>) -> Readiness {
        Readiness {
            ready: false,
            reason: reasons.join("; "),
            reasons,
        }
    }
}

impl Default for Readiness {
    /// Not ready: `starting`.
    fn default() -> Readiness {
        Readiness::not_ready("starting")
    }
}

/// Why a node is not ready. The label is the `reason` of `strata_not_ready` (a fixed list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The API listener is not serving.
    ApiDown,
    /// The store's writer is stuck.
    WriterStuck,
    /// Writes fail for a full disk.
    DiskFull,
    /// Versions could not be applied or fetched.
    Quarantine,
    /// The node had peers and has lost them all.
    PeersLost,
    /// Every sync session has failed for a while.
    SyncFailing,
    /// The node has not found the cluster it knew yet.
    Joining,
    /// The node has not caught up with what its members held when it joined.
    CatchingUp,
}

impl Reason {
    /// Every reason, for resetting the per-reason gauges.
    pub const ALL: [Reason; 8] = [
        Reason::ApiDown,
        Reason::WriterStuck,
        Reason::DiskFull,
        Reason::Quarantine,
        Reason::PeersLost,
        Reason::SyncFailing,
        Reason::Joining,
        Reason::CatchingUp,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::ApiDown => "api_down",
            Reason::WriterStuck => "writer_stuck",
            Reason::DiskFull => "disk_full",
            Reason::Quarantine => "quarantine",
            Reason::PeersLost => "peers_lost",
            Reason::SyncFailing => "sync_failing",
            Reason::Joining => "joining",
            Reason::CatchingUp => "catching_up",
        }
    }
}

/// What a starting node still waits for, as readiness reads it: the cluster's in-step status
/// (`strata_core::instep::StepStatus`) copied by the node, so that readiness stays below the
/// cluster in the module layers (the driver carries a [`Readiness`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Step {
    /// It sees a live member and found the members it knew (or stopped waiting for them).
    pub joined: bool,
    /// Members it knew before it stopped.
    pub known: usize,
    /// How many of those are live now.
    pub known_live: usize,
    /// Members it must still finish a complete sync session with.
    pub catch_up_pending: usize,
}

/// What readiness is computed from, taken at one moment.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The node started with no one to join (no seeds): it has nothing to catch up with.
    pub alone: bool,
    /// The node found its cluster and caught up with what its members held when it joined.
    pub caught_up: bool,
    /// What a starting node still waits for.
    pub step: Step,
    /// Live members, not counting this node.
    pub members: usize,
    /// Whether this node has ever seen another member live.
    pub had_members: bool,
    /// How long every sync session has been failing, if they are.
    pub sync_failing_for: Option<Duration>,
    /// Versions quarantined.
    pub quarantined: usize,
    /// One quarantined version and its reason, to name in the message.
    pub quarantine_example: Option<String>,
    /// Whether the API listener is serving.
    pub api_serving: bool,
    /// The store's threads.
    pub store: StoreHealth,
}

/// Whether the node should receive traffic, with every reason it should not, most severe first.
pub fn evaluate(inputs: &Inputs) -> (Readiness, Vec<Reason>) {
    let mut reasons: Vec<(Reason, String)> = Vec::new();
    if !inputs.api_serving {
        reasons.push((Reason::ApiDown, "the API listener is not serving".into()));
    }
    if let Some(busy) = inputs.store.writer_busy {
        if busy > WRITER_QUEUED_STUCK_MAX && inputs.store.queued > 0 {
            reasons.push((
                Reason::WriterStuck,
                format!(
                    "the store's writer has been on one request for {}s with {} waiting",
                    busy.as_secs(),
                    inputs.store.queued
                ),
            ));
        } else if busy > WRITER_BUSY_MAX {
            reasons.push((
                Reason::WriterStuck,
                format!(
                    "the store's writer has been on one request for {}s",
                    busy.as_secs()
                ),
            ));
        }
    }
    if let Some(what) = &inputs.store.disk_full {
        reasons.push((Reason::DiskFull, format!("the disk is full: {what}")));
    }
    if inputs.quarantined > 0 {
        let mut text = format!(
            "{} version(s) quarantined (cannot be applied or fetched)",
            inputs.quarantined
        );
        if let Some(example) = &inputs.quarantine_example {
            text.push_str(", e.g. ");
            text.push_str(example);
        }
        reasons.push((Reason::Quarantine, text));
    }
    if inputs.had_members && inputs.members == 0 {
        reasons.push((Reason::PeersLost, "lost every peer it had".into()));
    }
    if let Some(failing) = inputs.sync_failing_for
        && failing > SYNC_FAILING_MAX
    {
        reasons.push((
            Reason::SyncFailing,
            format!("every sync session has failed for {}s", failing.as_secs()),
        ));
    }
    if !inputs.alone && !inputs.step.joined {
        let step = &inputs.step;
        let text = if step.known > 0 {
            format!(
                "joining the cluster: {} of the {} members known before this start are live",
                step.known_live, step.known
            )
        } else {
            "joining the cluster: no member has answered yet".to_owned()
        };
        reasons.push((Reason::Joining, text));
    } else if !inputs.alone && !inputs.caught_up {
        reasons.push((
            Reason::CatchingUp,
            format!(
                "catching up: a complete sync with {} member(s) is pending",
                inputs.step.catch_up_pending
            ),
        ));
    }
    let kinds: Vec<Reason> = reasons.iter().map(|(kind, _)| *kind).collect();
    let texts: Vec<String> = reasons.into_iter().map(|(_, text)| text).collect();
    let readiness = if texts.is_empty() {
        Readiness::ready()
    } else {
        Readiness::not_ready_for(texts)
    };
    (readiness, kinds)
}

/// The readiness gauges.
#[derive(Debug, Clone)]
pub struct ReadinessMetrics {
    /// `strata_ready`: 1 when the node serves reads, else 0.
    pub ready: Gauge,
    /// `strata_not_ready{reason}`: 1 while `reason` keeps the node not ready, else 0; reasons
    /// come from a fixed list ([`Reason::label`]).
    pub not_ready: Family<ReasonLabel, Gauge>,
}

impl ReadinessMetrics {
    /// Registers the readiness gauges with `b`.
    pub fn register(b: &mut MetricsBuilder) -> ReadinessMetrics {
        ReadinessMetrics {
            ready: b.add(
                "ready",
                "1 when the node serves reads, else 0",
                Gauge::default(),
            ),
            not_ready: b.add(
                "not_ready",
                "1 while this reason keeps the node not ready, else 0",
                Family::default(),
            ),
        }
    }

    /// Sets the gauges from one [`evaluate`]: every reason's gauge, 1 for those in `reasons`.
    pub fn set(&self, state: &Readiness, reasons: &[Reason]) {
        self.ready.set(i64::from(state.ready));
        for reason in Reason::ALL {
            self.not_ready
                .get_or_create(&ReasonLabel::new(reason.label()))
                .set(i64::from(reasons.contains(&reason)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Inputs {
        Inputs {
            alone: false,
            caught_up: true,
            step: Step {
                joined: true,
                ..Step::default()
            },
            members: 2,
            had_members: true,
            api_serving: true,
            ..Inputs::default()
        }
    }

    fn reasons(inputs: &Inputs) -> Vec<Reason> {
        evaluate(inputs).1
    }

    #[test]
    fn a_caught_up_node_with_peers_is_ready() {
        let (readiness, kinds) = evaluate(&healthy());
        assert!(readiness.ready, "{readiness:?}");
        assert!(kinds.is_empty());
    }

    #[test]
    fn a_node_alone_from_the_start_is_ready_without_catching_up() {
        let inputs = Inputs {
            alone: true,
            api_serving: true,
            ..Inputs::default()
        };
        assert!(evaluate(&inputs).0.ready);
    }

    #[test]
    fn a_writer_stuck_with_work_queued_makes_it_not_ready() {
        let mut inputs = healthy();
        inputs.store.writer_busy = Some(WRITER_QUEUED_STUCK_MAX + Duration::from_secs(1));
        assert!(
            reasons(&inputs).is_empty(),
            "busy with nothing queued is fine"
        );
        inputs.store.queued = 3;
        assert_eq!(reasons(&inputs), vec![Reason::WriterStuck]);
        let (readiness, _) = evaluate(&inputs);
        assert!(!readiness.ready);
        assert!(
            readiness.reason.contains("3 waiting"),
            "{}",
            readiness.reason
        );
        inputs.store.queued = 0;
        inputs.store.writer_busy = Some(WRITER_BUSY_MAX + Duration::from_secs(1));
        assert_eq!(reasons(&inputs), vec![Reason::WriterStuck]);
    }

    #[test]
    fn a_full_disk_is_named() {
        let mut inputs = healthy();
        inputs.store.disk_full = Some("/var/lib/strata".into());
        let (readiness, kinds) = evaluate(&inputs);
        assert_eq!(kinds, vec![Reason::DiskFull]);
        assert!(readiness.reason.contains("/var/lib/strata"));
    }

    #[test]
    fn quarantined_versions_are_the_reason_instead_of_catching_up() {
        let mut inputs = healthy();
        inputs.quarantined = 2;
        inputs.quarantine_example = Some("site 01.. version 7: not UTF-8".into());
        let (readiness, kinds) = evaluate(&inputs);
        assert_eq!(kinds, vec![Reason::Quarantine]);
        assert!(
            readiness.reason.contains("not UTF-8"),
            "{}",
            readiness.reason
        );
    }

    #[test]
    fn losing_every_peer_makes_it_not_ready_but_never_having_had_one_does_not() {
        let mut inputs = healthy();
        inputs.members = 0;
        assert_eq!(reasons(&inputs), vec![Reason::PeersLost]);
        inputs.had_members = false;
        assert!(reasons(&inputs).is_empty());
    }

    #[test]
    fn sync_failing_counts_only_past_its_bound() {
        let mut inputs = healthy();
        inputs.sync_failing_for = Some(SYNC_FAILING_MAX / 2);
        assert!(reasons(&inputs).is_empty());
        inputs.sync_failing_for = Some(SYNC_FAILING_MAX + Duration::from_secs(1));
        assert_eq!(reasons(&inputs), vec![Reason::SyncFailing]);
    }

    #[test]
    fn the_api_down_and_catching_up_are_reasons_and_all_reasons_are_listed() {
        let inputs = Inputs {
            caught_up: false,
            step: Step {
                joined: true,
                catch_up_pending: 2,
                ..Step::default()
            },
            api_serving: false,
            ..Inputs::default()
        };
        let (readiness, kinds) = evaluate(&inputs);
        assert_eq!(kinds, vec![Reason::ApiDown, Reason::CatchingUp]);
        assert_eq!(readiness.reasons.len(), 2);
        assert!(readiness.reason.contains("API") && readiness.reason.contains("catching up"));
        assert!(
            readiness.reason.contains("2 member(s)"),
            "{}",
            readiness.reason
        );
    }

    #[test]
    fn a_node_still_looking_for_its_members_says_how_many_it_found() {
        let mut inputs = healthy();
        inputs.caught_up = false;
        inputs.step = Step {
            joined: false,
            known: 4,
            known_live: 1,
            ..Step::default()
        };
        let (readiness, kinds) = evaluate(&inputs);
        assert_eq!(kinds, vec![Reason::Joining], "joining hides catching up");
        assert!(
            readiness.reason.contains("1 of the 4"),
            "{}",
            readiness.reason
        );
    }
}
