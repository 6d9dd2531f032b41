//! Per-site bookkeeping: which versions of each site this store holds.
//!
//! For each site: `head`, the highest version received, and `gaps`, the versions at or below the
//! head still missing; plus *partials*, versions of which only some chunks have arrived. A
//! version is held once it is at or below the head and in no gap.
//!
//! The tables `__strata_sites` (head), `__strata_gaps` and `__strata_partials` are written in the
//! same transaction as the data they describe, so after a crash the bookkeeping never claims a
//! version whose data is not there. Memory holds a cache of them, replaced after each commit.

use std::collections::{BTreeMap, HashMap};

use rangemap::RangeInclusiveSet;
use rusqlite::{Connection, OptionalExtension, params};

use super::change::SiteId;
use super::error::{Result, StoreError};
use super::hlc::Timestamp;
use super::invariant::invariant;

pub use strata_types::SiteState;

/// A site's local ordinal (its row in `__strata_sites`), never on the wire.
pub(crate) type Ord = i64;

/// What is known about one site's versions.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct SiteBook {
    /// Highest version received (0: none).
    pub(crate) head: u64,
    /// Versions at or below `head` still missing.
    pub(crate) gaps: RangeInclusiveSet<u64>,
    /// Versions received in part, by version.
    pub(crate) partials: BTreeMap<u64, Partial>,
}

/// A version of which some chunks have arrived.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Partial {
    /// The version's timestamp.
    pub(crate) ts: Timestamp,
    /// The smallest last seq any chunk claimed (see `change` for why the smallest is safe).
    pub(crate) last_seq: u32,
    /// The seqs covered so far.
    pub(crate) have: RangeInclusiveSet<u32>,
    /// Wall-clock milliseconds when the first chunk arrived.
    pub(crate) since_ms: u64,
}

impl Partial {
    /// Whether the chunks cover the whole version.
    pub(crate) fn is_complete(&self) -> bool {
        self.have.gaps(&(0..=self.last_seq)).next().is_none()
    }

    /// Records that a chunk covering `seqs` of a version whose last seq it claims is
    /// `chunk_last_seq` arrived (validated before: a chunk never covers seqs past its version).
    pub(crate) fn cover(&mut self, seqs: std::ops::RangeInclusive<u32>, chunk_last_seq: u32) {
        invariant!(
            seqs.start() <= seqs.end() && *seqs.end() <= chunk_last_seq,
            "a chunk recorded seqs {seqs:?} of a version whose last seq is {chunk_last_seq}"
        );
        self.have.insert(seqs);
    }

    /// Checks (debug builds) that the changes read back from the buffer of a completed version
    /// are no more than the seqs its chunks covered, each one of them.
    pub(crate) fn check_buffered(&self, changes: &[super::change::Change]) {
        let covered: u64 = self
            .have
            .iter()
            .map(|r| u64::from(*r.end()) - u64::from(*r.start()) + 1)
            .sum();
        invariant!(
            changes.len() as u64 <= covered && changes.iter().all(|c| self.have.contains(&c.seq)),
            "the buffer of a version holds {} changes, seqs {:?}, but its chunks covered {:?}",
            changes.len(),
            changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
            self.have
        );
    }

    fn encode_have(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for range in self.have.iter() {
            out.extend_from_slice(&range.start().to_le_bytes());
            out.extend_from_slice(&range.end().to_le_bytes());
        }
        out
    }

    fn decode_have(bytes: &[u8]) -> Result<RangeInclusiveSet<u32>> {
        if !bytes.len().is_multiple_of(8) {
            return Err(StoreError::Corrupt(
                "partial seq ranges have a torn length".into(),
            ));
        }
        let mut have = RangeInclusiveSet::new();
        for pair in bytes.chunks_exact(8) {
            let lo = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
            let hi = u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
            have.insert(lo..=hi);
        }
        Ok(have)
    }
}

impl SiteBook {
    /// Whether version `v` is held completely.
    pub(crate) fn has(&self, v: u64) -> bool {
        v >= 1 && v <= self.head && !self.gaps.contains(&v)
    }

