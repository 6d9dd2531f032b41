//! A row's life by causal length: the rule applied before any cell of the row.
//!
//! A change from an older life of the row is dropped; a row event of a newer life moves the row
//! there (an even life deletes it; an odd one resets every cell to its default, or creates the
//! row with defaults). A cell of a newer life whose row event has not been applied here waits for
//! it (see `waiting`) instead of making the row visible: a row life becomes visible only once the
//! write that began it arrived. Row events of the same life keep the greatest stamp, so every
//! replica records the same metadata. Cells within the current life merge by the rule in `cell`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rusqlite::{Connection, ToSql, params_from_iter};

use super::super::book::Books;
use super::super::change::Change;
use super::super::clock::{self, RowLife, Stamp};
use super::super::error::{Result, StoreError};
use super::super::schema::quote;
use super::super::table::Table;
use super::super::value::{Value, unpack_pk};
use super::super::waiting;
use super::cell::{Cell, later, merge_cell};
use super::park::park;
use super::{Merged, Origin};

/// Rows never seen here inserted per statement at most: bounds a statement's parameters (the
/// limit is 32766) and the work between two checks of the next row.
const FRESH_BATCH_ROWS: usize = 64;

/// Merges the changes of one version row by row (a row's changes come one after another).
///
/// A row this node has never seen, entering one live life, is inserted whole, together with
/// the next such rows of the same table: one multi-row base insert and one multi-row insert of
/// clock entries for up to [`FRESH_BATCH_ROWS`] rows, instead of a merge per cell. That is what
/// a catching-up node does for almost every row. Any other row goes change by change, after the
/// batch so far is written. A row whose changes carry no row event is never fresh: its cells wait.
pub(crate) struct RowMerger<'a> {
    conn: &'a Connection,
    tables: &'a HashMap<String, Arc<Table>>,
    books: &'a Books,
    origin: Origin,
    fresh: Vec<&'a [Change]>,
    fresh_table: Option<Arc<Table>>,
    fresh_keys: HashSet<&'a [u8]>,
    /// Whether cells may be waiting for their row life; `None` until first asked.
    may_wait: Option<bool>,
    /// Cells that started to wait for their row life.
    waited: usize,
}

impl<'a> RowMerger<'a> {
    /// A merger for the changes of one version.
    pub(crate) fn new(
        conn: &'a Connection,
        tables: &'a HashMap<String, Arc<Table>>,
        books: &'a Books,
        origin: Origin,
    ) -> RowMerger<'a> {
        RowMerger {
            conn,
            tables,
            books,
            origin,
            fresh: Vec::new(),
            fresh_table: None,
            fresh_keys: HashSet::new(),
            may_wait: None,
            waited: 0,
        }
    }

    /// Cells of this version that started to wait for their row life.
    pub(crate) fn waited(&self) -> usize {
        self.waited
    }

    /// Whether cells waited for their row life while this version merged (so some may have
    /// started or stopped waiting).
    pub(crate) fn saw_waiting(&self) -> bool {
        self.may_wait == Some(true)
    }

    /// Whether any cell may wait (asked once per version, then tracked).
    fn may_wait(&mut self) -> Result<bool> {
        match self.may_wait {
            Some(known) => Ok(known),
            None => {
                let known = waiting::any(self.conn)?;
                self.may_wait = Some(known);
                Ok(known)
            }
        }
    }

    /// Merges the changes of one row. Returns how many altered it, and how many were parked.
    pub(crate) fn row(&mut self, changes: &'a [Change]) -> Result<(usize, usize)> {
        let Some(first) = changes.first() else {
            return Ok((0, 0));
        };
        if let Some(table) = self.tables.get(&first.table)
            && changes.len() > 1
            && first.cl % 2 == 1
            && changes.iter().all(|c| c.cl == first.cl)
            && changes.iter().all(|c| {
                c.column
                    .as_deref()
                    .is_none_or(|col| table.tracked_position(col).is_some())
            })
            && changes.iter().any(Change::is_row_event)
            && distinct_columns(changes)
            && !self.fresh_keys.contains(first.pk.as_slice())
            && clock::row_get(self.conn, table, &first.pk)?.is_none()
            && !(self.may_wait()? && waiting::for_row(self.conn, &first.table, &first.pk)?)
        {
            if self
                .fresh_table
                .as_ref()
                .is_some_and(|t| t.tid != table.tid)
                || self.fresh.len() >= FRESH_BATCH_ROWS
            {
                self.flush()?;
            }
            self.fresh_table = Some(Arc::clone(table));
            self.fresh_keys.insert(&first.pk);
            self.fresh.push(changes);
            return Ok((changes.len(), 0));
        }
        // The batch first: this row may be one of them again.
        self.flush()?;
        let (mut changed, mut parked) = (0, 0);
        for change in changes {
            let may_wait = self.may_wait()?;
            match merge_gated(
                self.conn,
                self.tables,
                self.books,
                self.origin,
                change,
                may_wait,
            )? {
                Merged::Changed => changed += 1,
                Merged::Parked => parked += 1,
                Merged::Waiting => {
                    self.waited += 1;
                    self.may_wait = Some(true);
                }
                Merged::Unchanged => {}
            }
        }
        Ok((changed, parked))
    }

    /// Writes what is still batched.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.flush()
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(table) = self.fresh_table.take() {
            insert_rows(self.conn, &table, self.origin, &self.fresh)?;
        }
        self.fresh.clear();
        self.fresh_keys.clear();
        Ok(())
    }
}

