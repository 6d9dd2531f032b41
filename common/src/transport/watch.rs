//! Watching a node's certificate files: reload renewed ones, and say when one nears expiry.
//!
//! A [`CertWatcher`] holds every configured certificate (gossip, API, publisher, route) with
//! the material in use. [`CertWatcher::poll`] re-reads the files; when their bytes changed it
//! checks them (`material::load_checked`) and hands them to the entry's `apply` (which swaps
//! the QUIC or API server configuration). A renewal that fails a check, or that `apply`
//! refuses, is logged once with the file and reason, and the old certificate stays in use.
//!
//! Expiry: each poll computes the seconds left of the certificate in use and of its CA, and a
//! [`CertState`]. Entering `Expiring` logs a WARN, entering `Expired` an ERROR, and either
//! repeats once every [`WARNING_REPEAT`] while it lasts; a renewal logs the return to `Valid`.
//!
//! It must not: spawn tasks or touch metrics (the node runs the poll loop and exports
//! [`CertStatus`]), or keep more than one remembered refusal per certificate.

use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use super::error::TransportError;
use super::material::{CertInfo, ChainCheck, LoadedTls, load_checked_with, read_contents};

/// How often a warning about an expiring or expired certificate is repeated while the
/// condition lasts: daily, so it shows in every day's logs without flooding them.
pub const WARNING_REPEAT: Duration = Duration::from_secs(24 * 60 * 60);

/// What a renewed certificate is handed to: it swaps the configuration that uses it, or
/// refuses it (the old one then stays).
pub type Apply = Box<dyn Fn(&LoadedTls) -> Result<(), TransportError> + Send + Sync>;

/// How the watcher behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// A certificate with less than this left is `Expiring`.
    pub warn_before: Duration,
}

/// How close a certificate is to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertState {
    /// More than the warning threshold left.
    Valid,
    /// Within the warning threshold.
    Expiring,
    /// Past its `not_after`.
    Expired,
}

/// One certificate as of the last poll, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    /// Which certificate: `gossip`, `api`, `publish`, `route`, or one of their CAs
    /// (`gossip_ca`, ...). A fixed, low-cardinality list.
    pub label: &'static str,
    /// Serial and validity of the certificate in use.
    pub info: CertInfo,
    /// Seconds until it expires (negative once it has).
    pub seconds_left: i64,
    /// Its state.
    pub state: CertState,
    /// Why the files on disk were last refused (naming the file), while they still are; the
    /// certificate described here stays in use meanwhile.
    pub refused: Option<String>,
}

/// A certificate to watch.
pub struct WatchedCert {
    /// The label of the certificate (see [`CertStatus::label`]).
    pub label: &'static str,
    /// The label of its CA.
    pub ca_label: &'static str,
    /// The material in use now (checked at start).
    pub loaded: LoadedTls,
    /// Whether a renewal must chain to its CA file (as it was checked at start).
    pub chain: ChainCheck,
    /// Swaps in a renewed certificate; `None` for one that is only checked for expiry (a
    /// change is then reported as needing a restart).
    pub apply: Option<Apply>,
}

/// The warning state of one certificate.
#[derive(Debug, Clone, Copy)]
struct Warned {
    state: CertState,
    /// When it was last logged (for the daily repeat).
    logged_at: Option<SystemTime>,
}

struct Entry {
    cert: WatchedCert,
    /// The file bytes of the material in use.
    contents: Vec<u8>,
    /// The bytes and reason of the last refused renewal, so one is logged once.
    refused: Option<(Vec<u8>, String)>,
    leaf_warned: Warned,
    ca_warned: Warned,
}

/// The node's watched certificates.
pub struct CertWatcher {
    entries: Vec<Entry>,
    options: WatchOptions,
}

impl std::fmt::Debug for CertWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<_> = self.entries.iter().map(|e| e.cert.label).collect();
        f.debug_struct("CertWatcher")
            .field("certificates", &labels)
            .field("options", &self.options)
            .finish()
    }
}

impl CertWatcher {
    /// A watcher of `certs`.
    pub fn new(certs: Vec<WatchedCert>, options: WatchOptions) -> CertWatcher {
        let unlogged = Warned {
            state: CertState::Valid,
            logged_at: None,
        };
        let entries = certs
            .into_iter()
            .map(|cert| Entry {
                contents: cert.loaded.contents.clone(),
                cert,
                refused: None,
                leaf_warned: unlogged,
                ca_warned: unlogged,
            })
            .collect();
        CertWatcher { entries, options }
    }

