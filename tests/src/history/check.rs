//! The history checker: given every operation with its answer and the converged final state,
//! finds acknowledged writes that were lost, values that nobody wrote, reads on one node that go
//! back in time, and later writes that lost to earlier ones. (That all nodes end identical is
//! compared where the final state is read, in `mod.rs`.)
//!
//! A write acknowledged by a node whose disk was later wiped may legitimately be gone (it may
//! not have left the node before the disk did): such writes count as unknown here, and the
//! summary says how many of them survived anyway.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use super::record::{Column, HotRow, Op, OpKind};
use super::workload::is_update_key;

/// Two writes are ordered in real time when the second was invoked at least this long after the
/// first was acknowledged: the nodes' clocks are one machine's clock, and a few ms covers the
/// time between a client's timestamp and the node's.
pub const REAL_TIME_SLACK: Duration = Duration::from_millis(5);

/// A unique row at the end: (writer, val) by id.
pub type UniqRows = BTreeMap<String, (Option<String>, Option<String>)>;

/// A hot row at the end, by key.
pub type HotRows = BTreeMap<String, HotRow>;

/// One violated property, in words, with the operations involved.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which check (1-5).
    pub check: u8,
    /// The key.
    pub key: String,
    /// What was wrong, with the operations.
    pub detail: String,
}

/// What the checker saw, besides violations.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Operations by outcome: acknowledged, refused, unknown.
    pub acked: usize,
    /// Refused.
    pub failed: usize,
    /// Unknown.
    pub unknown: usize,
    /// Answered reads.
    pub reads: usize,
    /// Acknowledged writes on a disk that was later wiped, and how many survived.
    pub wiped_acked: usize,
    /// Of those, found at the end.
    pub wiped_survived: usize,
    /// Acknowledged writes of never-deleted keys compared in real time with the write whose
    /// value ended up in their column (check 5).
    pub order_compared: usize,
}

/// The history and the final state to check.
pub struct Input<'a> {
    /// Every operation.
    pub ops: &'a [Op],
    /// Wipes per node over the run (each node's last disk epoch).
    pub final_epochs: &'a [usize],
    /// The final unique rows (identical on every node).
    pub uniq: &'a UniqRows,
    /// The final hot rows (identical on every node).
    pub hot: &'a HotRows,
}

impl Input<'_> {
    /// Whether `op`'s node lost its disk after `op` reached it.
    fn wiped_later(&self, op: &Op) -> bool {
        op.epoch.0 < self.final_epochs[op.node]
    }

    /// Acknowledged, and its node's disk was not wiped afterwards.
    fn durable_ack(&self, op: &Op) -> bool {
        op.acked() && !self.wiped_later(op)
    }
}

/// Runs checks 1, 3, 4 and 5.
pub fn check(input: &Input<'_>) -> (Vec<Violation>, Summary) {
    let mut out = Vec::new();
    let mut summary = Summary::default();
    for op in input.ops {
        match () {
            () if op.acked() => summary.acked += 1,
            () if op.failed() => summary.failed += 1,
            () => summary.unknown += 1,
        }
        if op.acked() && matches!(op.kind, OpKind::Read { .. }) {
            summary.reads += 1;
        }
    }
    // Every hot value written, by (key, column, value): the writing operation.
    let mut writes: HashMap<(&str, Column, &str), &Op> = HashMap::new();
    for op in input.ops {
        if let Some(key) = op.kind.hot_key() {
            for column in [Column::A, Column::B] {
                if let Some(value) = op.kind.writes(column) {
                    writes.insert((key, column, value), op);
                }
            }
        }
    }
    lost_writes(input, &mut out, &mut summary);
    values_written(input, &writes, &mut out);
    monotonic_reads(input, &writes, &mut out);
    real_time_order(input, &writes, &mut out, &mut summary);
    (out, summary)
}