    /// Records version `v` as held, in memory and in the database.
    pub(crate) fn mark(&mut self, conn: &Connection, ord: Ord, v: u64) -> Result<()> {
        assert!(v >= 1, "versions start at 1");
        if v > self.head {
            if v > self.head + 1 {
                let gap = self.head + 1..=v - 1;
                conn.prepare_cached("INSERT INTO __strata_gaps (ord, lo, hi) VALUES (?1, ?2, ?3)")?
                    .execute(params![ord, to_sql(*gap.start()), to_sql(*gap.end())])?;
                self.gaps.insert(gap);
            }
            self.head = v;
        } else if let Some(gap) = self.gaps.get(&v).cloned() {
            let (lo, hi) = (*gap.start(), *gap.end());
            conn.prepare_cached("DELETE FROM __strata_gaps WHERE ord = ?1 AND lo = ?2")?
                .execute(params![ord, to_sql(lo)])?;
            let mut insert =
                conn.prepare_cached("INSERT INTO __strata_gaps (ord, lo, hi) VALUES (?1, ?2, ?3)")?;
            if lo < v {
                insert.execute(params![ord, to_sql(lo), to_sql(v - 1)])?;
            }
            if v < hi {
                insert.execute(params![ord, to_sql(v + 1), to_sql(hi)])?;
            }
            self.gaps.remove(v..=v);
        } else {
            invariant!(
                false,
                "version {v} of site ordinal {ord} marked held twice (head {})",
                self.head
            );
        }
        Ok(())
    }

    /// Moves the head to `v`, which must be past it (a local commit takes the next version).
    pub(crate) fn advance_head(&mut self, v: u64) {
        invariant!(
            v > self.head,
            "the head would move backwards from {} to {v}",
            self.head
        );
        self.head = v;
    }

    /// Persists the head (once per batch, not per version).
    pub(crate) fn save_head(&self, conn: &Connection, ord: Ord) -> Result<()> {
        check_head_forward(conn, ord, self.head)?;
        conn.prepare_cached("UPDATE __strata_sites SET head = ?2 WHERE ord = ?1")?
            .execute(params![ord, to_sql(self.head)])?;
        Ok(())
    }

    /// Persists a partial version's state.
    pub(crate) fn save_partial(&self, conn: &Connection, ord: Ord, version: u64) -> Result<()> {
        let Some(partial) = self.partials.get(&version) else {
            return Ok(());
        };
        conn.prepare_cached(
            "INSERT INTO __strata_partials (ord, version, ts, last_seq, have, since)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (ord, version) DO UPDATE SET last_seq = excluded.last_seq,
             have = excluded.have",
        )?
        .execute(params![
            ord,
            to_sql(version),
            partial.ts.as_sql(),
            partial.last_seq,
            partial.encode_have(),
            to_sql(partial.since_ms)
        ])?;
        Ok(())
    }

    /// Forgets a partial version (completed or expired), with its buffered changes.
    pub(crate) fn drop_partial(&mut self, conn: &Connection, ord: Ord, version: u64) -> Result<()> {
        self.partials.remove(&version);
        conn.prepare_cached("DELETE FROM __strata_partials WHERE ord = ?1 AND version = ?2")?
            .execute(params![ord, to_sql(version)])?;
        conn.prepare_cached("DELETE FROM __strata_buffered WHERE ord = ?1 AND version = ?2")?
            .execute(params![ord, to_sql(version)])?;
        Ok(())
    }
}

/// Every site this store knows, by ordinal, with its bookkeeping.
#[derive(Clone, Debug, Default)]
pub(crate) struct Books {
    pub(crate) sites: HashMap<Ord, SiteBook>,
    pub(crate) ids: HashMap<Ord, SiteId>,
    pub(crate) ords: HashMap<SiteId, Ord>,
}