    /// Reloads changed files, logs state changes, and returns every certificate's status at
    /// `now`. Blocking (reads files): call it off the async threads.
    pub fn poll(&mut self, now: SystemTime) -> Vec<CertStatus> {
        let mut out = Vec::with_capacity(self.entries.len() * 2);
        for entry in &mut self.entries {
            reload(entry, now);
            let refused = entry.refused.as_ref().map(|(_, why)| why.clone());
            let warn_before = self.options.warn_before;
            let leaf = entry.cert.loaded.leaf.clone();
            let ca = entry.cert.loaded.ca.clone();
            let files = entry.cert.loaded.files.clone();
            for (label, file, info, warned) in [
                (entry.cert.label, &files.cert, leaf, &mut entry.leaf_warned),
                (entry.cert.ca_label, &files.ca, ca, &mut entry.ca_warned),
            ] {
                let mut status = judge(label, file, info, now, warn_before, warned);
                status.refused = refused.clone();
                out.push(status);
            }
        }
        out
    }
}

/// Re-reads an entry's files and swaps in changed, valid material.
fn reload(entry: &mut Entry, now: SystemTime) {
    let files = entry.cert.loaded.files.clone();
    let label = entry.cert.label;
    let contents = match read_contents(&files) {
        Ok(contents) => contents,
        Err(err) => {
            refuse(entry, Vec::new(), label, err.to_string());
            return;
        }
    };
    if contents == entry.contents {
        entry.refused = None;
        return;
    }
    if matches!(&entry.refused, Some((bytes, _)) if *bytes == contents) {
        return;
    }
    let result = load_checked_with(&files, now, entry.cert.chain).and_then(|loaded| {
        match &entry.cert.apply {
            Some(apply) => apply(&loaded).map(|()| loaded),
            None => Err(TransportError::CertFile {
                path: files.cert.clone(),
                reason: "changed on disk; this certificate is read only at start: restart the \
                     node to use the new one"
                    .into(),
            }),
        }
    });
    match result {
        Ok(loaded) => {
            info!(
                certificate = label,
                file = %files.cert.display(),
                serial = %loaded.leaf.serial,
                not_after = loaded.leaf.not_after,
                "renewed certificate loaded; new connections use it"
            );
            entry.contents = loaded.contents.clone();
            entry.cert.loaded = loaded;
            entry.refused = None;
        }
        Err(err) => refuse(entry, contents, label, err.to_string()),
    }
}

/// Logs a refused renewal once per distinct content and reason.
fn refuse(entry: &mut Entry, contents: Vec<u8>, label: &'static str, reason: String) {
    let repeated =
        matches!(&entry.refused, Some((bytes, why)) if *bytes == contents && *why == reason);
    if !repeated {
        error!(
            certificate = label,
            error = %reason,
            serial_in_use = %entry.cert.loaded.leaf.serial,
            "certificate files refused; the certificate in use stays"
        );
    }
    entry.refused = Some((contents, reason));
}

/// The status of one certificate, logging a change of state (and the daily repeat).
fn judge(
    label: &'static str,
    file: &std::path::Path,
    info: CertInfo,
    now: SystemTime,
    warn_before: Duration,
    warned: &mut Warned,
) -> CertStatus {
    let seconds_left = info.seconds_left(now);
    let threshold = i64::try_from(warn_before.as_secs()).unwrap_or(i64::MAX);
    let state = if seconds_left <= 0 {
        CertState::Expired
    } else if seconds_left <= threshold {
        CertState::Expiring
    } else {
        CertState::Valid
    };
    let due = warned.state != state
        || warned
            .logged_at
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() >= WARNING_REPEAT);
    if due {
        let file = file.display();
        match state {
            CertState::Expired => error!(
                certificate = label, %file, serial = %info.serial, expired_s_ago = -seconds_left,
                "certificate expired: peers refuse it; renew it (the file is re-read)"
            ),
            CertState::Expiring => warn!(
                certificate = label, %file, serial = %info.serial, seconds_left,
                "certificate expires soon; renew it (the file is re-read)"
            ),
            CertState::Valid if warned.logged_at.is_some() => info!(
                certificate = label, %file, serial = %info.serial, seconds_left,
                "certificate valid again"
            ),
            CertState::Valid => {}
        }
        *warned = Warned {
            state,
            logged_at: (state != CertState::Valid).then_some(now),
        };
    }
    CertStatus {
        label,
        info,
        seconds_left,
        state,
        refused: None,
    }
}
