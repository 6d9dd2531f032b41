//! Per-peer senders: one task and one bounded queue per peer, which dials (cached), sends
//! datagrams and writes pushes on uni streams; and the loop's side, which encodes a push once and
//! queues it to every recipient.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::{Driver, Shared};
use crate::metrics::ReasonLabel;
use crate::transport::{Conn, encode, encode_datagram};
use strata_core::message::{self, Changes, KIND_CHANGES, KIND_SWIM};

/// What a peer's sender sends.
pub(super) enum Outgoing {
    Datagram(Bytes),
    Push(Vec<Bytes>),
}

impl Driver {
    /// Queues an item for a peer's sender; returns false (and counts) when it was dropped.
    pub(super) fn enqueue(&mut self, to: SocketAddr, item: Outgoing, what: &'static str) -> bool {
        let sender = self.peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.shared.options.peer_queue_len.max(1));
            crate::telemetry::spawn(
                &self.shared.tracker,
                peer_sender(Arc::clone(&self.shared), to, rx),
            );
            tx
        });
        match sender.try_send(item) {
            Ok(()) => true,
            Err(_) => {
                let reason = ReasonLabel::new("queue_full");
                if what == "datagram" {
                    self.shared
                        .metrics
                        .datagrams_dropped
                        .get_or_create(&reason)
                        .inc();
                } else {
                    self.shared
                        .metrics
                        .broadcast_dropped
                        .get_or_create(&reason)
                        .inc();
                }
                false
            }
        }
    }
}

/// Encodes packed push frames (see `pack`) with their transport frame header.
pub(super) fn encode_push(frames: &[Arc<Changes>]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(frames.len());
    for changes in frames {
        match message::encode(&**changes) {
            Ok(payload) => {
                let mut buf = BytesMut::with_capacity(payload.len() + 8);
                if encode(KIND_CHANGES, &payload, &mut buf).is_ok() {
                    out.push(buf.freeze());
                }
            }
            Err(err) => tracing::error!(error = %err, "could not encode a push"),
        }
    }
    out
}

/// Upper bound on the frames coalesced onto one push stream. Under load a
/// peer's queue holds many small pushes; writing them on one stream saves a
/// stream open, a flow-control round and a reader wakeup per change, while the
/// bound keeps one slow stream from holding back everything queued behind it.
const PUSH_STREAM_BYTES_MAX: usize = 1 << 20;

pub(super) async fn peer_sender(
    shared: Arc<Shared>,
    addr: SocketAddr,
    mut queue: mpsc::Receiver<Outgoing>,
) {
    while let Some(item) = queue.recv().await {
        shared.metrics.peer_queue_depth.set(queue.len() as i64);
        if shared.faults.is_blocked(&addr) {
            continue;
        }
        let conn = tokio::select! {
            () = shared.cancel.cancelled() => return,
            conn = shared.transport.connect(addr) => conn,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(%addr, error = %err, "cannot reach peer");
                let reason = ReasonLabel::new("unreachable");
                let dropped = match item {
                    Outgoing::Datagram(_) => &shared.metrics.datagrams_dropped,
                    Outgoing::Push(_) => &shared.metrics.broadcast_dropped,
                };
                dropped.get_or_create(&reason).inc();
                continue;
            }
        };
        match item {
            Outgoing::Datagram(bytes) => send_datagram(&shared, &conn, &bytes),
            Outgoing::Push(mut frames) => {
                // Take whatever else is already queued for this peer; datagrams
                // go out at once, pushes ride the same stream.
                let mut size: usize = frames.iter().map(Bytes::len).sum();
                while size < PUSH_STREAM_BYTES_MAX {
                    match queue.try_recv() {
                        Ok(Outgoing::Push(more)) => {
                            size += more.iter().map(Bytes::len).sum::<usize>();
                            frames.extend(more);
                        }
                        Ok(Outgoing::Datagram(bytes)) => send_datagram(&shared, &conn, &bytes),
                        Err(_) => break,
                    }
                }
                let count = frames.len() as u64;
                if let Err(err) = push(&conn, frames).await {
                    tracing::debug!(%addr, error = %err, "push failed");
                    shared
                        .metrics
                        .broadcast_dropped
                        .get_or_create(&ReasonLabel::new("send_error"))
                        .inc_by(count);
                }
            }
        }
    }
}

fn send_datagram(shared: &Shared, conn: &Conn, bytes: &Bytes) {
    match conn.send_datagram(encode_datagram(KIND_SWIM, bytes)) {
        Ok(()) => {
            shared.metrics.datagrams_sent.inc();
        }
        Err(_) => {
            shared
                .metrics
                .datagrams_dropped
                .get_or_create(&ReasonLabel::new("send_error"))
                .inc();
        }
    }
}

/// Writes `frames` on one unidirectional stream; the reader takes frames until
/// the stream ends.
async fn push(conn: &Conn, frames: Vec<Bytes>) -> Result<(), crate::transport::TransportError> {
    let mut stream = conn.open_uni().await?;
    for frame in frames {
        stream.write_all(&frame).await?;
    }
    let _ = stream.finish();
    Ok(())
}
