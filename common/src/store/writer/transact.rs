//! Client transactions inside a group commit, and the SQL policy they are held to.
//!
//! A client's statements run under the writer rules (see `authorize`), are prepared under cache
//! keys the store's own SQL never uses, and stop at their deadline, when their caller goes away
//! or when the store closes (see `deadline`). Statement forms replication cannot allow (`INSERT
//! OR REPLACE` and its kin) are refused before SQLite sees them; every SQLite error of a client
//! statement becomes the precise store error that names the statement. Captured row writes are
//! recorded as this site's next version (see `local`).

use std::sync::Arc;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use rusqlite::{ErrorCode, params_from_iter};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::super::capture::CaptureError;
use super::super::deadline::{self, Deadline};
use super::super::error::{Result, StoreError};
use super::super::hlc;
use super::super::local::Recorder;
use super::super::merge;
use super::super::{Committed, Statement};
use super::{Batch, Failure, Writer};

/// Starts the statement-cache key of every client statement (a comment, so SQLite ignores it):
/// the store's own SQL never starts with it, so a client's text never finds a statement that
/// was prepared, and authorized, for the store's own use.
const CLIENT_SQL_PREFIX: &str = "/* client */ ";

impl Writer {
    /// Runs a local transaction inside the open one.
    pub(crate) fn run_transact(
        &mut self,
        statements: &[Statement],
        deadline: Option<&Deadline>,
        wall_ms: u64,
        batch: &mut Batch,
    ) -> Result<Committed, Failure> {
        if self.guard.closing() {
            return Err(Failure::Clean(StoreError::Closed));
        }
        // Not run at all when its caller gave up or its time passed while it was queued: a
        // request stopped in a group is refused here when the group is run again request by
        // request, so it never runs twice.
        if let Some(why) = deadline.and_then(Deadline::stop) {
            let deadline = deadline.unwrap_or_else(|| unreachable!("stop came from it"));
            self.count_stopped();
            return Err(Failure::Clean(deadline.error(why, "transaction")));
        }
        let limits = &self.shared.options;
        if statements.len() > limits.statements_max {
            return Err(Failure::Clean(StoreError::TooLarge {
                what: "statement count",
                size: statements.len(),
                limit: limits.statements_max,
            }));
        }
        let ord = self.shared.ord;
        let head = self.books.sites.get(&ord).map_or(0, |b| b.head);
        let ts = self.clock.tick(wall_ms);
        let version = head + 1;
        self.guard.arm(deadline);
        let result = self
            .run_statements(statements, deadline, version, ts)
            .map_err(|(completed, err)| {
                // The store's bookkeeping SQL between client statements can be stopped too.
                match deadline::stopped(&self.guard, deadline, "transaction") {
                    Some(stopped) => {
                        self.count_stopped();
                        (completed, stopped)
                    }
                    None => (completed, err),
                }
            });
        self.guard.disarm();
        self.capture.set_capturing(false);
        self.user_mode.store(false, Ordering::Relaxed);
        let (rows_affected, recorder) = result.map_err(|(completed, err)| {
            // SQLite undoes a failed statement by itself, so a request whose first statement
            // failed wrote nothing, unless the failure ended the whole transaction (an
            // interrupt, a full disk): the group goes on without it instead of being rerun
            // request by request, which a client sending refused writes in a loop would
            // otherwise force on every group.
            if completed == 0 && !self.conn.is_autocommit() {
                Failure::Clean(err)
            } else {
                Failure::Dirty(err)
            }
        })?;
        let Some(changeset) = recorder.finish() else {
            return Ok(Committed {
                version: None,
                ts,
                rows_affected,
                changeset: None,
            });
        };
        // Cells that waited for a row life this transaction's inserts began merge now.
        let waited = merge::local_lives_arrived(
            &self.conn,
            &self.catalog.by_name,
            &self.books,
            &changeset.changes,
        )
        .map_err(Failure::Dirty)?;
        if waited {
            self.shared
                .stats
                .count_waiting(&self.conn, 0)
                .map_err(Failure::Dirty)?;
        }
        self.books
            .sites
            .entry(ord)
            .or_default()
            .advance_head(version);
        self.shared
            .stats
            .local_versions_total
            .fetch_add(1, Ordering::Relaxed);
        let changeset = Arc::new(changeset);
        batch.touched.insert(ord);
        batch.event.local.push(Arc::clone(&changeset));
        batch.event.changed.extend(
            changeset
                .changes
                .iter()
                .map(|c| (c.table.clone(), c.pk.clone())),
        );
        Ok(Committed {
            version: Some(version),
            ts,
            rows_affected,
            changeset: Some(changeset),
        })
    }

