//! SQL values as the store carries them, and the canonical packed encoding of primary keys.
//!
//! A primary key travels and is stored as one byte string (`PackedPk`), so that rows of any table
//! can be named the same way on every node. The encoding is canonical: one logical key has exactly
//! one encoding, byte-identical on every node, because merges find rows by these bytes.
//!
//! Layout: one byte with the number of key columns, then per column a tag byte and its payload:
//! `1` INTEGER (8 bytes big-endian), `2` REAL (8 bytes big-endian IEEE-754), `3` TEXT and `4` BLOB
//! (a LEB128 length, then the bytes). NULL never appears in a key.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The largest TEXT or BLOB (bytes) a cell, or a packed primary key, may hold. Writers refuse
/// bigger ones and receivers reject them, with the same rule ([`check_replicable`]): a change
/// travels whole in one chunk, so a cell must fit comfortably in the sync frame (16 MiB) once
/// encoded, next to the rest of its chunk.
pub const CELL_BYTES_MAX: usize = 1 << 20;

/// Why a value cannot replicate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreplicable {
    /// The value is bigger than [`CELL_BYTES_MAX`].
    #[error("value of {size} bytes is over the limit of {limit} bytes per value")]
    TooLarge {
        /// Its size, bytes.
        size: usize,
        /// The limit, bytes.
        limit: usize,
    },
    /// TEXT that is not valid UTF-8: every receiver would refuse it.
    #[error("TEXT value is not valid UTF-8 (store such bytes as a BLOB)")]
    NotUtf8,
}

/// A borrowed SQL value, as SQLite hands one over (TEXT as bytes, which SQLite does not check
/// for UTF-8). With the feature `sqlite`, SQLite's own borrowed values convert into it, so the
/// store passes them to [`pack_pk`], [`check_replicable`] and [`Value::same_as`] as they are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    /// SQL NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// Text, as bytes (not necessarily UTF-8).
    Text(&'a [u8]),
    /// Bytes.
    Blob(&'a [u8]),
}

/// Checks that every node can carry and accept `value`: the one rule of writers and receivers.
pub fn check_replicable<'a>(value: impl Into<ValueRef<'a>>) -> Result<(), Unreplicable> {
    let size = match value.into() {
        ValueRef::Null | ValueRef::Integer(_) | ValueRef::Real(_) => return Ok(()),
        ValueRef::Text(t) => {
            if std::str::from_utf8(t).is_err() {
                return Err(Unreplicable::NotUtf8);
            }
            t.len()
        }
        ValueRef::Blob(b) => b.len(),
    };
    if size > CELL_BYTES_MAX {
        return Err(Unreplicable::TooLarge {
            size,
            limit: CELL_BYTES_MAX,
        });
    }
    Ok(())
}

/// An owned SQL value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    /// Exact equality: same type and same value (reals compared bit for bit), as a cell store sees
    /// it. `1` and `1.0` are different here, which at worst records a change that was not needed.
    pub fn same_as<'a>(&self, other: impl Into<ValueRef<'a>>) -> bool {
        match (self, other.into()) {
            (Value::Null, ValueRef::Null) => true,
            (Value::Integer(a), ValueRef::Integer(b)) => *a == b,
            (Value::Real(a), ValueRef::Real(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), ValueRef::Text(b)) => a.as_bytes() == b,
            (Value::Blob(a), ValueRef::Blob(b)) => a.as_slice() == b,
            _ => false,
        }
    }

    /// Copies a borrowed SQLite value. Text that is not UTF-8 is kept as a blob.
    pub fn from_ref<'a>(value: impl Into<ValueRef<'a>>) -> Value {
        match value.into() {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(r) => Value::Real(r),
            ValueRef::Text(t) => match std::str::from_utf8(t) {
                Ok(s) => Value::Text(s.to_owned()),
                Err(_) => Value::Blob(t.to_vec()),
            },
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }

    /// The value borrowed as SQLite sees it.
    pub fn as_value_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }
    }

    /// A rough size in bytes, for chunking.
    pub fn size_hint(&self) -> usize {
        match self {
            Value::Null => 1,
            Value::Integer(_) | Value::Real(_) => 9,
            Value::Text(s) => s.len() + 4,
            Value::Blob(b) => b.len() + 4,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "NULL"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Real(r) => write!(f, "{r:?}"),
            Value::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Value::Blob(b) => write!(f, "X'{}'", hex::encode(b)),
        }
    }
}

const TAG_INTEGER: u8 = 1;
const TAG_REAL: u8 = 2;
const TAG_TEXT: u8 = 3;
const TAG_BLOB: u8 = 4;

