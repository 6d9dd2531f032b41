//! Sync sessions in the simulator: the real session state machines
//! (`strata_core::session`), answered from in-memory replicas.
//!
//! The server side is a real `Serving`: the simulator answers each `Extract` with the versions
//! of the window the server's replica holds (their content read from the ledger, where it lives
//! once) and sends each `Reply` as a frame; a server already serving `serve_max` sessions
//! answers `Serving::busy()`. The client side is a real `Fetching`, kept by the node while the
//! session runs; it says what to apply and how the session ended.

use std::ops::RangeInclusive;

use strata_common::cluster::driver::DriverOptions;
use strata_common::store::{Changeset, SiteId, StoreOptions};
use strata_core::Replica;
use strata_core::message::{SyncReply, SyncRequest};
use strata_core::session::{Serve, Serving, SessionLimits};
use strata_core::sync::SyncConfig;

use super::replica::{Ledger, ModelReplica};

/// Steps one served session may take at most: a session that does not finish by then is a bug
/// of the state machine, reported as a violation rather than a hung run.
const SERVE_STEPS_MAX: usize = 1_000_000;

/// The session limits a node serves with: its anti-entropy settings, the store's default chunk
/// size and the driver's default frame limit, as production derives them.
pub fn limits(config: &SyncConfig) -> SessionLimits {
    SessionLimits::new(
        config,
        StoreOptions::default().chunk_bytes,
        DriverOptions::default().frame_bytes_max,
    )
}

/// The frames a real `Serving` sends for `request` from `server`'s replica, `Done` last.
pub fn serve(
    server: &ModelReplica,
    request: &SyncRequest,
    limits: SessionLimits,
    ledger: &Ledger,
) -> Result<Vec<SyncReply>, String> {
    let mut serving = Serving::new(request, &server.states(), limits);
    let mut frames = Vec::new();
    for _ in 0..SERVE_STEPS_MAX {
        match serving.next() {
            Serve::Extract { site, range } => {
                serving.extracted(extract(server, site, range, ledger))
            }
            Serve::Reply(reply) => frames.push(reply),
            Serve::Finish { .. } => return Ok(frames),
        }
    }
    Err(format!(
        "a served session did not finish in {SERVE_STEPS_MAX} steps ({} frames so far)",
        frames.len()
    ))
}

/// What the store's extraction returns: the versions of `range` held, ascending, whole.
fn extract(
    server: &ModelReplica,
    site: SiteId,
    range: RangeInclusive<u64>,
    ledger: &Ledger,
) -> Vec<Changeset> {
    range
        .filter(|v| server.has(site, *v))
        .filter_map(|v| ledger.get(site, v))
        .map(|written| (*written.changeset).clone())
        .collect()
}
