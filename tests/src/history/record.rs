//! The recorded history of a run: every operation a client invoked (on which node, when it was
//! invoked and answered, what it wrote or read, and the answer) and every fault injected.
//! Times are offsets from the run's start on one monotonic clock.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A column of the hot table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Column {
    /// `hist_hot.a`.
    A,
    /// `hist_hot.b`.
    B,
}

impl Column {
    /// The column's SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Column::A => "a",
            Column::B => "b",
        }
    }
}

/// A hot row as read: its two columns (NULL as `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotRow {
    /// Column `a`.
    pub a: Option<String>,
    /// Column `b`.
    pub b: Option<String>,
}

impl HotRow {
    /// The value of `column`.
    pub fn get(&self, column: Column) -> Option<&str> {
        match column {
            Column::A => self.a.as_deref(),
            Column::B => self.b.as_deref(),
        }
    }
}

/// What an operation does.
#[derive(Debug, Clone)]
pub enum OpKind {
    /// `INSERT INTO hist_uniq (id, writer, val)` of a fresh id.
    Insert {
        /// The unique id.
        id: String,
        /// The writing client.
        writer: String,
        /// The unique value.
        val: String,
    },
    /// A whole-row upsert of a hot key (`INSERT .. ON CONFLICT (k) DO UPDATE SET a, b`); a
    /// re-insert when the key is deleted.
    Upsert {
        /// The hot key.
        key: String,
        /// New `a`.
        a: String,
        /// New `b`.
        b: String,
    },
    /// `UPDATE hist_hot SET <column> = value WHERE k = key`.
    Update {
        /// The hot key.
        key: String,
        /// The column written.
        column: Column,
        /// The unique value.
        value: String,
    },
    /// `DELETE FROM hist_hot WHERE k = key`.
    Delete {
        /// The hot key.
        key: String,
    },
    /// A point read of a hot key; `row` is what it returned (`None`: no row), when answered.
    Read {
        /// The hot key.
        key: String,
        /// The row read.
        row: Option<HotRow>,
    },
}

impl OpKind {
    /// The hot key this operation touches, if any.
    pub fn hot_key(&self) -> Option<&str> {
        match self {
            OpKind::Insert { .. } => None,
            OpKind::Upsert { key, .. }
            | OpKind::Update { key, .. }
            | OpKind::Delete { key }
            | OpKind::Read { key, .. } => Some(key),
        }
    }

    /// The value this operation writes to `column` of its hot key, if it writes one.
    pub fn writes(&self, column: Column) -> Option<&str> {
        match (self, column) {
            (OpKind::Upsert { a, .. }, Column::A) => Some(a),
            (OpKind::Upsert { b, .. }, Column::B) => Some(b),
            (
                OpKind::Update {
                    column: c, value, ..
                },
                _,
            ) if *c == column => Some(value),
            _ => None,
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged; `rows` is the rows the statement affected (0 for a read).
    Ok {
        /// Rows affected.
        rows: u64,
    },
    /// Refused with a status that means nothing changed.
    Failed(String),
    /// No answer or one that does not say (timeout, connection lost): it may have happened.
    Unknown(String),
}

/// One operation of the history.
#[derive(Debug, Clone)]
pub struct Op {
    /// Position in the history.
    pub index: usize,
    /// The client that ran it.
    pub client: usize,
    /// The node the client is bound to.
    pub node: usize,
    /// The node's disk epoch (wipes so far) when invoked, and when answered.
    pub epoch: (usize, usize),
    /// When it was invoked.
    pub invoke: Duration,
    /// When its answer (or the timeout) came.
    pub complete: Duration,
    /// What it did.
    pub kind: OpKind,
    /// How it ended.
    pub outcome: Outcome,
}

impl Op {
    /// Acknowledged.
    pub fn acked(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }

    /// Acknowledged and changed at least one row.
    pub fn acked_effective(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { rows } if rows > 0)
    }

    /// Refused for certain: it changed nothing.
    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_))
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "op#{} client {} node {} (disk epoch {}) [{:.3}s..{:.3}s] {:?} -> {:?}",
            self.index,
            self.client,
            self.node,
            self.epoch.0,
            self.invoke.as_secs_f64(),
            self.complete.as_secs_f64(),
            self.kind,
            self.outcome
        )
    }
}

/// A fault, as injected.
#[derive(Debug, Clone)]
pub struct FaultEvent {
    /// When it began.
    pub start: Duration,
    /// When it was healed (the node restarted and serving, or the partition removed).
    pub end: Duration,
    /// What it was.
    pub what: String,
}

/// The shared log the clients append to.
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    faults: Mutex<Vec<FaultEvent>>,
}

impl Recorder {
    /// An empty history starting now.
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Time since the start.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Appends an operation; its index is set here.
    pub fn op(&self, mut op: Op) {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        op.index = ops.len();
        ops.push(op);
    }

    /// Appends a fault.
    pub fn fault(&self, event: FaultEvent) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    /// The operations so far, in the order they completed.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The faults so far.
    pub fn faults(&self) -> Vec<FaultEvent> {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}
