//! Sync client sessions: one at a time, as the core schedules them. The session's decisions are
//! `session::Fetching`'s; this moves its frames, applies and quarantines.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use super::apply::{apply, quarantine_version};
use super::{Shared, SyncError};
use crate::cluster::handle::lock;
use crate::cluster::metrics::ViaLabel;
use crate::transport::{Frame, read_frame, write_frame};
use strata_core::message::{self, KIND_SYNC_REPLY, KIND_SYNC_REQUEST, SyncReply};
use strata_core::session::{Fetch, Fetching, Outcome};

/// Runs a sync session as client: sends our bookkeeping, applies what comes back. The session's
/// decisions are `session::Fetching`'s; this moves its frames.
pub(super) async fn sync_client(shared: &Shared, peer: SocketAddr) -> Result<Outcome, SyncError> {
    if shared.faults.is_blocked(&peer) {
        return Err(SyncError::Truncated);
    }
    let conn = shared.transport.connect(peer).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let masked = lock(&shared.quarantine).masked(Instant::now());
    let (mut fetching, request) = Fetching::new(peer, &shared.store.bookkeeping(), &masked);
    let payload = message::encode(&request).map_err(|e| SyncError::Malformed(e.to_string()))?;
    write_frame(
        &mut send,
        &Frame::new(KIND_SYNC_REQUEST, Bytes::from(payload)),
    )
    .await?;
    let _ = send.finish();
    let idle = shared.options.sync_idle_timeout;
    loop {
        let frame =
            tokio::time::timeout(idle, read_frame(&mut recv, shared.options.frame_bytes_max))
                .await
                .map_err(|_| SyncError::Timeout(idle))??;
        let Some(frame) = frame else {
            return Err(SyncError::Truncated);
        };
        if frame.kind != KIND_SYNC_REPLY {
            return Err(SyncError::Malformed(format!("frame kind {}", frame.kind)));
        }
        let reply = message::decode::<SyncReply>(&frame.payload)
            .map_err(|e| SyncError::Malformed(e.to_string()))?;
        match fetching.on_reply(reply) {
            Fetch::Apply(changesets) => {
                let via = ViaLabel::sync();
                shared
                    .metrics
                    .changesets_received
                    .get_or_create(&via)
                    .inc_by(changesets.len() as u64);
                shared
                    .metrics
                    .bytes_received
                    .get_or_create(&via)
                    .inc_by(frame.payload.len() as u64);
                apply(shared, changesets).await;
            }
            Fetch::Quarantine {
                site,
                version,
                reason,
            } => quarantine_version(shared, site, version, &reason),
            Fetch::Done(outcome) => return Ok(outcome),
            Fetch::Violation(why) => return Err(SyncError::Malformed(why)),
        }
    }
}
