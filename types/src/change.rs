//! Changes as they travel between nodes.
//!
//! A *version* is one local transaction of one site. Its changes are numbered by `seq` from 0;
//! a *changeset* carries the changes of one version whose seqs fall in `seqs`, so a large version
//! can travel in several chunks. `last_seq` says where the version ends, so a receiver knows when
//! it has every chunk. A node serving a version later may find that some of its cells have since
//! been overwritten; it serves what survives and claims a smaller `last_seq`, which is safe: a
//! missing cell was superseded by a write the receiver will get under that write's own version.

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::timestamp::Timestamp;
use crate::value::{CELL_BYTES_MAX, PkError, Value, check_replicable, unpack_pk};

/// Why a changeset from a peer was refused (by [`Changeset::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangesetError {
    /// The changeset is malformed (a peer bug or garbage), said how. Nothing of it was applied;
    /// the same bytes fail the same way again, so a retry does not help.
    #[error("{0}")]
    Malformed(String),
}

impl From<PkError> for ChangesetError {
    fn from(err: PkError) -> Self {
        ChangesetError::Malformed(err.to_string())
    }
}

/// A site: one writer identity, 16 random bytes made when a store is created.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SiteId(pub [u8; 16]);

impl SiteId {
    /// A fresh random site id.
    pub fn random() -> SiteId {
        SiteId(rand::random())
    }

    /// Reads a site id from 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<SiteId> {
        bytes.try_into().ok().map(SiteId)
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

impl fmt::Debug for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits tell sites apart in logs.
        write!(f, "site:{}", &hex::encode(self.0)[..8])
    }
}

/// One change: a row event (created or deleted) or one cell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The table name.
    pub table: String,
    /// The packed primary key.
    pub pk: Vec<u8>,
    /// The column, or `None` for a row event.
    pub column: Option<String>,
    /// The cell's value (NULL for row events).
    pub value: Value,
    /// The row's causal length this change belongs to: odd alive, even deleted.
    pub cl: u64,
    /// Position in the version.
    pub seq: u32,
}

impl Change {
    /// Whether this is a row event rather than a cell.
    pub fn is_row_event(&self) -> bool {
        self.column.is_none()
    }

    /// A rough encoded size, for chunking.
    pub fn size_hint(&self) -> usize {
        self.table.len()
            + self.pk.len()
            + self.column.as_ref().map_or(0, String::len)
            + self.value.size_hint()
            + 16
    }
}

/// The changes of one version with seqs in `seqs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changeset {
    /// The site that made the version.
    pub site: SiteId,
    /// The version, from 1.
    pub version: u64,
    /// When the version was made (the HLC of its transaction).
    pub ts: Timestamp,
    /// First seq covered by this chunk.
    pub seq_first: u32,
    /// Last seq covered by this chunk.
    pub seq_last: u32,
    /// Last seq of the whole version.
    pub last_seq: u32,
    /// The changes, ordered by seq.
    pub changes: Vec<Change>,
}

impl Changeset {
    /// The seqs this chunk covers.
    pub fn seqs(&self) -> RangeInclusive<u32> {
        self.seq_first..=self.seq_last
    }

    /// Whether this chunk alone holds the whole version.
    pub fn is_complete(&self) -> bool {
        self.seq_first == 0 && self.seq_last == self.last_seq
    }

    /// Checks everything a peer could have got wrong, before anything is applied.
    pub fn validate(&self) -> Result<(), ChangesetError> {
        let bad = |why: String| {
            Err(ChangesetError::Malformed(format!(
                "{:?} v{}: {why}",
                self.site, self.version
            )))
        };
        if self.version == 0 {
            return bad("version 0".into());
        }
        if self.seq_first > self.seq_last || self.seq_last > self.last_seq {
            return bad(format!(
                "seqs {}..={} with last seq {}",
                self.seq_first, self.seq_last, self.last_seq
            ));
        }
        let mut previous: Option<u32> = None;
        for change in &self.changes {
            if !self.seqs().contains(&change.seq) {
                return bad(format!("seq {} outside {:?}", change.seq, self.seqs()));
            }
            if previous.is_some_and(|p| p >= change.seq) {
                return bad(format!("seq {} out of order", change.seq));
            }
            previous = Some(change.seq);
            if change.cl == 0 {
                return bad("causal length 0".into());
            }
            if change.column.is_some() && change.cl % 2 == 0 {
                return bad(format!("a cell in a deleted row life (cl {})", change.cl));
            }
            if change.column.as_deref() == Some("") {
                return bad("empty column name".into());
            }
            if change.table.is_empty() {
                return bad("empty table name".into());
            }
            unpack_pk(&change.pk)?;
            if change.pk.len() > CELL_BYTES_MAX {
                return bad(format!(
                    "table \"{}\": primary key of {} bytes is over the limit of {CELL_BYTES_MAX} bytes",
                    change.table,
                    change.pk.len()
                ));
            }
            if let Err(why) = check_replicable(change.value.as_value_ref()) {
                return bad(format!(
                    "table \"{}\" column \"{}\": {why}",
                    change.table,
                    change.column.as_deref().unwrap_or("(row)")
                ));
            }
        }
        Ok(())
    }

