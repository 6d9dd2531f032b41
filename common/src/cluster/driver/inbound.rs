//! Inbound streams: the accept loop, and per connection the readers of datagrams (SWIM), of uni
//! streams (pushes) and of bi streams (sync sessions served, see `serve`).

use std::sync::Arc;

use super::serve::serve_syncs;
use super::{Event, Shared};
use crate::cluster::metrics::ViaLabel;
use crate::metrics::ReasonLabel;
use crate::transport::{Conn, decode_datagram, read_frame};
use strata_core::message::{self, Changes, KIND_CHANGES, KIND_SWIM};

pub(super) async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let conn = tokio::select! {
            () = shared.cancel.cancelled() => return,
            conn = shared.transport.accept() => conn,
        };
        let Some(conn) = conn else { return };
        let _ = shared
            .events
            .send(Event::Connected {
                addr: conn.remote_addr(),
                peer: conn.peer().clone(),
            })
            .await;
        crate::telemetry::spawn(
            &shared.tracker,
            read_datagrams(Arc::clone(&shared), conn.clone()),
        );
        crate::telemetry::spawn(
            &shared.tracker,
            read_pushes(Arc::clone(&shared), conn.clone()),
        );
        crate::telemetry::spawn(&shared.tracker, serve_syncs(Arc::clone(&shared), conn));
    }
}

async fn read_datagrams(shared: Arc<Shared>, conn: Conn) {
    loop {
        let bytes = tokio::select! {
            () = shared.cancel.cancelled() => return,
            bytes = conn.read_datagram() => bytes,
        };
        let Ok(bytes) = bytes else { return };
        if shared.faults.is_blocked(&conn.remote_addr()) {
            continue;
        }
        shared.metrics.datagrams_received.inc();
        match decode_datagram(&bytes) {
            Ok((KIND_SWIM, payload)) => {
                let packet = bytes.slice_ref(payload);
                if shared.events.try_send(Event::Packet(packet)).is_err() {
                    shared
                        .metrics
                        .datagrams_dropped
                        .get_or_create(&ReasonLabel::new("queue_full"))
                        .inc();
                }
            }
            _ => {
                shared
                    .metrics
                    .datagrams_dropped
                    .get_or_create(&ReasonLabel::new("malformed"))
                    .inc();
            }
        }
    }
}

async fn read_pushes(shared: Arc<Shared>, conn: Conn) {
    loop {
        let stream = tokio::select! {
            () = shared.cancel.cancelled() => return,
            stream = conn.accept_uni() => stream,
        };
        let Ok(mut stream) = stream else { return };
        if shared.faults.is_blocked(&conn.remote_addr()) {
            let _ = stream.stop(quinn::VarInt::from_u32(0));
            continue;
        }
        let Ok(permit) = Arc::clone(&shared.readers).acquire_owned().await else {
            return;
        };
        let shared = Arc::clone(&shared);
        let from = conn.remote_addr();
        crate::telemetry::spawn(&shared.tracker.clone(), async move {
            let _permit = permit;
            loop {
                let frame = match read_frame(&mut stream, shared.options.frame_bytes_max).await {
                    Ok(Some(frame)) if frame.kind == KIND_CHANGES => frame,
                    Ok(None) => return,
                    Ok(Some(_)) | Err(_) => {
                        shared
                            .metrics
                            .broadcast_dropped
                            .get_or_create(&ReasonLabel::new("malformed"))
                            .inc();
                        let _ = stream.stop(quinn::VarInt::from_u32(0));
                        return;
                    }
                };
                let changes = match message::decode::<Changes>(&frame.payload) {
                    Ok(changes) => changes,
                    Err(err) => {
                        tracing::debug!(%from, error = %err, "malformed push");
                        shared
                            .metrics
                            .broadcast_dropped
                            .get_or_create(&ReasonLabel::new("malformed"))
                            .inc();
                        let _ = stream.stop(quinn::VarInt::from_u32(0));
                        return;
                    }
                };
                let via = ViaLabel::broadcast();
                shared
                    .metrics
                    .changesets_received
                    .get_or_create(&via)
                    .inc_by(changes.changesets.len() as u64);
                shared
                    .metrics
                    .bytes_received
                    .get_or_create(&via)
                    .inc_by(frame.payload.len() as u64);
                let sent = shared
                    .events
                    .send(Event::Received {
                        from,
                        changesets: changes.changesets,
                    })
                    .await;
                if sent.is_err() {
                    return;
                }
            }
        });
    }
}