/// Check 1: every acknowledged unique insert is present with its values; no refused insert is;
/// every present unique row was written; a never-deleted hot key with an acknowledged upsert
/// exists.
fn lost_writes(input: &Input<'_>, out: &mut Vec<Violation>, summary: &mut Summary) {
    let mut inserts: HashMap<&str, &Op> = HashMap::new();
    for op in input.ops {
        if let OpKind::Insert { id, writer, val } = &op.kind {
            inserts.insert(id, op);
            let present = input.uniq.get(id.as_str());
            let exact = present == Some(&(Some(writer.clone()), Some(val.clone())));
            if op.acked() && input.wiped_later(op) {
                summary.wiped_acked += 1;
                if exact {
                    summary.wiped_survived += 1;
                }
            }
            if input.durable_ack(op) && !exact {
                out.push(Violation {
                    check: 1,
                    key: id.clone(),
                    detail: format!("acknowledged insert lost; final row {present:?}; {op}"),
                });
            }
            if op.failed() && present.is_some() {
                out.push(Violation {
                    check: 1,
                    key: id.clone(),
                    detail: format!("a refused insert is present: {present:?}; {op}"),
                });
            }
        }
    }
    for (id, values) in input.uniq {
        let written = inserts.get(id.as_str()).is_some_and(|op| match &op.kind {
            OpKind::Insert { writer, val, .. } => {
                *values == (Some(writer.clone()), Some(val.clone()))
            }
            _ => false,
        });
        if !written {
            out.push(Violation {
                check: 3,
                key: id.clone(),
                detail: format!(
                    "final unique row {values:?} is no insert's values ({:?})",
                    inserts.get(id.as_str()).map(ToString::to_string)
                ),
            });
        }
    }
    for op in input.ops {
        if let OpKind::Upsert { key, .. } = &op.kind
            && is_update_key(key)
            && input.durable_ack(op)
            && !input.hot.contains_key(key.as_str())
        {
            out.push(Violation {
                check: 1,
                key: key.clone(),
                detail: format!("never-deleted key missing at the end after {op}"),
            });
            break;
        }
    }
}

/// Check 3: every hot row read (and every final hot row) holds, in each column, a value some
/// operation on that key and column wrote, that was not refused and was invoked before the read
/// answered.
fn values_written(
    input: &Input<'_>,
    writes: &HashMap<(&str, Column, &str), &Op>,
    out: &mut Vec<Violation>,
) {
    let mut check_row = |key: &str, row: &HotRow, read: Option<&Op>| {
        for column in [Column::A, Column::B] {
            let problem = match row.get(column) {
                None => Some("NULL: no write leaves this column NULL".to_owned()),
                Some(value) => match writes.get(&(key, column, value)) {
                    None => Some(format!(
                        "{value:?} was never written to this key and column"
                    )),
                    Some(w) if w.failed() => Some(format!("{value:?} is a refused write's: {w}")),
                    Some(w) if read.is_some_and(|r| w.invoke > r.complete) => Some(format!(
                        "{value:?} was read before its write was invoked: {w}"
                    )),
                    Some(_) => None,
                },
            };
            if let Some(problem) = problem {
                let context =
                    read.map_or_else(|| "in the final state".to_owned(), |r| r.to_string());
                out.push(Violation {
                    check: 3,
                    key: key.to_owned(),
                    detail: format!(
                        "row {row:?}, column {}: {problem}; read: {context}",
                        column.name()
                    ),
                });
            }
        }
    };
    for op in input.ops {
        if let OpKind::Read {
            key,
            row: Some(row),
        } = &op.kind
            && op.acked()
        {
            check_row(key, row, Some(op));
        }
    }
    for (key, row) in input.hot {
        check_row(key, row, None);
    }
}

