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

/// Reads one stored row (locking it for the rest of the batch), in column order.
pub async fn fetch_row(
    conn: &mut PgConnection,
    schema: &TableSchema,
    key: &Key,
) -> Result<Option<Vec<SqlValue>>, EffectError> {
    let mut sql = String::from("SELECT ");
    for (i, col) in schema.columns.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&col.kind.read_expr(&col.quoted));
    }
    let _ = write!(sql, " FROM {} WHERE ", schema.qualified);
    for (i, c) in schema.key.iter().enumerate() {
        let col = &schema.columns[*c];
        if i > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(
            sql,
            "{} = (${}::{})[1]::{}",
            col.quoted,
            i + 1,
            col.kind.bind_array_type(),
            col.sql_type
        );
    }
    sql.push_str(" FOR UPDATE");
    let mut query = sqlx::query(&sql);
    for (i, c) in schema.key.iter().enumerate() {
        query = bind_column(
            query,
            schema.columns[*c].kind,
            std::iter::once(key[i].to_sql()),
        );
    }
    let row = query
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| EffectError::from_sql(&e))?;
    let Some(row) = row else { return Ok(None) };
    let mut values = Vec::with_capacity(schema.columns.len());
    for (i, col) in schema.columns.iter().enumerate() {
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