/// Packs primary-key values into their canonical byte string.
///
/// Fails on NULL: a replicated row must have a non-null key.
pub fn pack_pk<'a, V: Into<ValueRef<'a>>>(
    values: impl IntoIterator<Item = V>,
) -> Result<Vec<u8>, PkError> {
    let mut out = Vec::with_capacity(24);
    out.push(0);
    let mut count = 0usize;
    for value in values {
        count += 1;
        match value.into() {
            ValueRef::Null => return Err(PkError::Null { column: count - 1 }),
            ValueRef::Integer(i) => {
                out.push(TAG_INTEGER);
                out.extend_from_slice(&i.to_be_bytes());
            }
            ValueRef::Real(r) => {
                out.push(TAG_REAL);
                out.extend_from_slice(&r.to_bits().to_be_bytes());
            }
            ValueRef::Text(t) => {
                out.push(TAG_TEXT);
                put_len(&mut out, t.len());
                out.extend_from_slice(t);
            }
            ValueRef::Blob(b) => {
                out.push(TAG_BLOB);
                put_len(&mut out, b.len());
                out.extend_from_slice(b);
            }
        }
    }
    out[0] = u8::try_from(count).map_err(|_| PkError::TooManyColumns)?;
    Ok(out)
}

/// Unpacks a canonical primary key. Fails on anything that `pack_pk` could not have produced.
pub fn unpack_pk(bytes: &[u8]) -> Result<Vec<Value>, PkError> {
    let (&count, mut rest) = bytes.split_first().ok_or(PkError::Malformed)?;
    let mut values = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (&tag, tail) = rest.split_first().ok_or(PkError::Malformed)?;
        rest = tail;
        let value = match tag {
            TAG_INTEGER | TAG_REAL => {
                let (raw, tail) = rest.split_first_chunk::<8>().ok_or(PkError::Malformed)?;
                rest = tail;
                let raw = u64::from_be_bytes(*raw);
                if tag == TAG_INTEGER {
                    Value::Integer(raw as i64)
                } else {
                    Value::Real(f64::from_bits(raw))
                }
            }
            TAG_TEXT | TAG_BLOB => {
                let (len, tail) = get_len(rest)?;
                if tail.len() < len {
                    return Err(PkError::Malformed);
                }
                let (data, tail) = tail.split_at(len);
                rest = tail;
                if tag == TAG_TEXT {
                    Value::Text(String::from_utf8(data.to_vec()).map_err(|_| PkError::Malformed)?)
                } else {
                    Value::Blob(data.to_vec())
                }
            }
            _ => return Err(PkError::Malformed),
        };
        values.push(value);
    }
    if !rest.is_empty() {
        return Err(PkError::Malformed);
    }
    Ok(values)
}

/// Renders a packed key for messages: `('a', 1)`.
pub fn display_pk(bytes: &[u8]) -> String {
    match unpack_pk(bytes) {
        Ok(values) => {
            let parts: Vec<String> = values.iter().map(ToString::to_string).collect();
            format!("({})", parts.join(", "))
        }
        Err(_) => format!("<malformed key {}>", hex::encode(bytes)),
    }
}

fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_len(bytes: &[u8]) -> Result<(usize, &[u8]), PkError> {
    let mut len = 0usize;
    for (i, &byte) in bytes.iter().enumerate().take(5) {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // Canonical: no superfluous trailing zero groups.
            if i > 0 && byte == 0 {
                return Err(PkError::Malformed);
            }
            return Ok((len, &bytes[i + 1..]));
        }
    }
    Err(PkError::Malformed)
}

/// Why a primary key could not be packed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkError {
    /// A key column held NULL.
    #[error("primary key column {column} is NULL; replicated rows need a non-null key")]
    Null {
        /// Position of the column in the key.
        column: usize,
    },
    /// More than 255 key columns.
    #[error("primary key has more than 255 columns")]
    TooManyColumns,
    /// The bytes are not a canonical packed key.
    #[error("malformed packed primary key")]
    Malformed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_key_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Real),
            ".{0,40}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Blob),
        ]
    }

    fn as_ref(v: &Value) -> ValueRef<'_> {
        match v {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }
    }

    proptest! {
        #[test]
        fn pk_round_trips(values in proptest::collection::vec(arb_key_value(), 1..5)) {
            let packed = pack_pk(values.iter().map(as_ref)).unwrap();
            let back = unpack_pk(&packed).unwrap();
            prop_assert_eq!(back.len(), values.len());
            for (a, b) in back.iter().zip(&values) {
                prop_assert!(a.same_as(as_ref(b)));
            }
        }

        #[test]
        fn unpack_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unpack_pk(&bytes);
        }
    }

    #[test]
    fn key_types_are_distinct() {
        let int = pack_pk([ValueRef::Integer(1)]).unwrap();
        let real = pack_pk([ValueRef::Real(1.0)]).unwrap();
        let text = pack_pk([ValueRef::Text(b"1")]).unwrap();
        assert_ne!(int, real);
        assert_ne!(int, text);
        assert_ne!(real, text);
    }

    #[test]
    fn null_key_is_refused() {
        assert_eq!(
            pack_pk([ValueRef::Text(b"a"), ValueRef::Null]),
            Err(PkError::Null { column: 1 })
        );
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut packed = pack_pk([ValueRef::Integer(7)]).unwrap();
        packed.push(0);
        assert_eq!(unpack_pk(&packed), Err(PkError::Malformed));
    }
}