impl Books {
    /// Loads everything from the database.
    pub(crate) fn load(conn: &Connection) -> Result<Books> {
        let mut books = Books::default();
        let mut stmt = conn.prepare("SELECT ord, site_id, head FROM __strata_sites")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let ord: Ord = row.get(0)?;
            let raw: Vec<u8> = row.get(1)?;
            let site = SiteId::from_slice(&raw).ok_or_else(|| {
                StoreError::Corrupt(format!("site {ord} has a {}-byte id", raw.len()))
            })?;
            let head: i64 = row.get(2)?;
            books.ids.insert(ord, site);
            books.ords.insert(site, ord);
            books.sites.insert(
                ord,
                SiteBook {
                    head: from_sql(head),
                    ..SiteBook::default()
                },
            );
        }
        let mut stmt = conn.prepare("SELECT ord, lo, hi FROM __strata_gaps")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let ord: Ord = row.get(0)?;
            let (lo, hi): (i64, i64) = (row.get(1)?, row.get(2)?);
            let book = books.sites.get_mut(&ord).ok_or_else(|| {
                StoreError::Corrupt(format!("gap for unknown site ordinal {ord}"))
            })?;
            if lo > hi || from_sql(hi) >= book.head {
                return Err(StoreError::Corrupt(format!(
                    "gap {lo}..={hi} of site ordinal {ord} is not below its head {}",
                    book.head
                )));
            }
            book.gaps.insert(from_sql(lo)..=from_sql(hi));
        }
        let mut stmt =
            conn.prepare("SELECT ord, version, ts, last_seq, have, since FROM __strata_partials")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let ord: Ord = row.get(0)?;
            let version: i64 = row.get(1)?;
            let partial = Partial {
                ts: Timestamp::from_sql(row.get(2)?),
                last_seq: row.get(3)?,
                have: Partial::decode_have(&row.get::<_, Vec<u8>>(4)?)?,
                since_ms: from_sql(row.get(5)?),
            };
            let book = books.sites.get_mut(&ord).ok_or_else(|| {
                StoreError::Corrupt(format!("partial for unknown site ordinal {ord}"))
            })?;
            book.partials.insert(from_sql(version), partial);
        }
        Ok(books)
    }

    /// The ordinal of a site, registering it in the database if it is new.
    pub(crate) fn ord_of(&mut self, conn: &Connection, site: SiteId) -> Result<Ord> {
        if let Some(&ord) = self.ords.get(&site) {
            return Ok(ord);
        }
        conn.prepare_cached("INSERT INTO __strata_sites (site_id, head) VALUES (?1, 0)")?
            .execute([site.0.as_slice()])?;
        let ord = conn.last_insert_rowid();
        self.ids.insert(ord, site);
        self.ords.insert(site, ord);
        self.sites.insert(ord, SiteBook::default());
        Ok(ord)
    }

    /// The bookkeeping of every site that has anything, for sync.
    pub(crate) fn states(&self) -> Vec<SiteState> {
        let mut states: Vec<SiteState> = self
            .sites
            .iter()
            .filter(|(_, book)| book.head > 0 || !book.partials.is_empty())
            .filter_map(|(ord, book)| {
                let site = *self.ids.get(ord)?;
                Some(SiteState {
                    site,
                    head: book.head,
                    gaps: book.gaps.iter().cloned().collect(),
                    partials: book.partials.keys().copied().collect(),
                })
            })
            .collect();
        states.sort_by_key(|s| s.site);
        states
    }
}

/// Asserts (debug builds; one extra query) that the head about to be saved for site `ord` is not
/// below the one saved before: a site's head never moves backwards.
pub(crate) fn check_head_forward(conn: &Connection, ord: Ord, head: u64) -> Result<()> {
    if cfg!(debug_assertions) {
        let saved: Option<i64> = conn
            .prepare_cached("SELECT head FROM __strata_sites WHERE ord = ?1")?
            .query_row([ord], |row| row.get(0))
            .optional()?;
        let saved = saved.map_or(0, from_sql);
        invariant!(
            head >= saved,
            "the head of site ordinal {ord} would move backwards from {saved} to {head}"
        );
    }
    Ok(())
}