/// Check 4: on one node (one disk: reads across a wipe are not compared), for a never-deleted
/// key, once a read returned a write W, no later read returns a write acknowledged before W was
/// invoked, nor no row at all.
fn monotonic_reads(
    input: &Input<'_>,
    writes: &HashMap<(&str, Column, &str), &Op>,
    out: &mut Vec<Violation>,
) {
    let mut groups: BTreeMap<(usize, usize, &str), Vec<&Op>> = BTreeMap::new();
    for op in input.ops {
        if let OpKind::Read { key, .. } = &op.kind
            && op.acked()
            && op.epoch.0 == op.epoch.1
            && is_update_key(key)
        {
            groups
                .entry((op.node, op.epoch.0, key))
                .or_default()
                .push(op);
        }
    }
    for ((node, _, key), mut reads) in groups {
        reads.sort_by_key(|r| r.invoke);
        for column in [Column::A, Column::B] {
            let written = |read: &Op| -> Option<&Op> {
                let OpKind::Read { row: Some(row), .. } = &read.kind else {
                    return None;
                };
                writes.get(&(key, column, row.get(column)?)).copied()
            };
            let mut reported = false;
            for (j, later) in reads.iter().enumerate() {
                if reported {
                    break;
                }
                let later_write = written(later);
                let later_absent = matches!(later.kind, OpKind::Read { row: None, .. });
                for earlier in &reads[..j] {
                    if earlier.complete >= later.invoke {
                        continue;
                    }
                    let Some(earlier_write) = written(earlier) else {
                        continue;
                    };
                    let back = match later_write {
                        Some(w) => w.acked() && w.complete + REAL_TIME_SLACK < earlier_write.invoke,
                        None => later_absent,
                    };
                    if back {
                        out.push(Violation {
                            check: 4,
                            key: key.to_owned(),
                            detail: format!(
                                "node {node} went back in time on column {}:\n      earlier read {earlier}\n        saw {earlier_write}\n      later read {later}\n        saw {}",
                                column.name(),
                                later_write.map_or_else(|| "no row".to_owned(), ToString::to_string)
                            ),
                        });
                        reported = true;
                        break;
                    }
                }
            }
        }
    }
}

