//! The workload of the store crash test, shared by the child that runs it and the test that
//! kills the child and checks what survived.
//!
//! The child writes local transactions of [`ROWS_PER_VERSION`] rows tagged with a batch id, and
//! applies versions of a fixed remote site, each inserting [`ROWS_PER_VERSION`] rows `r{v}-{i}`,
//! sometimes in two halves (so a crash can leave a version partial). It prints a line after each
//! call returns: `local <version> <batch>` or `held <version>`. Whatever a line reports, a peer
//! may have seen.

use rusqlite::types::ValueRef;
use strata_common::store::{Change, Changeset, SiteId, Timestamp, Value, pack_pk};

/// The crash test's schema.
pub const SCHEMA: &str =
    "CREATE TABLE items (id TEXT NOT NULL PRIMARY KEY, batch TEXT, payload TEXT) STRICT;";

/// Rows each version writes.
pub const ROWS_PER_VERSION: usize = 20;

/// The remote site whose versions the child applies.
pub const SOURCE: SiteId = SiteId([0x5e; 16]);

/// The boot id the child claims, so kills look like process crashes, not reboots.
pub const BOOT_ID: &str = "crash-test-boot";

/// Version `v` of the remote site, whole: `ROWS_PER_VERSION` rows `r{v}-{i}`.
pub fn source_version(v: u64) -> Changeset {
    let mut changes = Vec::new();
    let mut seq = 0;
    for i in 0..ROWS_PER_VERSION {
        let id = format!("r{v}-{i}");
        let pk = pack_pk([ValueRef::Text(id.as_bytes())]).unwrap();
        for (column, value) in [
            (None, Value::Null),
            (Some("batch"), Value::Text(format!("remote-{v}"))),
            (Some("payload"), Value::Text("x".repeat(200))),
        ] {
            changes.push(Change {
                table: "items".into(),
                pk: pk.clone(),
                column: column.map(str::to_owned),
                value,
                cl: 1,
                seq,
            });
            seq += 1;
        }
    }
    Changeset {
        site: SOURCE,
        version: v,
        ts: Timestamp::from_millis(1_000 + v),
        seq_first: 0,
        seq_last: seq - 1,
        last_seq: seq - 1,
        changes,
    }
}
