//! The handle others hold on a running cluster: what the cluster looks like from this node
//! ([`ClusterView`]), its quarantine, readiness and fault injection ([`Cluster`]). The API, the
//! node and the regional publisher use this, never the driver.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::faults::Faults;
use crate::readiness::Readiness;
use crate::transport::PeerIdentity;
use strata_core::instep::StepStatus;
use strata_core::membership::Member;
use strata_core::quarantine::{Quarantine, Quarantined};

/// What the cluster looks like from this node, for the API and health.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// This node.
    pub me: Option<Member>,
    /// Live members with their certificate identity when known, in address order.
    pub members: Vec<(Member, Option<PeerIdentity>)>,
    /// Whether this node found its cluster and caught up with what its members held when it
    /// joined (see `instep`).
    pub caught_up: bool,
    /// What a starting node still waits for.
    pub step: StepStatus,
    /// Whether this node has ever seen another member live.
    pub had_members: bool,
    /// Since when every sync session has failed (none succeeded since); `None` while sessions
    /// succeed or none has run.
    pub sync_failing_since: Option<Instant>,
}

/// A handle on the running cluster driver.
#[derive(Clone)]
pub struct Cluster {
    pub(super) view: watch::Receiver<ClusterView>,
    pub(super) faults: Faults,
    pub(super) quarantine: Arc<std::sync::Mutex<Quarantine>>,
    pub(super) readiness: Arc<watch::Sender<Readiness>>,
}

impl Cluster {
    /// The fault injector of this node.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The current view of the cluster.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// A receiver that sees every change of the view.
    pub fn watch(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// How many versions are quarantined (could not be applied or served; retried on a
    /// back-off).
    pub fn quarantined(&self) -> usize {
        lock(&self.quarantine).len()
    }

    /// The first `max` quarantined versions with their reasons.
    pub fn quarantine_list(&self, max: usize) -> Vec<Quarantined> {
        lock(&self.quarantine).list(max)
    }

    /// The node's readiness, as its readiness task last computed it.
    pub fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    /// Publishes the node's readiness (the node's readiness task calls this).
    pub fn set_readiness(&self, readiness: Readiness) {
        self.readiness.send_replace(readiness);
    }

    /// A receiver that sees every change of the node's readiness.
    pub fn watch_readiness(&self) -> watch::Receiver<Readiness> {
        self.readiness.subscribe()
    }
}

/// Locks the quarantine; a poisoned lock still holds a consistent set (every update is one
/// map operation).
pub(super) fn lock(
    quarantine: &std::sync::Mutex<Quarantine>,
) -> std::sync::MutexGuard<'_, Quarantine> {
    quarantine
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
