//! What the keyed API needs to know about a read-model table: its columns, their types and its
//! primary key, read from the catalog once per table and batch-independent.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{PgConnection, Row};

use super::EffectError;

/// How the host binds and combines a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Int,
    Float,
    Numeric,
    Bool,
    Text,
    Json,
    Bytes,
    /// Anything else (uuid, timestamptz, ...): passed as text and cast by PostgreSQL.
    Other,
}

impl ColumnKind {
    fn from_type_name(name: &str) -> ColumnKind {
        match name {
            "bigint" | "integer" | "smallint" => ColumnKind::Int,
            "double precision" | "real" => ColumnKind::Float,
            "boolean" => ColumnKind::Bool,
            "text" | "name" => ColumnKind::Text,
            "json" | "jsonb" => ColumnKind::Json,
            "bytea" => ColumnKind::Bytes,
            n if n.starts_with("numeric") => ColumnKind::Numeric,
            n if n.starts_with("character") => ColumnKind::Text,
            _ => ColumnKind::Other,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ColumnKind::Int => "integer",
            ColumnKind::Float => "float",
            ColumnKind::Numeric => "numeric",
            ColumnKind::Bool => "boolean",
            ColumnKind::Text => "text",
            ColumnKind::Json => "json",
            ColumnKind::Bytes => "bytea",
            ColumnKind::Other => "a non-basic type (pass text)",
        }
    }