/// Check 5: for a never-deleted key and column, the final value's write W is not followed in
/// real time by an acknowledged, effective write W2 of the same column (W acknowledged more
/// than [`REAL_TIME_SLACK`] before W2 was invoked).
fn real_time_order(
    input: &Input<'_>,
    writes: &HashMap<(&str, Column, &str), &Op>,
    out: &mut Vec<Violation>,
    summary: &mut Summary,
) {
    for (key, row) in input.hot {
        if !is_update_key(key) {
            continue;
        }
        for column in [Column::A, Column::B] {
            let Some(value) = row.get(column) else {
                continue;
            };
            let Some(w) = writes.get(&(key.as_str(), column, value)) else {
                continue;
            };
            if !w.acked() {
                continue;
            }
            let mut later = Vec::new();
            for w2 in input.ops {
                if w2.kind.hot_key() == Some(key.as_str())
                    && w2.kind.writes(column).is_some()
                    && w2.acked_effective()
                    && input.durable_ack(w2)
                {
                    summary.order_compared += 1;
                    if w.complete + REAL_TIME_SLACK < w2.invoke {
                        later.push(w2);
                    }
                }
            }
            if let Some(last) = later.iter().max_by_key(|w2| w2.invoke) {
                let mut detail = format!(
                    "column {}: final value {value:?} is from {w}\n      but {} later acknowledged write(s) of it exist, the last {last}",
                    column.name(),
                    later.len()
                );
                if let Some(first) = later.first() {
                    let _ = write!(detail, "\n      the first: {first}");
                }
                out.push(Violation {
                    check: 5,
                    key: key.clone(),
                    detail,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::Outcome;

    /// Builds histories by hand: each op on `node`, over [invoke, complete] ms.
    struct History(Vec<Op>);

    impl History {
        fn op(&mut self, node: usize, at: (u64, u64), kind: OpKind, outcome: Outcome) -> usize {
            let index = self.0.len();
            self.0.push(Op {
                index,
                client: node,
                node,
                epoch: (0, 0),
                invoke: Duration::from_millis(at.0),
                complete: Duration::from_millis(at.1),
                kind,
                outcome,
            });
            index
        }

        fn upsert(&mut self, node: usize, at: (u64, u64), key: &str, tag: &str) {
            self.op(
                node,
                at,
                OpKind::Upsert {
                    key: key.into(),
                    a: format!("{tag}a"),
                    b: format!("{tag}b"),
                },
                Outcome::Ok { rows: 1 },
            );
        }

        fn read(&mut self, node: usize, at: (u64, u64), key: &str, row: Option<(&str, &str)>) {
            self.op(
                node,
                at,
                OpKind::Read {
                    key: key.into(),
                    row: row.map(|(a, b)| HotRow {
                        a: Some(a.into()),
                        b: Some(b.into()),
                    }),
                },
                Outcome::Ok { rows: 0 },
            );
        }
    }

    fn hot(rows: &[(&str, &str, &str)]) -> HotRows {
        rows.iter()
            .map(|(k, a, b)| {
                (
                    (*k).to_owned(),
                    HotRow {
                        a: Some((*a).to_owned()),
                        b: Some((*b).to_owned()),
                    },
                )
            })
            .collect()
    }

    fn checks(history: &History, uniq: &UniqRows, hot: &HotRows) -> Vec<u8> {
        let (violations, _) = check(&Input {
            ops: &history.0,
            final_epochs: &[0, 0, 0],
            uniq,
            hot,
        });
        violations.iter().map(|v| v.check).collect()
    }

    #[test]
    fn a_clean_history_with_later_writes_winning_has_no_violation() {
        let mut h = History(Vec::new());
        h.upsert(0, (0, 10), "u0", "x");
        h.read(1, (20, 25), "u0", Some(("xa", "xb")));
        h.upsert(1, (30, 40), "u0", "y");
        h.read(0, (50, 55), "u0", Some(("ya", "yb")));
        assert_eq!(
            checks(&h, &UniqRows::new(), &hot(&[("u0", "ya", "yb")])),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn an_acknowledged_insert_missing_at_the_end_is_a_lost_write() {
        let mut h = History(Vec::new());
        h.op(
            0,
            (0, 10),
            OpKind::Insert {
                id: "i1".into(),
                writer: "0".into(),
                val: "v".into(),
            },
            Outcome::Ok { rows: 1 },
        );
        assert_eq!(checks(&h, &UniqRows::new(), &HotRows::new()), vec![1]);
    }

    #[test]
    fn an_acknowledged_insert_on_a_disk_wiped_later_may_be_missing() {
        let mut h = History(Vec::new());
        h.op(
            0,
            (0, 10),
            OpKind::Insert {
                id: "i1".into(),
                writer: "0".into(),
                val: "v".into(),
            },
            Outcome::Ok { rows: 1 },
        );
        let (violations, summary) = check(&Input {
            ops: &h.0,
            final_epochs: &[1, 0, 0],
            uniq: &UniqRows::new(),
            hot: &HotRows::new(),
        });
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!((summary.wiped_acked, summary.wiped_survived), (1, 0));
    }

    #[test]
    fn a_row_with_an_update_and_null_elsewhere_is_a_value_nobody_wrote() {
        let mut h = History(Vec::new());
        h.upsert(0, (0, 10), "d0", "x");
        h.op(
            0,
            (20, 30),
            OpKind::Update {
                key: "d0".into(),
                column: Column::A,
                value: "za".into(),
            },
            Outcome::Ok { rows: 1 },
        );
        h.op(
            1,
            (40, 45),
            OpKind::Read {
                key: "d0".into(),
                row: Some(HotRow {
                    a: Some("za".into()),
                    b: None,
                }),
            },
            Outcome::Ok { rows: 0 },
        );
        assert_eq!(
            checks(&h, &UniqRows::new(), &hot(&[("d0", "za", "xb")])),
            vec![3]
        );
    }

    #[test]
    fn a_read_returning_an_older_acknowledged_write_after_a_newer_one_goes_back_in_time() {
        let mut h = History(Vec::new());
        h.upsert(0, (0, 10), "u0", "x");
        h.upsert(0, (20, 30), "u0", "y");
        h.read(1, (40, 45), "u0", Some(("ya", "yb")));
        h.read(1, (50, 55), "u0", Some(("xa", "xb")));
        // Both columns went back: one violation each.
        assert_eq!(
            checks(&h, &UniqRows::new(), &hot(&[("u0", "ya", "yb")])),
            vec![4, 4]
        );
    }

    #[test]
    fn an_earlier_write_surviving_a_later_acknowledged_one_breaks_real_time_order() {
        let mut h = History(Vec::new());
        h.upsert(0, (0, 10), "u0", "x");
        h.upsert(1, (20, 30), "u0", "y");
        assert_eq!(
            checks(&h, &UniqRows::new(), &hot(&[("u0", "xa", "xb")])),
            vec![5, 5]
        );
    }

    #[test]
    fn concurrent_writes_may_end_either_way() {
        let mut h = History(Vec::new());
        h.upsert(0, (0, 10), "u0", "x");
        h.upsert(1, (8, 30), "u0", "y");
        assert_eq!(
            checks(&h, &UniqRows::new(), &hot(&[("u0", "xa", "xb")])),
            Vec::<u8>::new()
        );
    }
}
