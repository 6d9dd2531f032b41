//! Recording a local transaction: captured row writes become clock metadata and one changeset.
//!
//! Every change gets the next `seq` of the version. A cell written twice in one transaction keeps
//! only its last write (in the metadata and in the changeset), and a delete drops the cells the
//! transaction wrote to that row before; seqs of dropped changes become holes, which chunk ranges
//! cover. The changeset is built from the captured values, so broadcasting a commit reads nothing
//! back from the database.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::Connection;

use super::book::Ord;
use super::capture::{RowOp, RowWrite};
use super::change::{Change, Changeset, SiteId};
use super::clock::{self, Stamp};
use super::error::{Result, StoreError};
use super::hlc::Timestamp;
use super::table::Table;
use super::value::{Value, display_pk};

/// Accumulates one local transaction's metadata writes and changes.
pub(crate) struct Recorder {
    site: SiteId,
    ord: Ord,
    version: u64,
    ts: Timestamp,
    seq: u32,
    changes: Vec<Option<Change>>,
    /// Slot of the current row event, and of each cell, per (table, key).
    rows: HashMap<(i64, Vec<u8>), RowSlots>,
}

#[derive(Default)]
struct RowSlots {
    event: Option<usize>,
    cells: HashMap<usize, usize>,
}

impl Recorder {
    /// Starts recording version `version` at timestamp `ts`.
    pub(crate) fn new(site: SiteId, ord: Ord, version: u64, ts: Timestamp) -> Recorder {
        Recorder {
            site,
            ord,
            version,
            ts,
            seq: 0,
            changes: Vec::new(),
            rows: HashMap::new(),
        }
    }

    fn stamp(&mut self) -> Stamp {
        let stamp = Stamp {
            ts: self.ts,
            site: self.ord,
            version: self.version,
            seq: self.seq,
        };
        self.seq += 1;
        stamp
    }

    fn push(
        &mut self,
        table: &Table,
        pk: &[u8],
        column: Option<usize>,
        value: Value,
        cl: u64,
        seq: u32,
    ) {
        let slots = self.rows.entry((table.tid, pk.to_vec())).or_default();
        let slot = self.changes.len();
        match column {
            None => {
                // A new row event supersedes the row's earlier event and cells in this version.
                if let Some(old) = slots.event.replace(slot) {
                    self.changes[old] = None;
                }
                for (_, old) in slots.cells.drain() {
                    self.changes[old] = None;
                }
            }
            Some(position) => {
                if let Some(old) = slots.cells.insert(position, slot) {
                    self.changes[old] = None;
                }
            }
        }
        self.changes.push(Some(Change {
            table: table.name().to_owned(),
            pk: pk.to_vec(),
            column: column.map(|p| table.column_name(p).to_owned()),
            value,
            cl,
            seq,
        }));
    }

    /// Records the row writes one statement made. `index` is the statement's position, for errors.
    pub(crate) fn record(
        &mut self,
        conn: &Connection,
        writes: Vec<RowWrite>,
        index: usize,
    ) -> Result<()> {
        for write in writes {
            self.record_one(conn, write, index)?;
        }
        Ok(())
    }

    fn record_one(&mut self, conn: &Connection, write: RowWrite, index: usize) -> Result<()> {
        let table: &Arc<Table> = &write.table;
        let existing = clock::row_get(conn, table, &write.pk)?;
        match write.op {
            RowOp::Insert => {
                let cl = match existing {
                    None => {
                        let stamp = self.stamp();
                        clock::row_set(conn, table, &write.pk, 1, stamp)?;
                        self.push(table, &write.pk, None, Value::Null, 1, stamp.seq);
                        1
                    }
                    Some(life) if life.cl % 2 == 0 => {
                        // Re-insert of a deleted row: a new life with every cell at its default
                        // (a deleted row has no cell clocks left).
                        let stamp = self.stamp();
                        let cl = life.cl + 1;
                        clock::row_set(conn, table, &write.pk, cl, stamp)?;
                        self.push(table, &write.pk, None, Value::Null, cl, stamp.seq);
                        cl
                    }
                    Some(_) => {
                        // Only REPLACE inserts over a live row: it deleted the row without firing
                        // the delete trigger.
                        return Err(StoreError::Refused {
                            index,
                            reason: format!(
                                "INSERT OR REPLACE / REPLACE over row {} of replicated table \
                                 \"{}\" is refused: it would delete the row behind replication's \
                                 back. Use INSERT ... ON CONFLICT ({}) DO UPDATE SET ...",
                                display_pk(&write.pk),
                                table.name(),
                                table.def.primary_key().join(", ")
                            ),
                        });
                    }
                };
                for (position, value) in write.cells {
                    let stamp = self.stamp();
                    clock::clock_set(conn, table, &write.pk, position, cl, stamp)?;
                    self.push(table, &write.pk, Some(position), value, cl, stamp.seq);
                }
            }
            RowOp::Update => {
                let life = alive(existing, table, &write.pk)?;
                for (position, value) in write.cells {
                    let stamp = self.stamp();
                    clock::clock_set(conn, table, &write.pk, position, life.cl, stamp)?;
                    self.push(table, &write.pk, Some(position), value, life.cl, stamp.seq);
                }
            }
            RowOp::Delete => {
                let life = alive(existing, table, &write.pk)?;
                let stamp = self.stamp();
                let cl = life.cl + 1;
                clock::row_set(conn, table, &write.pk, cl, stamp)?;
                clock::cells_clear(conn, table, &write.pk)?;
                self.push(table, &write.pk, None, Value::Null, cl, stamp.seq);
            }
        }
        Ok(())
    }

    /// The version's changeset (whole, not yet chunked), or `None` if nothing changed.
    pub(crate) fn finish(self) -> Option<Changeset> {
        let changes: Vec<Change> = self.changes.into_iter().flatten().collect();
        let last_seq = changes.last()?.seq;
        Some(Changeset {
            site: self.site,
            version: self.version,
            ts: self.ts,
            seq_first: 0,
            seq_last: last_seq,
            last_seq,
            changes,
        })
    }
}

fn alive(existing: Option<clock::RowLife>, table: &Table, pk: &[u8]) -> Result<clock::RowLife> {
    match existing {
        Some(life) if life.cl % 2 == 1 => Ok(life),
        other => Err(StoreError::Corrupt(format!(
            "row {} of \"{}\" exists but its metadata says {:?}; was it written around the store?",
            display_pk(pk),
            table.name(),
            other.map(|l| l.cl)
        ))),
    }
}