/// Whether no column appears twice (a well-formed version never repeats one).
fn distinct_columns(changes: &[Change]) -> bool {
    let mut seen: Vec<&str> = Vec::with_capacity(changes.len());
    for change in changes {
        let column = change.column.as_deref().unwrap_or("");
        if seen.contains(&column) {
            return false;
        }
        seen.push(column);
    }
    true
}

/// Inserts rows never seen here, each with every cell its changes carry (the other columns
/// take their defaults, as SQLite would give them).
fn insert_rows(conn: &Connection, table: &Table, origin: Origin, rows: &[&[Change]]) -> Result<()> {
    let stamp = |seq| Stamp {
        ts: origin.ts,
        site: origin.ord,
        version: origin.version,
        seq,
    };
    let width = table.key.len() + table.tracked.len();
    let mut base: Vec<Value> = Vec::with_capacity(rows.len() * width);
    let mut entries: Vec<(&[u8], i64, u64, Stamp)> = Vec::new();
    for changes in rows {
        let first = &changes[0];
        let key_values = unpack_pk(&first.pk)?;
        if key_values.len() != table.key.len() {
            return Err(StoreError::Malformed(format!(
                "key of \"{}\" has {} columns, expected {}",
                table.name(),
                key_values.len(),
                table.key.len()
            )));
        }
        base.extend(key_values);
        let mut row_stamp = Stamp::IMPLIED;
        let start = base.len();
        base.extend(table.tracked.iter().map(|&p| table.default_of(p).clone()));
        for change in *changes {
            match change
                .column
                .as_deref()
                .and_then(|c| table.tracked_position(c))
            {
                Some(position) => {
                    if let Some(slot) = table.tracked.iter().position(|&p| p == position) {
                        base[start + slot] = change.value.clone();
                    }
                    entries.push((&first.pk, position as i64, first.cl, stamp(change.seq)));
                }
                None => row_stamp = stamp(change.seq),
            }
        }
        entries.push((&first.pk, clock::ROW_CID, first.cl, row_stamp));
    }
    let columns: Vec<String> = table
        .key
        .iter()
        .chain(&table.tracked)
        .map(|&p| quote(table.column_name(p)))
        .collect();
    for chunk in base.chunks(width * FRESH_BATCH_ROWS) {
        let sql = multi_row_insert(
            &quote(table.name()),
            &columns.join(", "),
            width,
            chunk.len() / width,
        );
        conn.prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(chunk.iter()))?;
    }
    // Clock entries: 7 values each, a few hundred per statement.
    for chunk in entries.chunks(256) {
        let sql = multi_row_insert(
            &format!("__strata_clock_{}", table.tid),
            "pk, cid, cl, ts, site, version, seq",
            7,
            chunk.len(),
        );
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 7);
        let owned: Vec<[i64; 5]> = chunk
            .iter()
            .map(|(_, cid, cl, s)| {
                [
                    *cid,
                    super::book::to_sql(*cl),
                    s.ts.as_sql(),
                    s.site,
                    super::book::to_sql(s.version),
                ]
            })
            .collect();
        let seqs: Vec<u32> = chunk.iter().map(|(_, _, _, s)| s.seq).collect();
        for (i, (pk, ..)) in chunk.iter().enumerate() {
            params.push(pk);
            for value in &owned[i] {
                params.push(value);
            }
            params.push(&seqs[i]);
        }
        conn.prepare_cached(&sql)?.execute(params.as_slice())?;
    }
    Ok(())
}

