//! Sync sessions in the simulator: the server answers from its in-memory replica, the client
//! applies what comes back.
//!
//! The server side keeps the production session's rules: what the client lacks
//! (`sync::missing`), newest first, cut to the session budget and split into extraction windows
//! (`sync::plan`), packed into `SyncReply::Changes` frames of at most `frame_bytes_max` bytes,
//! then `Done`; a server already serving `serve_max` sessions answers `Busy`. Extraction reads
//! the content of each version from the ledger, where it lives once.

use strata_common::cluster::Replica;
use strata_common::cluster::message::{SyncReply, SyncRequest};
use strata_common::cluster::sync::{self, SyncConfig};
use strata_common::store::Changeset;

use super::replica::{Ledger, ModelReplica};

/// Versions one extraction reads at most while serving (the driver's `SYNC_WINDOW_VERSIONS`).
pub const WINDOW_VERSIONS: u64 = 256;

/// Room per changeset in a frame besides its changes, bytes (as the driver counts it).
const CHANGESET_OVERHEAD_BYTES: usize = 64;

/// What the client sends first: its bookkeeping.
pub fn request(replica: &ModelReplica) -> SyncRequest {
    SyncRequest {
        sites: replica.states(),
    }
}

/// The frames the server sends for `request`, `Done` last.
pub fn serve(
    server: &ModelReplica,
    request: &SyncRequest,
    config: &SyncConfig,
    ledger: &Ledger,
) -> Vec<SyncReply> {
    let missing = sync::missing(&server.states(), &request.sites);
    let (windows, complete) = sync::plan(&missing, config.session_versions_max, WINDOW_VERSIONS);
    let mut frames = Vec::new();
    let mut batch: Vec<Changeset> = Vec::new();
    let mut size = 0;
    for (site, range) in windows {
        for version in range.rev() {
            if !server.has(site, version) {
                continue;
            }
            let Some(written) = ledger.get(site, version) else {
                continue;
            };
            let changeset = (*written.changeset).clone();
            let bytes = changeset
                .changes
                .iter()
                .map(|c| c.size_hint())
                .sum::<usize>()
                + CHANGESET_OVERHEAD_BYTES;
            if size + bytes > config.frame_bytes_max && !batch.is_empty() {
                frames.push(SyncReply::Changes(std::mem::take(&mut batch)));
                size = 0;
            }
            size += bytes;
            batch.push(changeset);
        }
    }
    if !batch.is_empty() {
        frames.push(SyncReply::Changes(batch));
    }
    frames.push(SyncReply::Done { complete });
    frames
}