/// Versions are u64 but SQLite integers are i64; versions never come near 2^63.
pub(crate) fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::meta::BOOTSTRAP).unwrap();
        conn
    }

    #[test]
    fn marking_out_of_order_leaves_gaps_that_later_marks_fill() {
        let conn = db();
        let mut books = Books::default();
        let ord = books.ord_of(&conn, SiteId([1; 16])).unwrap();
        let book = books.sites.get_mut(&ord).unwrap();
        for v in [1, 5, 3, 9] {
            book.mark(&conn, ord, v).unwrap();
        }
        book.save_head(&conn, ord).unwrap();
        assert_eq!(book.head, 9);
        let gaps: Vec<_> = book.gaps.iter().cloned().collect();
        assert_eq!(gaps, vec![2..=2, 4..=4, 6..=8]);
        assert!(book.has(5) && !book.has(4) && !book.has(10) && !book.has(0));
        // The database says the same after a reload.
        let reloaded = Books::load(&conn).unwrap();
        assert_eq!(reloaded.sites[&ord], *book);
        let book = books.sites.get_mut(&ord).unwrap();
        for v in [2, 4, 7, 6, 8] {
            book.mark(&conn, ord, v).unwrap();
        }
        assert!(book.gaps.is_empty());
        let reloaded = Books::load(&conn).unwrap();
        assert!(reloaded.sites[&ord].gaps.is_empty());
    }

    fn one_site() -> (Connection, Books, Ord) {
        let conn = db();
        let mut books = Books::default();
        let ord = books.ord_of(&conn, SiteId([1; 16])).unwrap();
        (conn, books, ord)
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "version 3 of site ordinal 1 marked held twice")]
    fn marking_a_version_held_twice_breaks_an_invariant() {
        let (conn, mut books, ord) = one_site();
        let book = books.sites.get_mut(&ord).unwrap();
        book.mark(&conn, ord, 3).unwrap();
        book.mark(&conn, ord, 3).unwrap();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "the head would move backwards from 5 to 5")]
    fn a_local_head_that_does_not_advance_breaks_an_invariant() {
        let (_conn, mut books, ord) = one_site();
        let book = books.sites.get_mut(&ord).unwrap();
        book.advance_head(5);
        book.advance_head(5);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "would move backwards from 9 to 4")]
    fn saving_a_head_below_the_saved_one_breaks_an_invariant() {
        let (conn, mut books, ord) = one_site();
        let book = books.sites.get_mut(&ord).unwrap();
        book.mark(&conn, ord, 9).unwrap();
        book.save_head(&conn, ord).unwrap();
        book.head = 4;
        book.save_head(&conn, ord).unwrap();
    }

    fn partial(last_seq: u32) -> Partial {
        Partial {
            ts: Timestamp(1),
            last_seq,
            have: RangeInclusiveSet::new(),
            since_ms: 0,
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a chunk recorded seqs 4..=12 of a version whose last seq is 9")]
    fn a_chunk_covering_seqs_past_its_version_breaks_an_invariant() {
        partial(9).cover(4..=12, 9);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "the buffer of a version holds 2 changes")]
    fn a_buffer_holding_seqs_no_chunk_covered_breaks_an_invariant() {
        let mut partial = partial(3);
        partial.cover(0..=3, 3);
        let change = |seq| super::super::change::Change {
            table: "t".into(),
            pk: vec![],
            column: None,
            value: super::super::value::Value::Null,
            cl: 1,
            seq,
        };
        partial.check_buffered(&[change(1), change(7)]);
    }

    #[test]
    fn chunks_within_their_version_and_their_buffer_pass_the_invariants() {
        let mut partial = partial(5);
        partial.cover(0..=2, 5);
        partial.cover(3..=5, 7);
        assert!(partial.is_complete());
        partial.check_buffered(&[]);
    }

    #[test]
    fn partial_seq_ranges_round_trip() {
        let mut have = RangeInclusiveSet::new();
        have.insert(0..=3);
        have.insert(7..=9);
        let partial = Partial {
            ts: Timestamp(1),
            last_seq: 9,
            have,
            since_ms: 0,
        };
        assert!(!partial.is_complete());
        let back = Partial::decode_have(&partial.encode_have()).unwrap();
        assert_eq!(back, partial.have);
    }
}
