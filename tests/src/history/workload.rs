//! The history test's workload: its schema, and a client loop bound to one node that runs a
//! seeded mix of unique inserts, whole-row upserts, single-column updates of shared hot keys,
//! deletes and re-inserts of hot keys, and point reads, recording each in the history.
//!
//! Every value written is unique (`<client>.<counter>.<column>`), so any value read traces back
//! to exactly one write. Hot keys come in two kinds: `u*` keys are only upserted and updated
//! (never deleted), so real-time order and monotonic reads are checked on them without the
//! causal-length rule in the way; `d*` keys are also deleted and re-inserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use strata_client::{Client, ClientError};
use strata_common::store::{Statement, Value};
use tokio_util::sync::CancellationToken;

use super::record::{Column, HotRow, Op, OpKind, Outcome, Recorder};

/// The tables the workload writes, added to the region's default schema.
pub const SCHEMA: &str = "\
CREATE TABLE hist_uniq (id TEXT NOT NULL PRIMARY KEY, writer TEXT, val TEXT) STRICT;
CREATE TABLE hist_hot (k TEXT NOT NULL PRIMARY KEY, a TEXT, b TEXT) STRICT;
";

/// Hot keys that are never deleted.
pub const UPDATE_KEYS: [&str; 3] = ["u0", "u1", "u2"];

/// Hot keys that are also deleted and re-inserted.
pub const DELETE_KEYS: [&str; 3] = ["d0", "d1", "d2"];

/// Whether `key` is one of the never-deleted hot keys.
pub fn is_update_key(key: &str) -> bool {
    UPDATE_KEYS.contains(&key)
}

/// How long one operation may take before the client gives up and records it as unknown: well
/// above a healthy write's latency, short enough that a dead node does not stall its client.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// One workload client.
pub struct ClientSpec {
    /// Its number (also its value prefix).
    pub id: usize,
    /// The node it talks to.
    pub node: usize,
    /// The node's API endpoint (`http://addr`).
    pub endpoint: String,
    /// Seed of its operation mix.
    pub seed: u64,
    /// Pause between two operations, which sets the load.
    pub pace: Duration,
}

/// Runs `spec`'s operations until `stop`, recording each in `recorder`; `epochs[node]` counts
/// the node's disk wipes so far.
pub async fn run_client(
    spec: ClientSpec,
    recorder: Arc<Recorder>,
    epochs: Arc<Vec<AtomicUsize>>,
    stop: CancellationToken,
) {
    let client = match Client::lazy(&spec.endpoint, None) {
        Ok(client) => client,
        Err(e) => panic!("client {} cannot use {}: {e}", spec.id, spec.endpoint),
    };
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut counter = 0u64;
    while !stop.is_cancelled() {
        counter += 1;
        let kind = next_op(&mut rng, spec.id, counter);
        let epoch_before = epochs[spec.node].load(Ordering::SeqCst);
        let invoke = recorder.now();
        let (kind, outcome) = execute(&client, kind).await;
        let complete = recorder.now();
        let epoch_after = epochs[spec.node].load(Ordering::SeqCst);
        recorder.op(Op {
            index: 0,
            client: spec.id,
            node: spec.node,
            epoch: (epoch_before, epoch_after),
            invoke,
            complete,
            kind,
            outcome,
        });
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(spec.pace) => {}
        }
    }
}

/// The next operation of the mix.
fn next_op(rng: &mut StdRng, client: usize, counter: u64) -> OpKind {
    let value = |column: &str| format!("{client}.{counter}.{column}");
    let roll = rng.random_range(0..100);
    let update_key = UPDATE_KEYS[rng.random_range(0..UPDATE_KEYS.len())];
    let delete_key = DELETE_KEYS[rng.random_range(0..DELETE_KEYS.len())];
    let any_key = if rng.random_range(0..2) == 0 {
        update_key
    } else {
        delete_key
    };
    let column = if rng.random_range(0..2) == 0 {
        Column::A
    } else {
        Column::B
    };
    match roll {
        0..35 => OpKind::Read {
            key: any_key.to_owned(),
            row: None,
        },
        35..55 => OpKind::Insert {
            id: format!("i{client}.{counter}"),
            writer: client.to_string(),
            val: value("v"),
        },
        55..70 => OpKind::Upsert {
            key: any_key.to_owned(),
            a: value("a"),
            b: value("b"),
        },
        70..90 => OpKind::Update {
            key: any_key.to_owned(),
            column,
            value: value(column.name()),
        },
        _ => OpKind::Delete {
            key: delete_key.to_owned(),
        },
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// Runs one operation; returns it (a read with its row filled in) and its outcome.
async fn execute(client: &Client, kind: OpKind) -> (OpKind, Outcome) {
    let statement = match &kind {
        OpKind::Insert { id, writer, val } => Statement::with_params(
            "INSERT INTO hist_uniq (id, writer, val) VALUES (?1, ?2, ?3)",
            vec![text(id), text(writer), text(val)],
        ),
        OpKind::Upsert { key, a, b } => Statement::with_params(
            "INSERT INTO hist_hot (k, a, b) VALUES (?1, ?2, ?3) \
             ON CONFLICT (k) DO UPDATE SET a = excluded.a, b = excluded.b",
            vec![text(key), text(a), text(b)],
        ),
        OpKind::Update { key, column, value } => Statement::with_params(
            format!("UPDATE hist_hot SET {} = ?2 WHERE k = ?1", column.name()),
            vec![text(key), text(value)],
        ),
        OpKind::Delete { key } => {
            Statement::with_params("DELETE FROM hist_hot WHERE k = ?1", vec![text(key)])
        }
        OpKind::Read { key, .. } => {
            let key = key.clone();
            let answer = tokio::time::timeout(
                OP_TIMEOUT,
                client.query("SELECT a, b FROM hist_hot WHERE k = ?1", vec![text(&key)]),
            )
            .await;
            return match answer {
                Err(_) => (
                    OpKind::Read { key, row: None },
                    Outcome::Unknown("timed out".into()),
                ),
                Ok(Err(e)) => (OpKind::Read { key, row: None }, classify(&e)),
                Ok(Ok(rows)) => {
                    let row = rows.rows.first().map(|r| HotRow {
                        a: r.first().and_then(as_text),
                        b: r.get(1).and_then(as_text),
                    });
                    (OpKind::Read { key, row }, Outcome::Ok { rows: 0 })
                }
            };
        }
    };
    let outcome = match tokio::time::timeout(OP_TIMEOUT, client.transact(vec![statement])).await {
        Err(_) => Outcome::Unknown("timed out".into()),
        Ok(Err(e)) => classify(&e),
        Ok(Ok(written)) => Outcome::Ok {
            rows: written.rows_affected.iter().sum(),
        },
    };
    (kind, outcome)
}

/// A column's value as text; anything but TEXT and NULL is kept in a form no write produces,
/// so the checker reports it.
fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Text(s) => Some(s.clone()),
        other => Some(format!("<unexpected {other:?}>")),
    }
}

/// Whether an error means the request changed nothing (a refusal the API documents as such) or
/// leaves it open (connection lost, node going away, internal failure).
fn classify(error: &ClientError) -> Outcome {
    use tonic::Code;
    match error {
        ClientError::Status(status) => match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::DeadlineExceeded => Outcome::Failed(error.to_string()),
            _ => Outcome::Unknown(error.to_string()),
        },
        other => Outcome::Unknown(other.to_string()),
    }
}
