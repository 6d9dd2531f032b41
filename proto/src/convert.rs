//! Conversions between the wire types of the API (`strata_proto::v1`) and the shared data of
//! `strata-types`, used by the API that serves them and by the client that calls it.

use strata_types::{Statement, Value};
use tonic::Status;

use crate::v1 as pb;

/// A store value from a wire value (an unset kind is NULL).
pub fn value_from_pb(value: pb::Value) -> Value {
    match value.kind {
        None => Value::Null,
        Some(pb::value::Kind::Integer(i)) => Value::Integer(i),
        Some(pb::value::Kind::Real(r)) => Value::Real(r),
        Some(pb::value::Kind::Text(s)) => Value::Text(s),
        Some(pb::value::Kind::Blob(b)) => Value::Blob(b),
    }
}

/// A wire value from a store value.
pub fn value_to_pb(value: Value) -> pb::Value {
    let kind = match value {
        Value::Null => None,
        Value::Integer(i) => Some(pb::value::Kind::Integer(i)),
        Value::Real(r) => Some(pb::value::Kind::Real(r)),
        Value::Text(s) => Some(pb::value::Kind::Text(s)),
        Value::Blob(b) => Some(pb::value::Kind::Blob(b)),
    };
    pb::Value { kind }
}

/// A wire row from store values.
pub fn row_to_pb(values: Vec<Value>) -> pb::Row {
    pb::Row {
        values: values.into_iter().map(value_to_pb).collect(),
    }
}

/// A store statement from a wire statement; an empty SQL text is an invalid argument.
pub fn statement_from_pb(statement: pb::Statement, index: usize) -> Result<Statement, Status> {
    if statement.sql.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "statement {index}: empty SQL"
        )));
    }
    Ok(Statement {
        sql: statement.sql,
        params: statement.params.into_iter().map(value_from_pb).collect(),
    })
}
