//! Packing changesets into frames: large versions are cut into chunks of about `chunk_bytes`,
//! and chunks are gathered into frames of about a frame budget. Broadcast pushes and served sync
//! sessions pack the same way, with the same size estimate, so a version that crosses the
//! network one way crosses it the other way too.
//!
//! Pure: no encoding, no I/O. The frame header belongs to the transport.

use crate::store::Changeset;

/// Bytes counted for a chunk's envelope (site, version, timestamp, seqs, vector lengths) on top
/// of its changes' size hints: an estimate, kept cheap because it runs for every chunk.
pub const CHUNK_OVERHEAD_BYTES: usize = 64;

/// The estimated encoded size of one chunk, bytes.
pub fn estimate(chunk: &Changeset) -> usize {
    chunk.changes.iter().map(|c| c.size_hint()).sum::<usize>() + CHUNK_OVERHEAD_BYTES
}

/// `changeset` cut into chunks of about `chunk_bytes`, each with its estimated size.
pub fn sized_chunks(changeset: Changeset, chunk_bytes: usize) -> Vec<(Changeset, usize)> {
    changeset
        .chunked(chunk_bytes)
        .into_iter()
        .map(|chunk| {
            let size = estimate(&chunk);
            (chunk, size)
        })
        .collect()
}

/// Gathers chunks into frames of at most about `frame_bytes` (estimated): a frame is closed when
/// the next chunk would take it over the budget, so only a frame of one chunk can exceed it.
#[derive(Debug, Default)]
pub struct Packer {
    frame_bytes: usize,
    batch: Vec<Changeset>,
    size: usize,
}

impl Packer {
    /// A packer of frames of about `frame_bytes`.
    pub fn new(frame_bytes: usize) -> Packer {
        Packer {
            frame_bytes,
            batch: Vec::new(),
            size: 0,
        }
    }

    /// Adds a chunk of estimated size `size`; returns the frame it closed, if it closed one.
    pub fn add(&mut self, chunk: Changeset, size: usize) -> Option<Vec<Changeset>> {
        let closed = if self.size + size > self.frame_bytes && !self.batch.is_empty() {
            self.size = 0;
            Some(std::mem::take(&mut self.batch))
        } else {
            None
        };
        self.size += size;
        self.batch.push(chunk);
        closed
    }

    /// The last, partly filled frame, if any chunk is left.
    pub fn finish(&mut self) -> Option<Vec<Changeset>> {
        self.size = 0;
        (!self.batch.is_empty()).then(|| std::mem::take(&mut self.batch))
    }
}
