//! Versions that arrive in chunks: joining chunks that came together and cover a version whole,
//! and reading back the chunks buffered in `__strata_buffered` until their version is complete.
//! The bookkeeping of which seqs of a partial version arrived is `Partial` in `book`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use rusqlite::Connection;

use super::super::book::{self, Ord};
use super::super::change::{Change, Changeset, SiteId};
use super::super::error::Result;
use super::ROW_EVENT;

/// Joins chunks of one version that arrived together and cover it whole, so the version is
/// merged at once instead of going through the buffer of partial versions (written to disk and
/// read back). Chunks that do not complete a version pass through as they are.
pub(super) fn reassemble(changesets: &[Changeset]) -> Vec<Cow<'_, Changeset>> {
    let mut chunks: HashMap<(SiteId, u64), Vec<&Changeset>> = HashMap::new();
    for changeset in changesets {
        if !changeset.is_complete() {
            chunks
                .entry((changeset.site, changeset.version))
                .or_default()
                .push(changeset);
        }
    }
    let mut joined: HashMap<(SiteId, u64), Changeset> = HashMap::new();
    for (key, mut parts) in chunks {
        parts.sort_by_key(|c| c.seq_first);
        let last_seq = parts.iter().map(|c| c.last_seq).min().unwrap_or(0);
        let mut covered: Option<u32> = None;
        for part in &parts {
            let contiguous = match covered {
                None => part.seq_first == 0,
                Some(end) => part.seq_first <= end.saturating_add(1),
            };
            if !contiguous {
                break;
            }
            covered = Some(covered.map_or(part.seq_last, |end| end.max(part.seq_last)));
        }
        if covered.is_none_or(|end| end < last_seq) || parts.iter().any(|p| p.validate().is_err()) {
            continue;
        }
        let mut changes: Vec<Change> = parts
            .iter()
            .flat_map(|p| p.changes.iter().cloned())
            .collect();
        changes.sort_by_key(|c| c.seq);
        changes.dedup_by_key(|c| c.seq);
        let first = parts[0];
        joined.insert(
            key,
            Changeset {
                site: first.site,
                version: first.version,
                ts: first.ts,
                seq_first: 0,
                seq_last: last_seq.max(changes.last().map_or(0, |c| c.seq)),
                last_seq: last_seq.max(changes.last().map_or(0, |c| c.seq)),
                changes,
            },
        );
    }
    let mut out = Vec::with_capacity(changesets.len());
    let mut placed = HashSet::new();
    for changeset in changesets {
        let key = (changeset.site, changeset.version);
        if changeset.is_complete() {
            out.push(Cow::Borrowed(changeset));
        } else if let Some(whole) = joined.remove(&key) {
            out.push(Cow::Owned(whole));
            placed.insert(key);
        } else if !placed.contains(&key) {
            // A chunk that stays partial.
            out.push(Cow::Borrowed(changeset));
        }
    }
    out
}

/// Buffered changes of a version from seq `from`, at most `limit` of them, in seq order.
pub(super) fn buffered_changes(
    conn: &Connection,
    ord: Ord,
    version: u64,
    from: u32,
    limit: usize,
) -> Result<Vec<Change>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, tbl, pk, col, val, cl FROM __strata_buffered
         WHERE ord = ?1 AND version = ?2 AND seq >= ?3 ORDER BY seq LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        rusqlite::params![
            ord,
            book::to_sql(version),
            from,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |row| {
            let col: String = row.get(3)?;
            Ok(Change {
                table: row.get(1)?,
                pk: row.get(2)?,
                column: if col == ROW_EVENT { None } else { Some(col) },
                value: row.get(4)?,
                cl: book::from_sql(row.get(5)?),
                seq: row.get(0)?,
            })
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
