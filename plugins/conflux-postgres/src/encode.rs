//! Rows in the two shapes PostgreSQL takes them: binary `COPY` data, and
//! one typed array per column for `UNNEST`.

use conflux_api::columns::{ColumnType, TypedValue};
use conflux_api::Timestamp;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// How a column of the table takes an integer or a double in binary COPY
/// (the wire size must match the column's own type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// As the mapping's type says: `bigint`, `double precision`, `jsonb`…
    Native,
    /// An `integer` column: 4 bytes.
    Int4,
    /// A `smallint` column: 2 bytes.
    Int2,
    /// A `real` column: 4-byte float.
    Float4,
    /// A `json` (not `jsonb`) column: the text without jsonb's version byte.
    Json,
}

/// The binary COPY header: signature, flags, header extension length.
pub fn copy_header(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
}

/// The binary COPY trailer.
pub fn copy_trailer(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Appends one row; `Err` (nothing appended) names the column whose value
/// does not fit the table's type.
pub fn copy_row(out: &mut Vec<u8>, row: &[TypedValue], wires: &[Wire], names: &[String]) -> Result<(), String> {
    let start = out.len();
    out.extend_from_slice(&(row.len() as i16).to_be_bytes());
    for ((value, wire), name) in row.iter().zip(wires).zip(names) {
        let fits = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("column `{name}`: the value is out of the column type's range"))
            }
        };
        let result = match (value, wire) {
            (TypedValue::Null, _) => {
                out.extend_from_slice(&(-1i32).to_be_bytes());
                Ok(())
            }
            (TypedValue::Text(s), _) => {
                field(out, s.as_bytes());
                Ok(())
            }
            (TypedValue::Integer(i), Wire::Int4) => {
                fits(i32::try_from(*i).is_ok()).map(|()| field(out, &(*i as i32).to_be_bytes()))
            }
            (TypedValue::Integer(i), Wire::Int2) => {
                fits(i16::try_from(*i).is_ok()).map(|()| field(out, &(*i as i16).to_be_bytes()))
            }
            (TypedValue::Integer(i), _) => {
                field(out, &i.to_be_bytes());
                Ok(())
            }
            (TypedValue::Double(f), Wire::Float4) => {
                field(out, &(*f as f32).to_be_bytes());
                Ok(())
            }
            (TypedValue::Double(f), _) => {
                field(out, &f.to_be_bytes());
                Ok(())
            }
            (TypedValue::Boolean(b), _) => {
                field(out, &[u8::from(*b)]);
                Ok(())
            }
            (TypedValue::Timestamp(t), _) => {
                field(out, &pg_micros(*t).to_be_bytes());
                Ok(())
            }
            (TypedValue::Json(text), wire) => {
                let mut bytes = Vec::with_capacity(text.len() + 1);
                if *wire != Wire::Json {
                    bytes.push(1); // jsonb format version
                }
                bytes.extend_from_slice(text.as_bytes());
                field(out, &bytes);
                Ok(())
            }
        };
        if result.is_err() {
            out.truncate(start);
            return result;
        }
    }
    Ok(())
}

/// A timestamp as PostgreSQL's binary `timestamptz`: microseconds since 2000-01-01.
fn pg_micros(t: Timestamp) -> i64 {
    t.0.div_euclid(1000) - PG_EPOCH_MICROS
}

/// One column's values for UNNEST, in the array type its cast expects.
#[derive(Debug)]
pub enum ColumnArray {
    Text(Vec<Option<String>>),
    Integer(Vec<Option<i64>>),
    Double(Vec<Option<f64>>),
    Boolean(Vec<Option<bool>>),
}

impl ColumnArray {
    pub fn new(kind: ColumnType, rows: usize) -> ColumnArray {
        match kind {
            ColumnType::Integer => ColumnArray::Integer(Vec::with_capacity(rows)),
            ColumnType::Double => ColumnArray::Double(Vec::with_capacity(rows)),
            ColumnType::Boolean => ColumnArray::Boolean(Vec::with_capacity(rows)),
            ColumnType::Text | ColumnType::Timestamp | ColumnType::Json => ColumnArray::Text(Vec::with_capacity(rows)),
        }
    }

    /// Appends a value of the column's type (timestamps and JSON as text,
    /// cast back by the statement).
    pub fn push(&mut self, value: &TypedValue) {
        match (self, value) {
            (ColumnArray::Integer(v), TypedValue::Integer(i)) => v.push(Some(*i)),
            (ColumnArray::Integer(v), _) => v.push(None),
            (ColumnArray::Double(v), TypedValue::Double(f)) => v.push(Some(*f)),
            (ColumnArray::Double(v), _) => v.push(None),
            (ColumnArray::Boolean(v), TypedValue::Boolean(b)) => v.push(Some(*b)),
            (ColumnArray::Boolean(v), _) => v.push(None),
            (ColumnArray::Text(v), TypedValue::Text(s)) => v.push(Some(s.clone())),
            (ColumnArray::Text(v), TypedValue::Timestamp(t)) => v.push(Some(t.to_rfc3339())),
            (ColumnArray::Text(v), TypedValue::Json(j)) => v.push(Some(j.clone())),
            (ColumnArray::Text(v), _) => v.push(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_count_from_the_postgres_epoch() {
        // 2000-01-01T00:00:01.5Z is 1.5 s after PostgreSQL's epoch.
        let t = Timestamp::parse_rfc3339("2000-01-01T00:00:01.5Z").unwrap();
        assert_eq!(pg_micros(t), 1_500_000);
        let before = Timestamp::parse_rfc3339("1999-12-31T23:59:59Z").unwrap();
        assert_eq!(pg_micros(before), -1_000_000);
    }

    #[test]
    fn a_value_out_of_an_int4_column_leaves_nothing_behind() {
        let mut out = vec![7];
        let names = vec!["a".to_string(), "b".to_string()];
        let row = vec![TypedValue::Integer(1), TypedValue::Integer(i64::from(i32::MAX) + 1)];
        let err = copy_row(&mut out, &row, &[Wire::Int4, Wire::Int4], &names).unwrap_err();
        assert!(err.contains("column `b`"), "{err}");
        assert_eq!(out, vec![7]);
        copy_row(&mut out, &row[..1], &[Wire::Int4], &names).unwrap();
        assert_eq!(out, vec![7, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1]);
    }
}
