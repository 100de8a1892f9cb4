//! The statements the output sends, built once from its options: the table
//! it creates, `COPY … FROM STDIN (FORMAT binary)`, and `INSERT … SELECT
//! FROM UNNEST(…)` with or without `ON CONFLICT … DO UPDATE`. UNNEST binds
//! one array per column, so a batch of any size is one statement with as
//! many parameters as columns: no bind-parameter limit to hit.

use conflux_api::columns::ColumnType;

/// `"name"`, with inner quotes doubled; `schema.table` quotes each part.
pub fn quote(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// The column type `create: true` makes for a mapping type.
pub fn sql_type(kind: ColumnType) -> &'static str {
    match kind {
        ColumnType::Text => "text",
        ColumnType::Integer => "bigint",
        ColumnType::Double => "double precision",
        ColumnType::Boolean => "boolean",
        ColumnType::Timestamp => "timestamptz",
        ColumnType::Json => "jsonb",
    }
}

/// The array cast of a column's UNNEST parameter (values are bound as
/// `bigint[]`, `double precision[]`, `boolean[]` or `text[]`).
fn array_cast(kind: ColumnType) -> &'static str {
    match kind {
        ColumnType::Text => "text[]",
        ColumnType::Integer => "int8[]",
        ColumnType::Double => "float8[]",
        ColumnType::Boolean => "bool[]",
        ColumnType::Timestamp => "text[]::timestamptz[]",
        ColumnType::Json => "text[]::jsonb[]",
    }
}

/// The statements for one table and column list.
#[derive(Debug, Clone)]
pub struct Statements {
    pub create: String,
    pub copy: String,
    pub insert: String,
    /// An upsert's rows go by binary COPY into a session's temporary table
    /// of the target's own column types, then into the target in one
    /// `INSERT … SELECT … ON CONFLICT`: faster than binding arrays the
    /// server must parse (timestamps and JSON as text).
    pub stage: Stage,
}

/// The statements of an upsert through a temporary table.
#[derive(Debug, Clone, Default)]
pub struct Stage {
    pub create: String,
    pub copy: String,
    pub merge: String,
    pub clear: String,
}

impl Statements {
    /// `columns`: (name, type, nullable) in writing order; `key`: the
    /// conflict columns for an upsert (empty: plain insert).
    pub fn new(table: &str, columns: &[(String, ColumnType, bool)], key: &[String]) -> Statements {
        let table_q = quote(table);
        let names: Vec<String> = columns.iter().map(|(n, _, _)| quote(n)).collect();
        let list = names.join(", ");
        let mut defs: Vec<String> = columns
            .iter()
            .map(|(n, kind, nullable)| {
                format!("{} {}{}", quote(n), sql_type(*kind), if *nullable { "" } else { " NOT NULL" })
            })
            .collect();
        if !key.is_empty() {
            defs.push(format!("PRIMARY KEY ({})", key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")));
        }
        let create = format!("CREATE TABLE IF NOT EXISTS {table_q} ({})", defs.join(", "));
        let copy = format!("COPY {table_q} ({list}) FROM STDIN (FORMAT binary)");
        let params: Vec<String> =
            columns.iter().enumerate().map(|(i, (_, kind, _))| format!("${}::{}", i + 1, array_cast(*kind))).collect();
        let mut insert = format!("INSERT INTO {table_q} ({list}) SELECT * FROM UNNEST({})", params.join(", "));
        let mut stage = Stage::default();
        if !key.is_empty() {
            let keys: Vec<String> = key.iter().map(|k| quote(k)).collect();
            let updates: Vec<String> = columns
                .iter()
                .filter(|(n, _, _)| !key.contains(n))
                .map(|(n, _, _)| format!("{q} = EXCLUDED.{q}", q = quote(n)))
                .collect();
            let mut conflict = format!(" ON CONFLICT ({})", keys.join(", "));
            if updates.is_empty() {
                conflict.push_str(" DO NOTHING");
            } else {
                conflict.push_str(&format!(" DO UPDATE SET {}", updates.join(", ")));
            }
            insert.push_str(&conflict);
            let stage_q = quote("conflux_upsert_stage");
            stage = Stage {
                create: format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {stage_q} ON COMMIT DELETE ROWS AS SELECT {list} FROM {table_q} WITH NO DATA"
                ),
                copy: format!("COPY {stage_q} ({list}) FROM STDIN (FORMAT binary)"),
                merge: format!("INSERT INTO {table_q} ({list}) SELECT {list} FROM {stage_q}{conflict}"),
                clear: format!("TRUNCATE {stage_q}"),
            };
        }
        Statements { create, copy, insert, stage }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_and_upserts_update_the_rest() {
        assert_eq!(quote("public.book\"ings"), "\"public\".\"book\"\"ings\"");
        let columns = vec![
            ("id".to_string(), ColumnType::Text, false),
            ("guests".to_string(), ColumnType::Integer, true),
            ("at".to_string(), ColumnType::Timestamp, false),
        ];
        let s = Statements::new("bookings", &columns, &["id".to_string()]);
        assert_eq!(
            s.create,
            "CREATE TABLE IF NOT EXISTS \"bookings\" (\"id\" text NOT NULL, \"guests\" bigint, \"at\" timestamptz NOT NULL, PRIMARY KEY (\"id\"))"
        );
        assert_eq!(s.copy, "COPY \"bookings\" (\"id\", \"guests\", \"at\") FROM STDIN (FORMAT binary)");
        assert_eq!(
            s.insert,
            "INSERT INTO \"bookings\" (\"id\", \"guests\", \"at\") SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[]::timestamptz[]) ON CONFLICT (\"id\") DO UPDATE SET \"guests\" = EXCLUDED.\"guests\", \"at\" = EXCLUDED.\"at\""
        );
    }
}
