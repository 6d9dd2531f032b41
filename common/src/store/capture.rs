//! Change capture: the SQL functions the capture triggers call, registered on the writer
//! connection only.
//!
//! `__strata_capturing()` gates the triggers: it is true while a local transaction runs and false
//! while remote changes are applied. `__strata_capture(tid, op, ...)` receives the key and the
//! old and new values of a written row and buffers what changed; the writer turns the buffer into
//! clock metadata after each statement (see `local`). Comparing old and new here is what makes a
//! whole-object re-publish that changes nothing record nothing.
//!
//! Neither function is deterministic (SQLite must call them on every row). Any other connection
//! lacks them, so its writes to a replicated table fail with "no such function".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Error as SqlError};

use super::table::{OP_INSERT, OP_UPDATE, Table};
use super::value::{
    CELL_BYTES_MAX, PkError, Unreplicable, Value, check_replicable, display_pk, pack_pk,
};

/// What a trigger saw happen to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowOp {
    Insert,
    Update,
    Delete,
}

/// One captured row write: the table, the key, and the cells that changed (by column position).
#[derive(Debug)]
pub(crate) struct RowWrite {
    pub(crate) table: Arc<Table>,
    pub(crate) op: RowOp,
    pub(crate) pk: Vec<u8>,
    pub(crate) cells: Vec<(usize, Value)>,
}

/// Why the capture function refused a write; turned into a `StoreError` by the writer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error(
        "primary key of replicated table \"{table}\" cannot be updated (row {pk}); delete the row and insert a new one"
    )]
    KeyUpdate { table: String, pk: String },
    #[error("table \"{table}\": {source}")]
    Key { table: String, source: PkError },
    #[error("table \"{table}\" column \"{column}\": {why}; such a value cannot replicate")]
    Unreplicable {
        table: String,
        column: String,
        why: Unreplicable,
    },
    #[error("transaction changes more than {limit} cells")]
    TooManyCells { limit: usize },
    #[error("capture called for unknown table id {0}")]
    UnknownTable(i64),
    #[error("capture called with {got} arguments for table \"{table}\", expected {expected}")]
    Arity {
        table: String,
        got: usize,
        expected: usize,
    },
}

/// The capture buffer shared by the writer and the functions it registers.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    capturing: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    tables: HashMap<i64, Arc<Table>>,
    writes: Vec<RowWrite>,
    cells: usize,
    cells_max: usize,
    error: Option<CaptureError>,
}

impl Capture {
    /// Registers `__strata_capturing` and `__strata_capture` on the writer connection.
    pub(crate) fn register(self: &Arc<Self>, conn: &Connection) -> rusqlite::Result<()> {
        // Not DIRECTONLY: that flag would forbid the very triggers that call them.
        let flags = FunctionFlags::SQLITE_UTF8;
        let gate = Arc::clone(self);
        conn.create_scalar_function("__strata_capturing", 0, flags, move |_| {
            Ok(gate.capturing.load(Ordering::Relaxed))
        })?;
        let capture = Arc::clone(self);
        conn.create_scalar_function("__strata_capture", -1, flags, move |ctx| {
            capture.capture(ctx).map_err(|err| {
                let message = err.to_string();
                capture.lock().error.get_or_insert(err);
                SqlError::UserFunctionError(message.into())
            })?;
            Ok(rusqlite::types::Null)
        })
    }

    /// Switches capture on (local transactions) or off (applying remote changes).
    pub(crate) fn set_capturing(&self, on: bool) {
        self.capturing.store(on, Ordering::Relaxed);
    }

    /// Replaces the tables the triggers may name (after a schema change).
    pub(crate) fn set_tables(&self, tables: HashMap<i64, Arc<Table>>) {
        self.lock().tables = tables;
    }

    /// Starts a transaction: empties the buffer and sets the cell limit.
    pub(crate) fn begin(&self, cells_max: usize) {
        let mut state = self.lock();
        state.writes.clear();
        state.cells = 0;
        state.cells_max = cells_max;
        state.error = None;
    }

    /// Takes what was captured since the last call.
    pub(crate) fn take(&self) -> Vec<RowWrite> {
        std::mem::take(&mut self.lock().writes)
    }

