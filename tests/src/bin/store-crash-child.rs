//! Writes to a store until killed; see `strata_tests::crash`. Usage: `store-crash-child DB SEED`.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use strata_common::store::{Schema, Statement, Store, StoreOptions, Value};
use strata_tests::crash::{BOOT_ID, ROWS_PER_VERSION, SCHEMA, SOURCE, source_version};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("database path");
    let mut seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1) | 1;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let options = StoreOptions {
        boot_id: Some(BOOT_ID.into()),
        ..StoreOptions::default()
    };
    let store = Store::open(&path, options).expect("open");
    store
        .migrate_blocking(Schema::parse(SCHEMA).unwrap())
        .expect("schema");
    let mut out = std::io::stdout().lock();
    writeln!(out, "open {} {}", store.site(), store.head()).unwrap();
    let pid = std::process::id();
    for n in 0.. {
        if next(2) == 0 {
            let batch = format!("{pid}-{n}");
            let statements = (0..ROWS_PER_VERSION)
                .map(|i| {
                    Statement::with_params(
                        "INSERT INTO items (id, batch, payload) VALUES (?1, ?2, ?3)",
                        vec![
                            Value::Text(format!("{batch}-{i}")),
                            Value::Text(batch.clone()),
                            Value::Text("y".repeat(200)),
                        ],
                    )
                })
                .collect();
            let version = store
                .transact_blocking(statements)
                .unwrap()
                .version
                .unwrap();
            writeln!(out, "local {version} {batch}").unwrap();
        } else {
            // The next versions of the source, sometimes skipping ahead (gaps), sometimes an old
            // one again (duplicates), sometimes in two halves (partials).
            let head = store.site_state(SOURCE).map_or(0, |s| s.head);
            let v = match next(6) {
                0 => 1 + next(head.max(1)),
                1 => head + 2 + next(3),
                _ => head + 1,
            };
            let mut chunks = source_version(v).chunked(2_000);
            let first_half = chunks.split_off(chunks.len() / 2);
            for part in [first_half, chunks] {
                let applied = store.apply_blocking(part).unwrap();
                assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
                for (_, version) in applied.versions {
                    writeln!(out, "held {version}").unwrap();
                }
            }
        }
        out.flush().unwrap();
    }
}