    /// Splits a whole version into chunks of about `bytes_max` bytes each (at least one change
    /// per chunk). The chunks cover `0..=last_seq` between them.
    pub fn chunked(self, bytes_max: usize) -> Vec<Changeset> {
        let total: usize = self.changes.iter().map(Change::size_hint).sum();
        if total <= bytes_max || self.changes.len() <= 1 {
            return vec![self];
        }
        let mut chunks = Vec::new();
        let mut current: Vec<Change> = Vec::new();
        let mut size = 0;
        let mut first = self.seq_first;
        let mut changes = self.changes.into_iter().peekable();
        while let Some(change) = changes.next() {
            size += change.size_hint();
            current.push(change);
            if size >= bytes_max
                && let Some(next) = changes.peek()
            {
                let last = next.seq - 1;
                chunks.push(Changeset {
                    site: self.site,
                    version: self.version,
                    ts: self.ts,
                    seq_first: first,
                    seq_last: last,
                    last_seq: self.last_seq,
                    changes: std::mem::take(&mut current),
                });
                first = last + 1;
                size = 0;
            }
        }
        chunks.push(Changeset {
            site: self.site,
            version: self.version,
            ts: self.ts,
            seq_first: first,
            seq_last: self.seq_last,
            last_seq: self.last_seq,
            changes: current,
        });
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{ValueRef, pack_pk};

    fn cell(seq: u32, text: &str) -> Change {
        Change {
            table: "t".into(),
            pk: pack_pk([ValueRef::Integer(i64::from(seq))]).unwrap(),
            column: Some("c".into()),
            value: Value::Text(text.into()),
            cl: 1,
            seq,
        }
    }

    fn version(seqs: &[u32], last_seq: u32) -> Changeset {
        Changeset {
            site: SiteId([7; 16]),
            version: 3,
            ts: Timestamp(1),
            seq_first: 0,
            seq_last: last_seq,
            last_seq,
            changes: seqs.iter().map(|&s| cell(s, &"x".repeat(100))).collect(),
        }
    }

    #[test]
    fn chunks_cover_the_whole_version_without_overlap() {
        let whole = version(&[0, 1, 4, 5, 9, 10, 11], 12);
        let chunks = whole.clone().chunked(300);
        assert!(chunks.len() > 1, "{chunks:?}");
        assert_eq!(chunks[0].seq_first, 0);
        assert_eq!(chunks.last().unwrap().seq_last, 12);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].seq_last + 1, pair[1].seq_first);
        }
        let rejoined: Vec<Change> = chunks.iter().flat_map(|c| c.changes.clone()).collect();
        assert_eq!(rejoined, whole.changes);
        for chunk in &chunks {
            chunk.validate().unwrap();
        }
    }

    #[test]
    fn a_small_version_is_one_chunk() {
        let whole = version(&[0, 1], 1);
        assert_eq!(whole.clone().chunked(1 << 20), vec![whole]);
    }

    #[test]
    fn validation_rejects_what_a_peer_could_get_wrong() {
        let mut bad = version(&[0, 1], 1);
        bad.changes[1].seq = 5;
        assert!(matches!(bad.validate(), Err(ChangesetError::Malformed(_))));
        let mut bad = version(&[0, 1], 1);
        bad.changes[0].cl = 2;
        assert!(bad.validate().is_err());
        let mut bad = version(&[0, 1], 1);
        bad.changes[0].pk = vec![9, 9];
        assert!(bad.validate().is_err());
        let mut bad = version(&[1, 0], 1);
        bad.seq_last = 1;
        assert!(bad.validate().is_err());
        let mut bad = version(&[0], 0);
        bad.version = 0;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn validation_rejects_a_value_over_the_cell_limit_naming_table_and_column() {
        let mut big = version(&[0], 0);
        big.changes[0].value = Value::Blob(vec![0; CELL_BYTES_MAX + 1]);
        let err = big.validate().unwrap_err().to_string();
        assert!(err.contains("\"t\"") && err.contains("\"c\""), "{err}");
        assert!(err.contains(&CELL_BYTES_MAX.to_string()), "{err}");
        let mut fits = version(&[0], 0);
        fits.changes[0].value = Value::Blob(vec![0; CELL_BYTES_MAX]);
        fits.validate().unwrap();
    }
}
