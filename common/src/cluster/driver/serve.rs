//! Serving sync sessions: at most `serve_max` at once (a busy server says so); each session's
//! decisions are `session::Serving`'s, this reads the store and moves frames.

use std::sync::Arc;

use bytes::Bytes;

use super::{Shared, SyncError};
use crate::cluster::metrics::{Role, RoleLabel, SyncLabels, SyncResult};
use crate::transport::{Conn, Frame, read_frame, write_frame};
use strata_core::message::{self, KIND_SYNC_REPLY, KIND_SYNC_REQUEST, SyncReply, SyncRequest};
use strata_core::session::{Serve, Serving};

pub(super) async fn serve_syncs(shared: Arc<Shared>, conn: Conn) {
    loop {
        let streams = tokio::select! {
            () = shared.cancel.cancelled() => return,
            streams = conn.accept_bi() => streams,
        };
        let Ok((send, recv)) = streams else { return };
        let peer = conn.remote_addr();
        if shared.faults.is_blocked(&peer) {
            continue;
        }
        let shared = Arc::clone(&shared);
        crate::telemetry::spawn(&shared.tracker.clone(), async move {
            let role = RoleLabel::server();
            let result = match Arc::clone(&shared.serving).try_acquire_owned() {
                Ok(_permit) => {
                    shared
                        .metrics
                        .sync_sessions_active
                        .get_or_create(&role)
                        .inc();
                    let result = serve_sync(&shared, send, recv).await;
                    shared
                        .metrics
                        .sync_sessions_active
                        .get_or_create(&role)
                        .dec();
                    match result {
                        Ok(true) => SyncResult::Complete,
                        Ok(false) => SyncResult::Partial,
                        Err(err) => {
                            tracing::debug!(%peer, error = %err, "serving a sync session failed");
                            SyncResult::Failed
                        }
                    }
                }
                Err(_) => {
                    let mut send = send;
                    if let Ok(payload) = message::encode(&Serving::busy()) {
                        let _ = write_frame(
                            &mut send,
                            &Frame::new(KIND_SYNC_REPLY, Bytes::from(payload)),
                        )
                        .await;
                    }
                    let _ = send.finish();
                    SyncResult::Busy
                }
            };
            shared
                .metrics
                .sync_sessions
                .get_or_create(&SyncLabels::new(Role::Server, result))
                .inc();
        });
    }
}

/// Serves one sync session: what the client lacks, newest first, up to the session budget.
/// Returns whether everything was sent.
async fn serve_sync(
    shared: &Shared,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<bool, SyncError> {
    let idle = shared.options.sync_idle_timeout;
    let frame = tokio::time::timeout(idle, read_frame(&mut recv, shared.options.frame_bytes_max))
        .await
        .map_err(|_| SyncError::Timeout(idle))??
        .ok_or(SyncError::Truncated)?;
    if frame.kind != KIND_SYNC_REQUEST {
        return Err(SyncError::Malformed(format!("frame kind {}", frame.kind)));
    }
    let request: SyncRequest =
        message::decode(&frame.payload).map_err(|e| SyncError::Malformed(e.to_string()))?;
    let mut serving = Serving::new(&request, &shared.store.bookkeeping(), shared.limits);
    loop {
        match serving.next() {
            Serve::Extract { site, range } => {
                let store = shared.store.clone();
                let changesets = tokio::task::spawn_blocking(move || store.changes(site, range))
                    .await
                    .map_err(|e| SyncError::Malformed(format!("extraction task: {e}")))??;
                serving.extracted(changesets);
            }
            Serve::Reply(reply) => {
                if let SyncReply::Unservable {
                    site,
                    version,
                    reason,
                } = &reply
                {
                    shared.metrics.sync_unservable.inc();
                    tracing::warn!(%site, version, %reason, "cannot serve a version over sync; skipped");
                }
                send_reply(&mut send, &reply).await?;
            }
            Serve::Finish { complete } => {
                let _ = send.finish();
                return Ok(complete);
            }
        }
    }
}

async fn send_reply(send: &mut quinn::SendStream, reply: &SyncReply) -> Result<(), SyncError> {
    let payload = message::encode(reply).map_err(|e| SyncError::Malformed(e.to_string()))?;
    write_frame(send, &Frame::new(KIND_SYNC_REPLY, Bytes::from(payload))).await?;
    Ok(())
}
