//! Writes buffered rows with one statement per table and write shape:
//! `INSERT ... SELECT FROM unnest($1, $2, ...) ON CONFLICT (key) DO UPDATE SET ...`.
//!
//! Rows are written in key order, so that two batches touching the same rows (from different
//! partitions) lock them in the same order and cannot deadlock each other.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres, Row};

use super::buffer::{Key, Merge, Pending, RowState, TableBuffer};
use super::schema::{ColumnKind, TableSchema};
use super::values::SqlValue;
use super::EffectError;

/// Flushes every buffered table.
pub async fn flush_all(
    conn: &mut PgConnection,
    tables: Vec<TableBuffer>,
) -> Result<(), EffectError> {
    for table in tables {
        let mut rows: Vec<(Key, RowState)> = table.rows.into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        flush_rows(conn, &table.schema, &rows).await?;
    }
    Ok(())
}

/// Flushes rows of one table: deletes first, then one upsert per write shape.
pub async fn flush_rows(
    conn: &mut PgConnection,
    schema: &TableSchema,
    rows: &[(Key, RowState)],
) -> Result<(), EffectError> {
    let deletes: Vec<&Key> = rows
        .iter()
        .filter(|(_, r)| r.delete_first)
        .map(|(k, _)| k)
        .collect();
    if !deletes.is_empty() {
        delete_rows(conn, schema, &deletes).await?;
    }
    // Shape: which columns are written, and how. Rows of one shape share a statement.
    type Shape = Vec<(usize, Merge)>;
    let mut shapes: BTreeMap<Shape, Vec<(&Key, &RowState)>> = BTreeMap::new();
    for (key, row) in rows {
        if !row.has_writes() {
            continue;
        }
        let shape = row
            .ops
            .iter()
            .enumerate()
            .filter_map(|(c, op)| op.as_ref().map(|p| (c, p.merge)))
            .collect();
        shapes.entry(shape).or_default().push((key, row));
    }
    for (shape, rows) in shapes {
        upsert_rows(conn, schema, &shape, &rows).await?;
    }
    Ok(())
}

async fn delete_rows(
    conn: &mut PgConnection,
    schema: &TableSchema,
    keys: &[&Key],
) -> Result<(), EffectError> {
    let mut sql = format!("DELETE FROM {} AS t USING unnest(", schema.qualified);
    push_params(&mut sql, schema, &schema.key, 1);
    sql.push_str(") AS u(");
    push_aliases(&mut sql, schema.key.len());
    sql.push_str(") WHERE ");
    for (i, column) in schema.key.iter().enumerate() {
        let col = &schema.columns[*column];
        if i > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(sql, "t.{} = u.c{i}::{}", col.quoted, col.sql_type);
    }
    let mut query = sqlx::query(&sql);
    for (i, column) in schema.key.iter().enumerate() {
        let values = keys.iter().map(|k| k[i].to_sql());
        query = bind_column(query, schema.columns[*column].kind, values);
    }
    query
        .execute(&mut *conn)
        .await
        .map_err(|e| EffectError::from_sql(&e))?;
    Ok(())
}

async fn upsert_rows(
    conn: &mut PgConnection,
    schema: &TableSchema,
    shape: &[(usize, Merge)],
    rows: &[(&Key, &RowState)],
) -> Result<(), EffectError> {
    let columns: Vec<usize> = schema
        .key
        .iter()
        .copied()
        .chain(shape.iter().map(|(c, _)| *c))
        .collect();
    let mut sql = format!("INSERT INTO {} AS t (", schema.qualified);
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&schema.columns[*c].quoted);
    }
    sql.push_str(") SELECT ");
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        let _ = write!(sql, "u.c{i}::{}", schema.columns[*c].sql_type);
    }
    sql.push_str(" FROM unnest(");
    push_params(&mut sql, schema, &columns, 1);
    sql.push_str(") AS u(");
    push_aliases(&mut sql, columns.len());
    sql.push_str(") ON CONFLICT (");
    for (i, c) in schema.key.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&schema.columns[*c].quoted);
    }
    sql.push(')');
    let updates: Vec<String> = shape
        .iter()
        .filter_map(|(c, merge)| {
            let q = &schema.columns[*c].quoted;
            match merge {
                Merge::Set => Some(format!("{q} = EXCLUDED.{q}")),
                Merge::Add => Some(format!("{q} = t.{q} + EXCLUDED.{q}")),
                Merge::Max => Some(format!("{q} = GREATEST(t.{q}, EXCLUDED.{q})")),
                Merge::Min => Some(format!("{q} = LEAST(t.{q}, EXCLUDED.{q})")),
                Merge::SetIfAbsent => None,
            }
        })
        .collect();
    if updates.is_empty() {
        sql.push_str(" DO NOTHING");
    } else {
        sql.push_str(" DO UPDATE SET ");
        sql.push_str(&updates.join(", "));
    }

    let mut query = sqlx::query(&sql);
    for (i, column) in schema.key.iter().enumerate() {
        query = bind_column(
            query,
            schema.columns[*column].kind,
            rows.iter().map(|(k, _)| k[i].to_sql()),
        );
    }
    for (column, _) in shape {
        let values = rows.iter().map(|(_, r)| match &r.ops[*column] {
            Some(Pending { value, .. }) => value.clone(),
            None => SqlValue::Null,
        });
        query = bind_column(query, schema.columns[*column].kind, values);
    }
    query
        .execute(&mut *conn)
        .await
        .map_err(|e| EffectError::from_sql(&e))?;
    Ok(())
}

