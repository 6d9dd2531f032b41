//! Logging: installs the process's `tracing` subscriber (text or JSON lines on stderr, filtered
//! by `RUST_LOG` or the configured filter) and makes the `node` span that gives every log line
//! the node's name, tier and region.
//!
//! It owns the log format and the filter rules, nothing else: metrics live in `metrics`, and
//! where spans are entered is the binaries' business. It must not be called by library code
//! (only a binary's `main`, or a test, installs the global subscriber), and it never panics:
//! a second [`init_logging`] returns [`TelemetryError::AlreadyInitialized`].

use std::ffi::OsString;
use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{Directive, ParseError};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::{SubscriberInitExt, TryInitError};

use serde::{Deserialize, Serialize};

/// The target of the span made by [`node_span`]. Every filter gets a directive enabling it at
/// `info`, so that `RUST_LOG=warn` still tags its warnings with the node, tier and region.
const NODE_SPAN_TARGET: &str = "strata::node";

/// Log line format (`[log] format` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter (from `RUST_LOG` or the configuration) does not parse. Nothing was installed;
    /// a retry with a valid filter is safe.
    #[error("invalid log filter {filter:?} (from {origin}): {source}")]
    InvalidFilter {
        /// `RUST_LOG` or `log.filter`.
        origin: &'static str,
        /// The filter as given.
        filter: String,
        /// What the parser refused.
        #[source]
        source: ParseError,
    },
    /// `RUST_LOG` is set but is not valid UTF-8. Nothing was installed.
    #[error("RUST_LOG is not valid UTF-8")]
    RustLogNotUnicode,
    /// A global subscriber was already installed, by an earlier call or by someone else; the
    /// existing one stays in place. (If only a `log` logger existed, ours is installed but
    /// `log` records keep going to that logger.)
    #[error("logging is already initialized")]
    AlreadyInitialized(#[source] TryInitError),
}

/// Installs the global subscriber: `format` lines on stderr, filtered by `RUST_LOG` when it is
/// set and not empty, else by `filter` (`info`, `strata_common=debug,info`, ...). Records of the
/// `log` crate (quinn, rustls) go through the same filter and format.
///
/// Text lines use colours only when stderr is a terminal. JSON lines carry the current span's
/// fields (`span`) and the whole span stack (`spans`).
///
/// Call it once, first thing in `main`.
///
/// # Errors
///
/// [`TelemetryError::InvalidFilter`] or [`TelemetryError::RustLogNotUnicode`] if the filter is
/// unusable, and [`TelemetryError::AlreadyInitialized`] on a second call (or if anything else
/// installed a global subscriber first); the existing subscriber then stays in place.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    let filter = resolve_filter(std::env::var_os("RUST_LOG"), filter)?;
    let ansi = std::io::stderr().is_terminal();
    subscriber(format, filter, std::io::stderr, ansi)
        .try_init()
        .map_err(TelemetryError::AlreadyInitialized)
}

/// The span that binaries keep around everything a node does, so that every line logged inside
/// it names the node, its tier (`regional` or `global`) and its region: an `info` span named
/// `node` with the fields `node`, `tier` and `region`. It stays enabled under any level filter.
///
/// A span entered on one thread does not follow work onto tokio's worker threads: instrument the
/// node's root futures with it (`future.instrument(span.clone())`, or `.in_current_span()` when
/// spawning from inside it).
pub fn node_span(node: &str, tier: &str, region: &str) -> tracing::Span {
    tracing::info_span!(
        target: NODE_SPAN_TARGET,
        "node",
        node = %node,
        tier = %tier,
        region = %region
    )
}

/// The filter: `RUST_LOG` when set and not blank, else `configured`; plus the directive that
/// keeps the node span enabled.
fn resolve_filter(
    rust_log: Option<OsString>,
    configured: &str,
) -> Result<EnvFilter, TelemetryError> {
    let (origin, filter) = match rust_log {
        Some(value) => match value.into_string() {
            Ok(value) if !value.trim().is_empty() => ("RUST_LOG", value),
            Ok(_) => ("log.filter", configured.to_owned()),
            Err(_) => return Err(TelemetryError::RustLogNotUnicode),
        },
        None => ("log.filter", configured.to_owned()),
    };
    let parsed = EnvFilter::try_new(&filter);
    let parsed = parsed.map_err(|source| TelemetryError::InvalidFilter {
        origin,
        filter: filter.clone(),
        source,
    })?;
    let node_span: Directive = format!("{NODE_SPAN_TARGET}=info")
        .parse()
        .map_err(|source| TelemetryError::InvalidFilter {
            origin: "the node span directive",
            filter,
            source,
        })?;
    Ok(parsed.add_directive(node_span))
}