    /// The array type the host binds a column of this kind with.
    pub fn bind_array_type(self) -> &'static str {
        match self {
            ColumnKind::Int => "int8[]",
            ColumnKind::Float => "float8[]",
            ColumnKind::Bool => "bool[]",
            ColumnKind::Bytes => "bytea[]",
            _ => "text[]",
        }
    }

    /// A select expression that reads a column of this kind back in the bound representation.
    pub fn read_expr(self, quoted_column: &str) -> String {
        match self {
            ColumnKind::Int => format!("{quoted_column}::int8"),
            ColumnKind::Float => format!("{quoted_column}::float8"),
            ColumnKind::Bool | ColumnKind::Bytes => quoted_column.to_string(),
            _ => format!("{quoted_column}::text"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub quoted: String,
    /// `format_type` of the column, used for casts.
    pub sql_type: String,
    pub kind: ColumnKind,
}

#[derive(Debug)]
pub struct TableSchema {
    /// As the plugin named it (for messages).
    pub name: String,
    /// Fully qualified and quoted.
    pub qualified: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns`, in primary-key order.
    pub key: Vec<usize>,
    by_name: HashMap<String, usize, foldhash::fast::RandomState>,
}

impl TableSchema {
    pub fn column_index(&self, name: &str) -> Result<usize, EffectError> {
        self.by_name.get(name).copied().ok_or_else(|| {
            EffectError::invalid(format!(
                "table '{}' has no column '{name}' (columns: {})",
                self.name,
                self.columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    pub fn is_key(&self, column: usize) -> bool {
        self.key.contains(&column)
    }

    /// Reads the table's shape from the catalog, resolving `name` with the connection's
    /// search path (the projection's schema).
    pub async fn load(conn: &mut PgConnection, name: &str) -> Result<TableSchema, EffectError> {
        let rows = sqlx::query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS qualified,
                    a.attname::text AS column_name,
                    format_type(a.atttypid, a.atttypmod) AS sql_type,
                    (t.typnamespace = 'pg_catalog'::regnamespace) AS builtin,
                    COALESCE((SELECT k.ord FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                               WHERE k.attnum = a.attnum), 0)::int4 AS key_position
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
              WHERE c.oid = to_regclass($1)
              ORDER BY a.attnum",
        )
        .bind(name)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| EffectError::from_sql(&e))?;
        if rows.is_empty() {
            return Err(EffectError::invalid(format!(
                "table '{name}' does not exist in the projection's schema (create it in setup)"
            )));
        }
        let qualified: String = rows[0].get("qualified");
        let mut columns = Vec::with_capacity(rows.len());
        let mut keyed: Vec<(i32, usize)> = Vec::new();
        for (index, row) in rows.iter().enumerate() {
            let column_name: String = row.get("column_name");
            let sql_type: String = row.get("sql_type");
            let key_position: i32 = row.get("key_position");
            let builtin: bool = row.get("builtin");
            if !builtin {
                // Its casts to and from text are the plugin's own functions, which could make
                // what the host measures differ from what it reads.
                return Err(EffectError::invalid(format!(
                    "column '{column_name}' of table '{name}' has the type {sql_type} defined in the database; \
                     the keyed API reads and writes only built-in types (use execute/query for this table)"
                )));
            }
            if key_position > 0 {
                keyed.push((key_position, index));
            }
            columns.push(Column {
                quoted: crate::db::quote_ident(&column_name),
                kind: ColumnKind::from_type_name(&sql_type),
                name: column_name,
                sql_type,
            });
        }
        if keyed.is_empty() {
            return Err(EffectError::invalid(format!(
                "table '{name}' has no primary key; the keyed API needs one (use execute for other tables)"
            )));
        }
        keyed.sort();
        let by_name = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        Ok(TableSchema {
            name: name.to_string(),
            qualified,
            columns,
            key: keyed.into_iter().map(|(_, i)| i).collect(),
            by_name,
        })
    }
}

/// Most table shapes kept per projection.
const MAX_CACHED_TABLES: usize = 256;

/// Table shapes of one projection, loaded on first use. Cleared whenever the projection runs
/// its own SQL, since that may change a table.
#[derive(Default)]
pub struct SchemaCache {
    tables: HashMap<String, Arc<TableSchema>>,
}

impl SchemaCache {
    pub async fn get(
        &mut self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Arc<TableSchema>, EffectError> {
        if let Some(schema) = self.tables.get(name) {
            return Ok(schema.clone());
        }
        let schema = Arc::new(TableSchema::load(conn, name).await?);
        if self.tables.len() >= MAX_CACHED_TABLES {
            // Names that resolve to the same table ("t", " t") must not grow it without bound.
            self.tables.clear();
        }
        self.tables.insert(name.to_string(), schema.clone());
        Ok(schema)
    }

    pub fn clear(&mut self) {
        self.tables.clear();
    }
}

/// A table shape for unit tests: `accounts(id text PK, balance bigint, count bigint, best bigint,
/// first_seen bigint, note text)`.
#[cfg(test)]
pub fn test_schema() -> Arc<TableSchema> {
    let columns: Vec<Column> = [
        ("id", "text"),
        ("balance", "bigint"),
        ("count", "bigint"),
        ("best", "bigint"),
        ("first_seen", "bigint"),
        ("note", "text"),
    ]
    .iter()
    .map(|(name, ty)| Column {
        name: name.to_string(),
        quoted: crate::db::quote_ident(name),
        sql_type: ty.to_string(),
        kind: ColumnKind::from_type_name(ty),
    })
    .collect();
    let by_name = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.clone(), i))
        .collect();
    Arc::new(TableSchema {
        name: "accounts".into(),
        qualified: "\"rm\".\"accounts\"".into(),
        columns,
        key: vec![0],
        by_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_type_names_map_to_binding_kinds() {
        assert_eq!(ColumnKind::from_type_name("bigint"), ColumnKind::Int);
        assert_eq!(
            ColumnKind::from_type_name("numeric(12,2)"),
            ColumnKind::Numeric
        );
        assert_eq!(
            ColumnKind::from_type_name("character varying(40)"),
            ColumnKind::Text
        );
        assert_eq!(ColumnKind::from_type_name("jsonb"), ColumnKind::Json);
        assert_eq!(ColumnKind::from_type_name("uuid"), ColumnKind::Other);
    }
}