    /// Takes the error the capture function raised, if it raised one.
    pub(crate) fn take_error(&self) -> Option<CaptureError> {
        self.lock().error.take()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a single push.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn capture(&self, ctx: &Context<'_>) -> Result<(), CaptureError> {
        let tid: i64 = ctx.get(0).unwrap_or(-1);
        let op: i64 = ctx.get(1).unwrap_or(0);
        let mut state = self.lock();
        let table = state
            .tables
            .get(&tid)
            .cloned()
            .ok_or(CaptureError::UnknownTable(tid))?;
        let keys = table.key.len();
        let tracked = table.tracked.len();
        let expected = 2 + match op {
            OP_INSERT => keys + tracked,
            OP_UPDATE => 2 * keys + 2 * tracked,
            _ => keys,
        };
        if ctx.len() != expected {
            return Err(CaptureError::Arity {
                table: table.name().to_owned(),
                got: ctx.len(),
                expected,
            });
        }
        let key_error = |source| CaptureError::Key {
            table: table.name().to_owned(),
            source,
        };
        // What every receiver would reject is refused here, before it is committed.
        let replicable = |position: usize, value: ValueRef<'_>| {
            check_replicable(value).map_err(|why| CaptureError::Unreplicable {
                table: table.name().to_owned(),
                column: table.column_name(position).to_owned(),
                why,
            })
        };
        for (j, &position) in table.key.iter().enumerate() {
            replicable(position, ctx.get_raw(2 + j))?;
        }
        let pk = pack_pk((2..2 + keys).map(|i| ctx.get_raw(i))).map_err(key_error)?;
        if pk.len() > CELL_BYTES_MAX {
            return Err(CaptureError::Unreplicable {
                table: table.name().to_owned(),
                column: table.def.primary_key().join(", "),
                why: Unreplicable::TooLarge {
                    size: pk.len(),
                    limit: CELL_BYTES_MAX,
                },
            });
        }
        let mut cells = Vec::new();
        let op = match op {
            OP_INSERT => {
                for (j, &position) in table.tracked.iter().enumerate() {
                    let new = ctx.get_raw(2 + keys + j);
                    if !table.default_of(position).same_as(new) {
                        replicable(position, new)?;
                        cells.push((position, Value::from_ref(new)));
                    }
                }
                RowOp::Insert
            }
            OP_UPDATE => {
                let new_pk =
                    pack_pk((2 + keys..2 + 2 * keys).map(|i| ctx.get_raw(i))).map_err(key_error)?;
                if new_pk != pk {
                    return Err(CaptureError::KeyUpdate {
                        table: table.name().to_owned(),
                        pk: display_pk(&pk),
                    });
                }
                for (j, &position) in table.tracked.iter().enumerate() {
                    let old = ctx.get_raw(2 + 2 * keys + 2 * j);
                    let new = ctx.get_raw(2 + 2 * keys + 2 * j + 1);
                    if !same(old, new) {
                        replicable(position, new)?;
                        cells.push((position, Value::from_ref(new)));
                    }
                }
                if cells.is_empty() {
                    // An update that rewrote identical values changes nothing.
                    return Ok(());
                }
                RowOp::Update
            }
            _ => RowOp::Delete,
        };
        state.cells += cells.len() + 1;
        if state.cells > state.cells_max {
            return Err(CaptureError::TooManyCells {
                limit: state.cells_max,
            });
        }
        state.writes.push(RowWrite {
            table,
            op,
            pk,
            cells,
        });
        Ok(())
    }
}

/// Type-strict equality of two SQLite values (reals bit for bit).
fn same(a: ValueRef<'_>, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (ValueRef::Null, ValueRef::Null) => true,
        (ValueRef::Integer(x), ValueRef::Integer(y)) => x == y,
        (ValueRef::Real(x), ValueRef::Real(y)) => x.to_bits() == y.to_bits(),
        (ValueRef::Text(x), ValueRef::Text(y)) | (ValueRef::Blob(x), ValueRef::Blob(y)) => x == y,
        _ => false,
    }
}