    fn run_statements(
        &self,
        statements: &[Statement],
        deadline: Option<&Deadline>,
        version: u64,
        ts: hlc::Timestamp,
    ) -> Result<(Vec<usize>, Recorder), (usize, StoreError)> {
        let mut recorder = Recorder::new(self.shared.site, self.shared.ord, version, ts);
        let mut rows_affected = Vec::with_capacity(statements.len());
        self.capture.begin(self.shared.options.cells_max);
        // Batches usually repeat one statement with different parameters: prepare it once.
        let mut prepared: Option<(&str, rusqlite::CachedStatement<'_>)> = None;
        for (index, statement) in statements.iter().enumerate() {
            if prepared
                .as_ref()
                .is_none_or(|(sql, _)| *sql != statement.sql)
            {
                // Back to the cache before the next one is prepared.
                drop(prepared.take());
                check_statement(index, statement, self.shared.options.sql_bytes_max)
                    .map_err(|err| (index, err))?;
                let stmt = self.user_statement(|| self.prepare(&statement.sql));
                prepared = Some((
                    &statement.sql,
                    stmt.map_err(|err| (index, self.classify(index, deadline, err)))?,
                ));
            }
            let Some((_, stmt)) = prepared.as_mut() else {
                unreachable!("prepared just above");
            };
            let params = params_from_iter(statement.params.iter());
            let affected = self
                .user_statement(|| stmt.execute(params))
                .map_err(|err| (index, self.classify(index, deadline, err)))?;
            if self.conn.is_autocommit() {
                // The authorizer refuses transaction control; this is the second line of defence.
                return Err((
                    index,
                    StoreError::Refused {
                        index,
                        reason: "the statement ended the request's transaction".into(),
                    },
                ));
            }
            rows_affected.push(affected);
            recorder
                .record(&self.conn, self.capture.take(), index)
                .map_err(|err| (index + 1, err))?;
        }
        Ok((rows_affected, recorder))
    }

    /// Runs `f` under the user rules (authorizer) with capture on.
    fn user_statement<T>(&self, f: impl FnOnce() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        self.capture.set_capturing(true);
        self.user_mode.store(true, Ordering::Relaxed);
        let result = f();
        self.user_mode.store(false, Ordering::Relaxed);
        self.capture.set_capturing(false);
        result
    }

    /// Prepares a client's statement under a cache key the store's own SQL never has, so that no
    /// text a client sends can reach a statement prepared (and authorized) for the store's use.
    fn prepare(&self, sql: &str) -> rusqlite::Result<rusqlite::CachedStatement<'_>> {
        let mut keyed = String::with_capacity(CLIENT_SQL_PREFIX.len() + sql.len());
        keyed.push_str(CLIENT_SQL_PREFIX);
        keyed.push_str(sql);
        let stmt = self.conn.prepare_cached(&keyed).map_err(|err| match err {
            rusqlite::Error::SqlInputError {
                error,
                msg,
                sql,
                offset,
            } => rusqlite::Error::SqlInputError {
                error,
                msg,
                sql,
                // Offsets count from the client's text, not from the prefix.
                offset: offset.saturating_sub(CLIENT_SQL_PREFIX.len() as i32),
            },
            other => other,
        })?;
        if stmt.column_count() > 0 {
            // A read, or a write with RETURNING: either way rows nobody would see.
            return Err(rusqlite::Error::ExecuteReturnedResults);
        }
        Ok(stmt)
    }