/// `INSERT INTO <table> (<columns>) VALUES (?, ..), (?, ..), ..` for `rows` rows of `width`.
fn multi_row_insert(table: &str, columns: &str, width: usize, rows: usize) -> String {
    let mut sql = format!("INSERT INTO {table} ({columns}) VALUES ");
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..width {
            n += 1;
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push('?');
            sql.push_str(&n.to_string());
        }
        sql.push(')');
    }
    sql
}

/// Merges one change. `tables` are the tables by name; `books` gives site ids for ordering.
pub(crate) fn merge(
    conn: &Connection,
    tables: &HashMap<String, Arc<Table>>,
    books: &Books,
    origin: Origin,
    change: &Change,
) -> Result<Merged> {
    merge_gated(conn, tables, books, origin, change, true)
}

/// [`merge`], told whether cells may be waiting for their row life (`false` skips looking).
fn merge_gated(
    conn: &Connection,
    tables: &HashMap<String, Arc<Table>>,
    books: &Books,
    origin: Origin,
    change: &Change,
    may_wait: bool,
) -> Result<Merged> {
    let Some(table) = tables.get(&change.table) else {
        park(conn, origin, change)?;
        return Ok(Merged::Parked);
    };
    let stamp = Stamp {
        ts: origin.ts,
        site: origin.ord,
        version: origin.version,
        seq: change.seq,
    };
    let key_values = unpack_pk(&change.pk)?;
    if key_values.len() != table.key.len() {
        return Err(StoreError::Malformed(format!(
            "key of \"{}\" has {} columns, expected {}",
            table.name(),
            key_values.len(),
            table.key.len()
        )));
    }
    let life = clock::row_get(conn, table, &change.pk)?;
    let local_cl = life.map_or(0, |l| l.cl);
    if change.cl < local_cl {
        return Ok(Merged::Unchanged);
    }
    let Some(column) = change.column.as_deref() else {
        // A row event.
        let changed = if change.cl > local_cl {
            let changed = enter_life(conn, table, &change.pk, &key_values, life, change.cl, stamp)?;
            if may_wait {
                waiting::drop_older(conn, &change.table, &change.pk, change.cl)?;
            }
            changed
        } else {
            let life = life
                .ok_or_else(|| StoreError::Corrupt("equal causal length without a row".into()))?;
            // Same life: keep the greatest row event, so every replica records the same one.
            if later(books, stamp, (life.ts, life.site, life.seq)) {
                clock::row_set(conn, table, &change.pk, life.cl, stamp)?;
            }
            false
        };
        let arrived = may_wait
            && change.cl % 2 == 1
            && life_arrived(conn, table, books, &change.pk, &key_values, change.cl)? > 0;
        return Ok(if changed || arrived {
            Merged::Changed
        } else {
            Merged::Unchanged
        });
    };
    let Some(position) = table.tracked_position(column) else {
        park(conn, origin, change)?;
        return Ok(Merged::Parked);
    };
    if change.cl > local_cl {
        // The row event that began this life has not been applied here: the cell waits for it
        // rather than make visible a row nobody wrote (this cell and defaults).
        return Ok(if waiting::wait(conn, origin, change)? {
            Merged::Waiting
        } else {
            Merged::Unchanged
        });
    }
    let life =
        life.ok_or_else(|| StoreError::Corrupt("equal causal length without a row".into()))?;
    let cell = Cell {
        pk: &change.pk,
        key_values: &key_values,
        position,
        value: &change.value,
    };
    Ok(if merge_cell(conn, table, books, &life, &cell, stamp)? {
        Merged::Changed
    } else {
        Merged::Unchanged
    })
}

