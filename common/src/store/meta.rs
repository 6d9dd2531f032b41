//! The store's own tables, its settings row, and the site identity chosen at open.
//!
//! Identity rule: a site never gives one version number to two different contents. Local commits
//! use `synchronous=NORMAL`, so a power loss can roll back the last commits after peers saw them;
//! the store would then number its next writes from the rolled-back head and reuse those version
//! numbers. A peer that already holds the old content of a version marks it held and never asks
//! for the new one, so replicas would differ forever without any of them noticing. So after an
//! unclean shutdown that may have lost writes the store takes a fresh site id and never writes
//! under the old one again. A process crash loses nothing (committed pages are in the
//! kernel's cache), which the store tells from a power loss by the kernel's boot id.

use rusqlite::types::FromSql;
use rusqlite::{Connection, OptionalExtension, ToSql, params};

use super::book::Ord;
use super::change::SiteId;
use super::error::{Result, StoreError};

/// The store's own tables. Idempotent.
pub(crate) const BOOTSTRAP: &str = "
CREATE TABLE IF NOT EXISTS __strata_meta (key TEXT PRIMARY KEY, value ANY) STRICT;
CREATE TABLE IF NOT EXISTS __strata_sites (
    ord INTEGER PRIMARY KEY,
    site_id BLOB NOT NULL UNIQUE,
    head INTEGER NOT NULL DEFAULT 0,
    hlc INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS __strata_gaps (
    ord INTEGER NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
    PRIMARY KEY (ord, lo)
) WITHOUT ROWID, STRICT;
CREATE TABLE IF NOT EXISTS __strata_partials (
    ord INTEGER NOT NULL, version INTEGER NOT NULL, ts INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, have BLOB NOT NULL, since INTEGER NOT NULL,
    PRIMARY KEY (ord, version)
) WITHOUT ROWID, STRICT;
CREATE TABLE IF NOT EXISTS __strata_buffered (
    ord INTEGER NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
    tbl TEXT NOT NULL, pk BLOB NOT NULL, col TEXT NOT NULL, val ANY, cl INTEGER NOT NULL,
    PRIMARY KEY (ord, version, seq)
) WITHOUT ROWID, STRICT;
CREATE TABLE IF NOT EXISTS __strata_parked (
    ord INTEGER NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
    tbl TEXT NOT NULL, pk BLOB NOT NULL, col TEXT NOT NULL, val ANY,
    ts INTEGER NOT NULL, cl INTEGER NOT NULL,
    PRIMARY KEY (ord, version, seq)
) WITHOUT ROWID, STRICT;
CREATE INDEX IF NOT EXISTS __strata_parked_tbl ON __strata_parked (tbl, col);
CREATE TABLE IF NOT EXISTS __strata_waiting (
    ord INTEGER NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
    tbl TEXT NOT NULL, pk BLOB NOT NULL, cl INTEGER NOT NULL, col TEXT NOT NULL, val ANY,
    ts INTEGER NOT NULL,
    PRIMARY KEY (ord, version, seq)
) WITHOUT ROWID, STRICT;
CREATE INDEX IF NOT EXISTS __strata_waiting_row ON __strata_waiting (tbl, pk, cl);
CREATE TABLE IF NOT EXISTS __strata_tables (
    name TEXT PRIMARY KEY, tid INTEGER NOT NULL UNIQUE, ddl TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS __strata_indexes (
    name TEXT PRIMARY KEY, tbl TEXT NOT NULL, ddl TEXT NOT NULL
) STRICT;
";

/// Version of the on-disk format, refused if a store was made by a newer one.
pub(crate) const FORMAT: i64 = 1;

/// Reads a setting.
pub(crate) fn get<T: FromSql>(conn: &Connection, key: &str) -> Result<Option<T>> {
    Ok(conn
        .prepare_cached("SELECT value FROM __strata_meta WHERE key = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?)
}

/// Writes a setting.
pub(crate) fn set(conn: &Connection, key: &str, value: &dyn ToSql) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO __strata_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// The identity this run writes under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity {
    pub(crate) site: SiteId,
    pub(crate) ord: Ord,
    /// Why the site id is new this run, if it is.
    pub(crate) fresh: Option<FreshReason>,
}

/// Why a run writes under a new site id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreshReason {
    /// The store was just created.
    Created,
    /// The last run did not shut down cleanly and the machine rebooted since (or the boot id is
    /// unknown), so its last commits may be lost; their version numbers are never reused.
    UncleanShutdown,
}

/// Chooses the site identity at open and marks the store as running, durably, before any version
/// is written. `boot_id` identifies the running kernel (`None` if unknown).
pub(crate) fn open_identity(conn: &Connection, boot_id: Option<&str>) -> Result<Identity> {
    let format: Option<i64> = get(conn, "format")?;
    match format {
        Some(f) if f > FORMAT => {
            return Err(StoreError::Corrupt(format!(
                "store format {f} is newer than this binary understands ({FORMAT})"
            )));
        }
        Some(_) => {}
        None => set(conn, "format", &FORMAT)?,
    }
    let current: Option<Ord> = get(conn, "self")?;
    let clean: Option<i64> = get(conn, "clean")?;
    let last_boot: Option<String> = get(conn, "boot_id")?;
    let same_boot = matches!((boot_id, &last_boot), (Some(a), Some(b)) if a == b);
    let fresh = match current {
        None => Some(FreshReason::Created),
        Some(_) if clean == Some(1) || same_boot => None,
        Some(_) => Some(FreshReason::UncleanShutdown),
    };
    let ord = match (current, fresh) {
        (Some(ord), None) => ord,
        _ => {
            let site = SiteId::random();
            conn.execute(
                "INSERT INTO __strata_sites (site_id, head) VALUES (?1, 0)",
                [&site.0[..]],
            )?;
            let ord = conn.last_insert_rowid();
            set(conn, "self", &ord)?;
            ord
        }
    };
    let raw: Vec<u8> = conn.query_row(
        "SELECT site_id FROM __strata_sites WHERE ord = ?1",
        [ord],
        |r| r.get(0),
    )?;
    let site = SiteId::from_slice(&raw)
        .ok_or_else(|| StoreError::Corrupt("own site id is not 16 bytes".into()))?;
    set(conn, "clean", &0)?;
    set(conn, "boot_id", &boot_id.unwrap_or(""))?;
    Ok(Identity { site, ord, fresh })
}

/// The running kernel's boot id, where the platform has one.
pub(crate) fn kernel_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(BOOTSTRAP).unwrap();
        conn
    }

    #[test]
    fn identity_survives_a_clean_shutdown_and_a_process_crash_but_not_a_reboot_after_a_crash() {
        let conn = db();
        let first = open_identity(&conn, Some("boot-a")).unwrap();
        assert_eq!(first.fresh, Some(FreshReason::Created));
        // Crash without a clean marker, same kernel: nothing was lost, keep the site.
        let again = open_identity(&conn, Some("boot-a")).unwrap();
        assert_eq!((again.site, again.fresh), (first.site, None));
        // Clean shutdown, then a reboot: keep the site.
        set(&conn, "clean", &1).unwrap();
        let after_reboot = open_identity(&conn, Some("boot-b")).unwrap();
        assert_eq!((after_reboot.site, after_reboot.fresh), (first.site, None));
        // Crash, then a reboot: writes may be lost, take a new site.
        let rotated = open_identity(&conn, Some("boot-c")).unwrap();
        assert_eq!(rotated.fresh, Some(FreshReason::UncleanShutdown));
        assert_ne!(rotated.site, first.site);
        // Unknown boot ids count as a possible reboot.
        let unknown = open_identity(&conn, None).unwrap();
        assert_eq!(unknown.fresh, Some(FreshReason::UncleanShutdown));
    }

    #[test]
    fn a_newer_format_is_refused() {
        let conn = db();
        set(&conn, "format", &(FORMAT + 1)).unwrap();
        assert!(matches!(
            open_identity(&conn, None),
            Err(StoreError::Corrupt(_))
        ));
    }
}
