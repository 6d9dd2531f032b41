//! Crash safety: a child process writing and applying is killed with SIGKILL at random moments.
//!
//! After each kill the store is reopened and checked: every version the bookkeeping holds is
//! fully applied and no version it lacks is partly visible; every version the child reported is
//! still held with the content it had; and the site's version counter continues after every
//! number it reported, so a number a peer may have seen is never reused for other content.
//! Rounds: `CRASH_ROUNDS` (default 12).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use strata_common::store::{Schema, Store, StoreOptions, Value};
use strata_tests::crash::{BOOT_ID, ROWS_PER_VERSION, SCHEMA, SOURCE};

struct Reported {
    local: BTreeMap<u64, String>,
    held: BTreeSet<u64>,
    site: Option<String>,
}

fn count(store: &Store, sql: &str, param: &str) -> i64 {
    match store.query(sql, &[Value::Text(param.into())]).unwrap().rows[0][0] {
        Value::Integer(n) => n,
        ref other => panic!("count returned {other:?}"),
    }
}

fn verify(path: &std::path::Path, reported: &Reported, round: usize) {
    let options = StoreOptions {
        boot_id: Some(BOOT_ID.into()),
        ..StoreOptions::default()
    };
    let store = Store::open(path, options).unwrap();
    store
        .migrate_blocking(Schema::parse(SCHEMA).unwrap())
        .unwrap();
    let context = format!("round {round}");
    if let Some(site) = &reported.site {
        assert_eq!(
            &store.site().to_string(),
            site,
            "{context}: a process crash keeps the site"
        );
    }

    // Remote versions: held means whole, not held means invisible.
    let source = store.site_state(SOURCE);
    let head = source.as_ref().map_or(0, |s| s.head);
    for v in 1..=head + 5 {
        let rows = count(
            &store,
            "SELECT count(*) FROM items WHERE batch = ?1",
            &format!("remote-{v}"),
        );
        let held = source.as_ref().is_some_and(|s| s.has(v));
        let expected = if held { ROWS_PER_VERSION as i64 } else { 0 };
        assert_eq!(
            rows, expected,
            "{context}: remote version {v} (held: {held}) has {rows} rows"
        );
    }
    for v in &reported.held {
        assert!(
            source.as_ref().is_some_and(|s| s.has(*v)),
            "{context}: reported held {v} is lost"
        );
    }

    // Local versions: every reported one is there with its own content, and the counter is past it.
    let own_head = store.head();
    if let Some((&max, _)) = reported.local.last_key_value() {
        assert!(
            own_head >= max,
            "{context}: head {own_head} is below reported version {max}"
        );
    }
    for (version, batch) in &reported.local {
        let rows = count(&store, "SELECT count(*) FROM items WHERE batch = ?1", batch);
        assert_eq!(
            rows, ROWS_PER_VERSION as i64,
            "{context}: version {version} ({batch})"
        );
        let changes = store.changes(store.site(), *version..=*version).unwrap();
        let carries_batch = changes
            .iter()
            .flat_map(|c| &c.changes)
            .any(|c| c.value == Value::Text(batch.clone()));
        assert!(
            carries_batch,
            "{context}: version {version} no longer holds batch {batch}"
        );
    }
    // No local transaction is partly there.
    let torn = store
        .query(
            "SELECT batch, count(*) FROM items WHERE batch NOT LIKE 'remote-%' GROUP BY batch
             HAVING count(*) <> ?1",
            &[Value::Integer(ROWS_PER_VERSION as i64)],
        )
        .unwrap();
    assert!(
        torn.rows.is_empty(),
        "{context}: torn local transactions {:?}",
        torn.rows
    );
}

#[test]
fn a_store_killed_at_random_moments_keeps_whole_versions_and_never_reuses_a_version() {
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.sqlite");
    let mut reported = Reported {
        local: BTreeMap::new(),
        held: BTreeSet::new(),
        site: None,
    };
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..rounds {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let lines_before_kill = 1 + rng % 80;
        let extra_delay = Duration::from_micros(rng % 3_000);
        let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-child"))
            .arg(&path)
            .arg(round.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut seen = 0u64;
        let mut killed = false;
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["open", site, _] => {
                    if let Some(previous) = &reported.site {
                        assert_eq!(previous, site, "round {round}: the site changed on reopen");
                    }
                    reported.site = Some((*site).to_owned());
                }
                ["local", version, batch] => {
                    let version: u64 = version.parse().unwrap();
                    let previous = reported.local.insert(version, (*batch).to_owned());
                    assert!(
                        previous.is_none(),
                        "round {round}: version {version} reused"
                    );
                }
                ["held", version] => {
                    reported.held.insert(version.parse().unwrap());
                }
                _ => panic!("unexpected line from the child: {line}"),
            }
            seen += 1;
            if !killed && seen >= lines_before_kill {
                // The fault itself: a kill at a random moment after this line.
                std::thread::sleep(extra_delay);
                child.kill().unwrap();
                killed = true;
            }
        }
        let status = child.wait().unwrap();
        assert!(
            killed,
            "round {round}: the child exited by itself: {status}"
        );
        verify(&path, &reported, round);
    }
    assert!(
        !reported.local.is_empty() && !reported.held.is_empty(),
        "the workload ran"
    );
}