/// The row event of life `cl` of a row has been applied here (remote, or a local insert): the
/// cells that waited for it merge by the usual rules. Returns how many changed the base row.
pub(crate) fn life_arrived(
    conn: &Connection,
    table: &Table,
    books: &Books,
    pk: &[u8],
    key_values: &[Value],
    cl: u64,
) -> Result<usize> {
    let cells = waiting::take(conn, table.name(), pk, cl)?;
    if cells.is_empty() {
        return Ok(0);
    }
    let life = clock::row_get(conn, table, pk)?
        .filter(|l| l.cl == cl)
        .ok_or_else(|| StoreError::Corrupt("row life vanished after it was written".into()))?;
    let mut changed = 0;
    for waited in cells {
        // A column of the schema when the cell waited stays one: columns are never dropped.
        let Some(position) = waited
            .change
            .column
            .as_deref()
            .and_then(|c| table.tracked_position(c))
        else {
            park(conn, waited.origin, &waited.change)?;
            continue;
        };
        let stamp = Stamp {
            ts: waited.origin.ts,
            site: waited.origin.ord,
            version: waited.origin.version,
            seq: waited.change.seq,
        };
        let cell = Cell {
            pk,
            key_values,
            position,
            value: &waited.change.value,
        };
        if merge_cell(conn, table, books, &life, &cell, stamp)? {
            changed += 1;
        }
    }
    Ok(changed)
}

/// After a local transaction: the row lives its inserts began (odd row events) may have cells
/// waiting for them, which merge now; cells waiting for a life older than a row's life now (a
/// row inserted and deleted in the transaction) are dropped. Returns whether any cell waited at
/// all (so the gauge of waiting cells may have moved).
pub(crate) fn local_lives_arrived(
    conn: &Connection,
    tables: &HashMap<String, Arc<Table>>,
    books: &Books,
    changes: &[Change],
) -> Result<bool> {
    if !waiting::any(conn)? {
        return Ok(false);
    }
    for change in changes {
        if !change.is_row_event() {
            continue;
        }
        let Some(table) = tables.get(&change.table) else {
            continue;
        };
        waiting::drop_older(conn, &change.table, &change.pk, change.cl)?;
        if change.cl % 2 == 1 {
            let key_values = unpack_pk(&change.pk)?;
            life_arrived(conn, table, books, &change.pk, &key_values, change.cl)?;
        }
    }
    Ok(true)
}

/// Moves a row to a newer life. Returns whether the base row changed.
fn enter_life(
    conn: &Connection,
    table: &Table,
    pk: &[u8],
    key_values: &[Value],
    life: Option<RowLife>,
    cl: u64,
    stamp: Stamp,
) -> Result<bool> {
    let key_params = || params_from_iter(key_values.iter());
    let exists = base_exists(conn, table, key_values)?;
    let changed = if cl.is_multiple_of(2) {
        exists
            && conn
                .prepare_cached(&table.sql.base_delete)?
                .execute(key_params())?
                > 0
    } else if exists {
        if !table.sql.base_reset.is_empty() {
            conn.prepare_cached(&table.sql.base_reset)?
                .execute(key_params())?;
        }
        true
    } else {
        conn.prepare_cached(&table.sql.base_insert_key)?
            .execute(key_params())?;
        true
    };
    clock::row_set(conn, table, pk, cl, stamp)?;
    if life.is_some() {
        clock::cells_clear(conn, table, pk)?;
    }
    Ok(changed)
}

pub(super) fn base_exists(conn: &Connection, table: &Table, key_values: &[Value]) -> Result<bool> {
    let mut stmt = conn.prepare_cached(&table.sql.base_select)?;
    let mut rows = stmt.query(params_from_iter(key_values.iter()))?;
    Ok(rows.next()?.is_some())
}