fn push_params(sql: &mut String, schema: &TableSchema, columns: &[usize], first: usize) {
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        let _ = write!(
            sql,
            "${}::{}",
            first + i,
            schema.columns[*c].kind.bind_array_type()
        );
    }
}

fn push_aliases(sql: &mut String, n: usize) {
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        let _ = write!(sql, "c{i}");
    }
}

/// Binds one column's values as an array of the column kind's bind type.
fn bind_column<'q>(
    query: Query<'q, Postgres, PgArguments>,
    kind: ColumnKind,
    values: impl Iterator<Item = SqlValue>,
) -> Query<'q, Postgres, PgArguments> {
    // Values were checked against the column kind when buffered, so each kind sees only its
    // own variant or Null.
    match kind {
        ColumnKind::Int => query.bind(
            values
                .map(|v| match v {
                    SqlValue::Int(i) => Some(i),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        ColumnKind::Float => query.bind(
            values
                .map(|v| match v {
                    SqlValue::Float(f) => Some(f),
                    SqlValue::Int(i) => Some(i as f64),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        ColumnKind::Bool => query.bind(
            values
                .map(|v| match v {
                    SqlValue::Bool(b) => Some(b),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        ColumnKind::Bytes => query.bind(
            values
                .map(|v| match v {
                    SqlValue::Bytes(b) => Some(b),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        _ => query.bind(
            values
                .map(|v| match v {
                    SqlValue::Text(s) => Some(s),
                    SqlValue::Int(i) => Some(i.to_string()),
                    SqlValue::Float(f) => Some(f.to_string()),
                    SqlValue::Bool(b) => Some(b.to_string()),
                    SqlValue::Null | SqlValue::Bytes(_) => None,
                })
                .collect::<Vec<_>>(),
        ),
    }
}

/// Reads one stored row (locking it for the rest of the batch), in column order. A row whose
/// values hold more than `max_bytes` is refused by the server's own measure before any value
/// is sent, so a plugin cannot make the host read a huge row through the keyed API.
pub async fn fetch_row(
    conn: &mut PgConnection,
    schema: &TableSchema,
    key: &Key,
    max_bytes: u64,
) -> Result<Option<Vec<SqlValue>>, EffectError> {
    let sized: Vec<String> = schema
        .columns
        .iter()
        .filter_map(|col| match col.kind {
            ColumnKind::Int | ColumnKind::Float | ColumnKind::Bool => None,
            ColumnKind::Bytes => Some(format!("coalesce(octet_length(t.{}), 0)::int8", col.quoted)),
            _ => Some(format!(
                "coalesce(octet_length(t.{}::text), 0)::int8",
                col.quoted
            )),
        })
        .collect();
    let size = if sized.is_empty() {
        "0".to_string()
    } else {
        sized.join(" + ")
    };
    let cap_param = schema.key.len() + 1;
    let mut sql = String::from("SELECT s.size::int8");
    for col in &schema.columns {
        let _ = write!(
            sql,
            ", CASE WHEN s.size <= ${cap_param} THEN {} END",
            col.kind.read_expr(&format!("t.{}", col.quoted))
        );
    }
    let _ = write!(
        sql,
        " FROM {} AS t, LATERAL (SELECT {size} AS size) AS s WHERE ",
        schema.qualified
    );
    for (i, c) in schema.key.iter().enumerate() {
        let col = &schema.columns[*c];
        if i > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(
            sql,
            "t.{} = (${}::{})[1]::{}",
            col.quoted,
            i + 1,
            col.kind.bind_array_type(),
            col.sql_type
        );
    }
    sql.push_str(" FOR UPDATE OF t");
    let mut query = sqlx::query(&sql);
    for (i, c) in schema.key.iter().enumerate() {
        query = bind_column(
            query,
            schema.columns[*c].kind,
            std::iter::once(key[i].to_sql()),
        );
    }
    let row = query
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| EffectError::from_sql(&e))?;
    let Some(row) = row else { return Ok(None) };
    let size: i64 = row.try_get(0).map_err(|e| EffectError::from_sql(&e))?;
    if size as u64 > max_bytes {
        return Err(EffectError::limit(format!(
            "the row of '{}' holds {size} bytes, over the limit of {max_bytes} bytes for one read (limit max_query_bytes)",
            schema.name
        )));
    }
    let mut values = Vec::with_capacity(schema.columns.len());
    for (column, col) in schema.columns.iter().enumerate() {
        let i = column + 1;
        let value = match col.kind {
            ColumnKind::Int => row
                .try_get::<Option<i64>, _>(i)
                .map(|v| v.map_or(SqlValue::Null, SqlValue::Int)),
            ColumnKind::Float => row
                .try_get::<Option<f64>, _>(i)
                .map(|v| v.map_or(SqlValue::Null, SqlValue::Float)),
            ColumnKind::Bool => row
                .try_get::<Option<bool>, _>(i)
                .map(|v| v.map_or(SqlValue::Null, SqlValue::Bool)),
            ColumnKind::Bytes => row
                .try_get::<Option<Vec<u8>>, _>(i)
                .map(|v| v.map_or(SqlValue::Null, SqlValue::Bytes)),
            _ => row
                .try_get::<Option<String>, _>(i)
                .map(|v| v.map_or(SqlValue::Null, SqlValue::Text)),
        }
        .map_err(|e| EffectError::from_sql(&e))?;
        values.push(value);
    }
    Ok(Some(values))
}
