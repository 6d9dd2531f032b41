//! SQL as clients send it and get it back: a statement with its parameters, and the rows a
//! query returns. The store runs them; the API and the client carry them.

use crate::value::Value;

/// One SQL statement with positional parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// The SQL text (one statement).
    pub sql: String,
    /// Values for `?1`, `?2`, ...
    pub params: Vec<Value>,
}

impl Statement {
    /// A statement without parameters.
    pub fn new(sql: impl Into<String>) -> Statement {
        Statement {
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    /// A statement with parameters.
    pub fn with_params(sql: impl Into<String>, params: Vec<Value>) -> Statement {
        Statement {
            sql: sql.into(),
            params,
        }
    }
}

/// Rows returned by a query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    /// Column names.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: Vec<Vec<Value>>,
}
