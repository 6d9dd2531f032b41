//! The glue between [`Value`]/[`ValueRef`] and rusqlite (feature `sqlite`): binding a value as a
//! parameter, reading one from a row, and SQLite's borrowed values in and out of ours. It lives
//! here because the orphan rule forbids implementing rusqlite's traits for `Value` anywhere else.

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput};

use crate::value::{Value, ValueRef};

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        use rusqlite::types::ValueRef;
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Integer(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Real(r) => ToSqlOutput::Borrowed(ValueRef::Real(*r)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

impl FromSql for Value {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(Value::from_ref(value))
    }
}

impl<'a> From<rusqlite::types::ValueRef<'a>> for ValueRef<'a> {
    fn from(value: rusqlite::types::ValueRef<'a>) -> Self {
        match value {
            rusqlite::types::ValueRef::Null => ValueRef::Null,
            rusqlite::types::ValueRef::Integer(i) => ValueRef::Integer(i),
            rusqlite::types::ValueRef::Real(r) => ValueRef::Real(r),
            rusqlite::types::ValueRef::Text(t) => ValueRef::Text(t),
            rusqlite::types::ValueRef::Blob(b) => ValueRef::Blob(b),
        }
    }
}

impl<'a> From<ValueRef<'a>> for rusqlite::types::ValueRef<'a> {
    fn from(value: ValueRef<'a>) -> Self {
        match value {
            ValueRef::Null => rusqlite::types::ValueRef::Null,
            ValueRef::Integer(i) => rusqlite::types::ValueRef::Integer(i),
            ValueRef::Real(r) => rusqlite::types::ValueRef::Real(r),
            ValueRef::Text(t) => rusqlite::types::ValueRef::Text(t),
            ValueRef::Blob(b) => rusqlite::types::ValueRef::Blob(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    #[test]
    fn every_kind_of_value_round_trips_through_sqlite() {
        let conn = Connection::open_in_memory().unwrap();
        let values = [
            Value::Null,
            Value::Integer(-7),
            Value::Real(1.5),
            Value::Text("it's".into()),
            Value::Blob(vec![0, 255]),
        ];
        for value in values {
            let back: Value = conn
                .query_row("SELECT ?1", [&value], |row| row.get(0))
                .unwrap();
            assert_eq!(back, value);
            let borrowed: rusqlite::types::ValueRef<'_> = value.as_value_ref().into();
            assert!(value.same_as(borrowed), "{value}");
        }
    }
}