    pub(crate) fn count_stopped(&self) {
        self.shared
            .stats
            .stopped_total
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Turns a SQLite error from a user statement into the precise store error.
    fn classify(
        &self,
        index: usize,
        deadline: Option<&Deadline>,
        err: rusqlite::Error,
    ) -> StoreError {
        if let Some(stopped) =
            deadline::stopped(&self.guard, deadline, &format!("statement {index}"))
        {
            self.count_stopped();
            return stopped;
        }
        if let Some(captured) = self.capture.take_error() {
            return match captured {
                CaptureError::TooManyCells { limit } => StoreError::TooLarge {
                    what: "cells changed by one transaction",
                    size: limit + 1,
                    limit,
                },
                CaptureError::KeyUpdate { .. } | CaptureError::Unreplicable { .. } => {
                    StoreError::Refused {
                        index,
                        reason: captured.to_string(),
                    }
                }
                CaptureError::Key { .. } => StoreError::Constraint {
                    index,
                    message: captured.to_string(),
                },
                other => StoreError::Corrupt(other.to_string()),
            };
        }
        if let rusqlite::Error::SqliteFailure(code, _) = &err
            && code.code == ErrorCode::TooBig
        {
            // Built past the writer's length limit inside an expression: SQLite cannot say which
            // column it was meant for, so the answer names the limits.
            return StoreError::Refused {
                index,
                reason: format!(
                    "a value or row is over {} bytes, the most the writer builds; a replicated                      value may be at most {} bytes",
                    super::super::WRITER_VALUE_BYTES_MAX,
                    super::super::CELL_BYTES_MAX
                ),
            };
        }
        let denied = self
            .denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // A refusal by the authorizer surfaces as SQLITE_AUTH or, for functions, as a plain
        // error: either way the authorizer's reason is the precise one.
        match (statement_error(index, err), denied) {
            (_, Some(reason)) => StoreError::Refused { index, reason },
            (other, None) => other,
        }
    }
}

/// Refuses statement forms replication cannot allow, before SQLite sees them: `INSERT OR
/// REPLACE`, `REPLACE INTO` and `UPDATE OR REPLACE` delete rows without telling the triggers.
fn check_statement(index: usize, statement: &Statement, sql_bytes_max: usize) -> Result<()> {
    if statement.sql.len() > sql_bytes_max {
        return Err(StoreError::TooLarge {
            what: "statement SQL in bytes",
            size: statement.sql.len(),
            limit: sql_bytes_max,
        });
    }
    // Tokenizing costs more than running a typical statement; most never mention the word.
    let sql = statement.sql.as_bytes();
    let mentions_replace = sql.iter().enumerate().any(|(i, &b)| {
        b | 0x20 == b'r'
            && sql
                .get(i..i + 7)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"replace"))
    });
    if !mentions_replace {
        return Ok(());
    }
    let tokens = Tokenizer::new(&SQLiteDialect {}, &statement.sql)
        .tokenize()
        .map_err(|err| StoreError::BadStatement {
            index,
            message: err.to_string(),
        })?;
    let words: Vec<&Token> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let keyword = |t: Option<&&Token>, k: Keyword| matches!(t, Some(Token::Word(w)) if w.keyword == k && w.quote_style.is_none());
    for (i, token) in words.iter().enumerate() {
        let replace_here = keyword(Some(token), Keyword::REPLACE);
        if !replace_here {
            continue;
        }
        let or_before = i > 0 && keyword(words.get(i - 1), Keyword::OR);
        let call = matches!(words.get(i + 1), Some(Token::LParen));
        let into_after = keyword(words.get(i + 1), Keyword::INTO);
        if (or_before && !call) || into_after {
            return Err(StoreError::Refused {
                index,
                reason: "INSERT OR REPLACE / REPLACE is refused on replicated tables: it deletes \
                         rows behind replication's back. Use INSERT ... ON CONFLICT (key) DO \
                         UPDATE SET ..."
                    .into(),
            });
        }
    }
    Ok(())
}

/// The precise store error for a SQLite error of a user statement (bad SQL, unknown table,
/// constraint, refused by the authorizer); I/O and internal failures stay `Sqlite`.
pub(crate) fn statement_error(index: usize, err: rusqlite::Error) -> StoreError {
    let unknown_or_bad = |message: String| match message.strip_prefix("no such table: ") {
        Some(table) => StoreError::UnknownTable {
            index,
            table: table.to_owned(),
        },
        None => StoreError::BadStatement { index, message },
    };
    match err {
        rusqlite::Error::SqliteFailure(code, message) => {
            let message = message.unwrap_or_else(|| code.to_string());
            match code.code {
                ErrorCode::AuthorizationForStatementDenied => StoreError::Refused {
                    index,
                    reason: message,
                },
                ErrorCode::ConstraintViolation => StoreError::Constraint { index, message },
                ErrorCode::Unknown
                | ErrorCode::ApiMisuse
                | ErrorCode::TypeMismatch
                | ErrorCode::TooBig
                | ErrorCode::ParameterOutOfRange => unknown_or_bad(message),
                _ => StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, Some(message))),
            }
        }
        rusqlite::Error::ExecuteReturnedResults => StoreError::BadStatement {
            index,
            message: "statement returns rows; use a query for reads".into(),
        },
        rusqlite::Error::MultipleStatement => StoreError::BadStatement {
            index,
            message: "one statement per entry; split the SQL".into(),
        },
        rusqlite::Error::InvalidParameterCount(got, expected) => StoreError::BadStatement {
            index,
            message: format!("statement takes {expected} parameters, {got} given"),
        },
        rusqlite::Error::SqlInputError {
            error, msg, offset, ..
        } => {
            if error.code == ErrorCode::AuthorizationForStatementDenied {
                StoreError::Refused { index, reason: msg }
            } else if msg.starts_with("no such table: ") {
                unknown_or_bad(msg)
            } else {
                StoreError::BadStatement {
                    index,
                    message: format!("{msg} (at offset {offset})"),
                }
            }
        }
        other => StoreError::BadStatement {
            index,
            message: other.to_string(),
        },
    }
}