/// The subscriber for `format`, writing to `writer` (stderr, or a buffer in tests).
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

/// Spawns a task on `tracker` inside the current span, so its log lines keep the node's fields
/// (a spawned task does not inherit the spawner's span by itself).
pub fn spawn<F>(
    tracker: &tokio_util::task::TaskTracker,
    task: F,
) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    tracker.spawn(task.in_current_span())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps what the subscriber wrote.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Capture {
        type Writer = Capture;
        fn make_writer(&'w self) -> Capture {
            self.clone()
        }
    }

    /// Logs a warning and an info line inside a node span, with `filter`, and returns the output.
    fn log_inside_node_span(format: LogFormat, filter: &str) -> String {
        let capture = Capture::default();
        let filter = resolve_filter(None, filter).unwrap();
        let subscriber = subscriber(format, filter, capture.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            let _node = node_span("n1", "regional", "eu-west").entered();
            tracing::warn!(peers = 3, "peer queue full");
            tracing::info!("joined");
        });
        capture.text()
    }

    #[test]
    fn json_lines_carry_the_node_span_fields() {
        let out = log_inside_node_span(LogFormat::Json, "info");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        let warn = &lines[0];
        assert_eq!(warn["level"], "WARN");
        assert_eq!(warn["fields"]["message"], "peer queue full");
        assert_eq!(warn["fields"]["peers"], 3);
        assert_eq!(warn["span"]["name"], "node");
        assert_eq!(warn["span"]["node"], "n1");
        assert_eq!(warn["span"]["tier"], "regional");
        assert_eq!(warn["span"]["region"], "eu-west");
        assert_eq!(warn["spans"][0]["node"], "n1");
        assert_eq!(lines[1]["span"]["region"], "eu-west");
    }

    #[test]
    fn text_lines_carry_the_node_span_fields() {
        let out = log_inside_node_span(LogFormat::Text, "info");
        assert_eq!(out.lines().count(), 2, "{out}");
        for line in out.lines() {
            assert!(
                line.contains("node{node=n1 tier=regional region=eu-west}"),
                "{line}"
            );
        }
        assert!(
            !out.contains('\u{1b}'),
            "no colours when not asked: {out:?}"
        );
    }

    #[test]
    fn a_warn_filter_keeps_the_node_span_and_drops_info() {
        // The span is `info`; without the extra directive a `warn` filter would disable it and
        // the warning would lose node, tier and region.
        let out = log_inside_node_span(LogFormat::Json, "warn");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["span"]["node"], "n1");
    }

    #[test]
    fn rust_log_wins_over_the_configured_filter_unless_blank() {
        let out = {
            let capture = Capture::default();
            let filter = resolve_filter(Some("error".into()), "info").unwrap();
            tracing::subscriber::with_default(
                subscriber(LogFormat::Text, filter, capture.clone(), false),
                || tracing::warn!("hidden"),
            );
            capture.text()
        };
        assert_eq!(out, "");
        assert!(resolve_filter(Some("  ".into()), "info").is_ok());
        let blank_falls_back = resolve_filter(Some(" ".into()), "info=bogus");
        assert!(matches!(
            blank_falls_back,
            Err(TelemetryError::InvalidFilter {
                origin: "log.filter",
                ..
            })
        ));
    }

    #[test]
    fn bad_filters_are_errors_that_name_their_origin() {
        let err = resolve_filter(None, "strata=loud").unwrap_err();
        assert!(
            matches!(
                err,
                TelemetryError::InvalidFilter {
                    origin: "log.filter",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("strata=loud"), "{err}");
        let err = resolve_filter(Some("strata=loud".into()), "info").unwrap_err();
        assert!(
            matches!(
                err,
                TelemetryError::InvalidFilter {
                    origin: "RUST_LOG",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn non_unicode_rust_log_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let err = resolve_filter(Some(OsString::from_vec(vec![0xff, 0xfe])), "info").unwrap_err();
        assert!(matches!(err, TelemetryError::RustLogNotUnicode));
    }

    #[test]
    fn a_second_init_is_an_error_not_a_panic() {
        // The only test that touches the global subscriber. An earlier caller may have installed
        // one, so the first call may fail too; the second must. The filter is `off` so that the
        // other tests of this binary do not start logging to stderr.
        let first = init_logging(LogFormat::Text, "off");
        assert!(
            matches!(first, Ok(()) | Err(TelemetryError::AlreadyInitialized(_))),
            "{first:?}"
        );
        let second = init_logging(LogFormat::Json, "off");
        assert!(
            matches!(second, Err(TelemetryError::AlreadyInitialized(_))),
            "{second:?}"
        );
    }
}
