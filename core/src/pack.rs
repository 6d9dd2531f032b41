//! Packing changesets into frames: large versions are cut into chunks of about `chunk_bytes`,
//! and chunks are gathered into frames of about a frame budget. Broadcast pushes and served sync
//! sessions pack the same way, with the same size estimate, so a version that crosses the
//! network one way crosses it the other way too.
//!
//! Pure: no encoding, no I/O. The frame header belongs to the transport.

use std::sync::Arc;

use crate::message::Changes;
use strata_types::Changeset;

/// The packing limits of broadcast pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLimits {
    /// Target size of a chunk of a large version, bytes (the store's `chunk_bytes`).
    pub chunk_bytes: usize,
    /// Target size of one pushed frame, bytes (changesets are packed up to it).
    pub push_frame_bytes: usize,
}

impl Default for PackLimits {
    fn default() -> Self {
        PackLimits {
            // The store's default chunk size.
            chunk_bytes: 256 * 1024,
            // Large enough that a push of many small versions is one frame, small enough that
            // one frame does not hold a reader for long.
            push_frame_bytes: 1 << 20,
        }
    }
}

/// Packs changesets into push frames of about `push_frame_bytes`, chunking large versions
/// first. Every recipient of a broadcast gets the same frames.
pub fn pack<'a>(
    changesets: impl IntoIterator<Item = &'a Changeset>,
    limits: PackLimits,
) -> Vec<Arc<Changes>> {
    let mut packer = Packer::new(limits.push_frame_bytes);
    let mut frames = Vec::new();
    for changeset in changesets {
        for (chunk, size) in sized_chunks(changeset.clone(), limits.chunk_bytes) {
            if let Some(frame) = packer.add(chunk, size) {
                frames.push(Arc::new(Changes { changesets: frame }));
            }
        }
    }
    if let Some(frame) = packer.finish() {
        frames.push(Arc::new(Changes { changesets: frame }));
    }
    frames
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::{Change, SiteId, Timestamp, Value};

    fn version(version: u64, cells: u32, cell_bytes: usize) -> Changeset {
        Changeset {
            site: SiteId([1; 16]),
            version,
            ts: Timestamp::default(),
            seq_first: 0,
            seq_last: cells - 1,
            last_seq: cells - 1,
            changes: (0..cells)
                .map(|seq| Change {
                    table: "t".into(),
                    pk: vec![0],
                    column: Some("c".into()),
                    value: Value::Blob(vec![7; cell_bytes]),
                    cl: 1,
                    seq,
                })
                .collect(),
        }
    }

    #[test]
    fn small_versions_share_one_frame() {
        let versions: Vec<Changeset> = (1..=5).map(|v| version(v, 1, 10)).collect();
        let frames = pack(&versions, PackLimits::default());
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].changesets, versions);
    }

    #[test]
    fn large_versions_are_chunked_and_frames_stay_near_the_budget() {
        let limits = PackLimits {
            chunk_bytes: 4_096,
            push_frame_bytes: 16 << 10,
        };
        let versions: Vec<Changeset> = (1..=4).map(|v| version(v, 20, 1_000)).collect();
        let frames = pack(&versions, limits);
        assert!(frames.len() > 1, "{} frames", frames.len());
        let mut seen: Vec<(u64, u32)> = Vec::new();
        for frame in &frames {
            let size: usize = frame.changesets.iter().map(estimate).sum();
            assert!(
                size <= limits.push_frame_bytes || frame.changesets.len() == 1,
                "a frame of {size} estimated bytes"
            );
            for chunk in &frame.changesets {
                assert!(
                    !chunk.is_complete(),
                    "version {} was not chunked",
                    chunk.version
                );
                seen.extend(chunk.changes.iter().map(|c| (chunk.version, c.seq)));
            }
        }
        // Every change of every version, once, in order.
        let want: Vec<(u64, u32)> = (1..=4).flat_map(|v| (0..20).map(move |s| (v, s))).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn nothing_to_pack_is_no_frame() {
        assert!(pack(&[], PackLimits::default()).is_empty());
    }
}
