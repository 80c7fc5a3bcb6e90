//! Plain SQL from plugins (`execute` / `query`), inside the batch's transaction.
//!
//! The statement text is not inspected: it runs in the projection's own session, as its own
//! role, so PostgreSQL's privileges decide what it may do (`sink::role`).
//!
//! Parameters are bound with the types PostgreSQL infers for them (the statement is prepared
//! first; sqlx caches it per connection), so `WHERE id = $1` works for a uuid column with a text
//! value and a NULL fits any column, as with literals.

use futures::TryStreamExt;
use sqlx::postgres::{PgArguments, PgRow, PgTypeInfo};
use sqlx::query::Query;
use sqlx::{Column, Either, Executor, PgConnection, Postgres, Row, TypeInfo, ValueRef};

use super::values::PluginValue;
use super::EffectError;

/// Runs a statement; returns the rows affected.
pub async fn execute(
    conn: &mut PgConnection,
    sql: &str,
    params: Vec<PluginValue>,
) -> Result<u64, EffectError> {
    let types = parameter_types(conn, sql, params.len()).await?;
    let query = bind_all(sqlx::query(sql), &types, params)?;
    let done = query
        .execute(&mut *conn)
        .await
        .map_err(|e| EffectError::from_sql(&e))?;
    Ok(done.rows_affected())
}

/// What stopped a query's result.
#[derive(Debug)]
pub enum QueryError {
    /// The statement failed; the session is in a known state.
    Failed(EffectError),
    /// The result went past a limit and was abandoned half-read: the session must not be
    /// used again.
    Abandoned(EffectError),
}

impl From<EffectError> for QueryError {
    fn from(e: EffectError) -> Self {
        QueryError::Failed(e)
    }
}

/// Runs a query; returns at most `max_rows` rows holding at most `max_bytes` bytes. Rows are
/// decoded as they arrive, so an oversized result stops at the limit instead of being read
/// whole first.
pub async fn query(
    conn: &mut PgConnection,
    sql: &str,
    params: Vec<PluginValue>,
    max_rows: usize,
    max_bytes: u64,
) -> Result<Vec<Vec<PluginValue>>, QueryError> {
    let types = parameter_types(conn, sql, params.len()).await?;
    let query = bind_all(sqlx::query(sql), &types, params)?;
    let mut stream = query.fetch(&mut *conn);
    let mut rows = Vec::new();
    let mut bytes = 0u64;
    while let Some(row) = stream
        .try_next()
        .await
        .map_err(|e| QueryError::Failed(EffectError::from_sql(&e)))?
    {
        let values = decode_row(&row)?;
        bytes += values.iter().map(PluginValue::size).sum::<u64>();
        if bytes > max_bytes {
            return Err(QueryError::Abandoned(EffectError::limit(format!(
                "the query's result holds more than {max_bytes} bytes after {} rows (limit max_query_bytes)",
                rows.len() + 1
            ))));
        }
        if rows.len() == max_rows {
            return Err(QueryError::Abandoned(EffectError::limit(format!(
                "the query returned more than {max_rows} rows (limit max_query_rows)"
            ))));
        }
        rows.push(values);
    }
    Ok(rows)
}

/// Longest statement a plugin may send (the driver keeps prepared statements by their text).
pub const MAX_STATEMENT_BYTES: usize = 64 * 1024;

async fn parameter_types(
    conn: &mut PgConnection,
    sql: &str,
    given: usize,
) -> Result<Vec<PgTypeInfo>, EffectError> {
    if sql.len() > MAX_STATEMENT_BYTES {
        return Err(EffectError::limit(format!(
            "a statement of {} bytes; plugins may send at most {MAX_STATEMENT_BYTES} bytes per statement (limit max_statement_bytes)",
            sql.len()
        )));
    }
    let statement = (&mut *conn)
        .prepare(sql)
        .await
        .map_err(|e| EffectError::from_sql(&e))?;
    let types = match sqlx::Statement::parameters(&statement) {
        Some(Either::Left(types)) => types.to_vec(),
        Some(Either::Right(n)) => vec![PgTypeInfo::with_name("TEXT"); n],
        None => Vec::new(),
    };
    if types.len() != given {
        return Err(EffectError::invalid(format!(
            "the statement has {} parameter(s) but {given} value(s) were passed",
            types.len()
        )));
    }
    Ok(types)
}

fn bind_all<'q>(
    mut query: Query<'q, Postgres, PgArguments>,
    types: &[PgTypeInfo],
    params: Vec<PluginValue>,
) -> Result<Query<'q, Postgres, PgArguments>, EffectError> {
    for (i, (ty, value)) in types.iter().zip(params).enumerate() {
        query = bind_one(query, ty.name(), value, i + 1)?;
    }
    Ok(query)
}

fn bind_one<'q>(
    query: Query<'q, Postgres, PgArguments>,
    ty: &str,
    value: PluginValue,
    n: usize,
) -> Result<Query<'q, Postgres, PgArguments>, EffectError> {
    use PluginValue as V;
    let mismatch = |value: &PluginValue| {
        EffectError::invalid(format!(
            "parameter ${n} is {} in this statement and cannot take {value:?}; cast it in SQL (e.g. ${n}::text)",
            ty.to_ascii_lowercase()
        ))
    };
    let int = |value: &PluginValue| -> Result<Option<i64>, EffectError> {
        match value {
            V::Null => Ok(None),
            V::Int(i) => Ok(Some(*i)),
            V::Text(s) => s.trim().parse().map(Some).map_err(|_| mismatch(value)),
            _ => Err(mismatch(value)),
        }
    };
    let text = |value: PluginValue| -> Result<Option<String>, EffectError> {
        match value {
            V::Null => Ok(None),
            V::Text(s) | V::Json(s) => Ok(Some(s)),
            V::Int(i) => Ok(Some(i.to_string())),
            V::Float(f) => Ok(Some(f.to_string())),
            V::Boolean(b) => Ok(Some(b.to_string())),
            other => Err(mismatch(&other)),
        }
    };
    Ok(match ty {
        "INT8" => query.bind(int(&value)?),
        "INT4" => query.bind(int(&value)?.map(i32::try_from).transpose().map_err(|_| mismatch(&value))?),
        "INT2" => query.bind(int(&value)?.map(i16::try_from).transpose().map_err(|_| mismatch(&value))?),
        "FLOAT8" | "FLOAT4" => query.bind(match &value {
            V::Null => None,
            V::Float(f) => Some(*f),
            V::Int(i) => Some(*i as f64),
            other => return Err(mismatch(other)),
        }),
        "BOOL" => query.bind(match &value {
            V::Null => None,
            V::Boolean(b) => Some(*b),
            other => return Err(mismatch(other)),
        }),
        "BYTEA" => query.bind(match value {
            V::Null => None,
            V::Bytes(b) => Some(b),
            other => return Err(mismatch(&other)),
        }),
        "JSON" | "JSONB" => {
            let json = match text(value)? {
                None => None,
                Some(s) => Some(serde_json::from_str::<serde_json::Value>(&s).map_err(|e| {
                    EffectError::invalid(format!("parameter ${n} is not valid JSON: {e}"))
                })?),
            };
            query.bind(json.map(sqlx::types::Json))
        }
        "UUID" => query.bind(match text(value)? {
            None => None,
            Some(s) => Some(s.parse::<uuid::Uuid>().map_err(|e| {
                EffectError::invalid(format!("parameter ${n} is not a uuid: {e}"))
            })?),
        }),
        "TIMESTAMPTZ" => query.bind(match &value {
            V::Null => None,
            V::Int(micros) => chrono::DateTime::from_timestamp_micros(*micros),
            V::Text(s) => Some(
                chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| EffectError::invalid(format!("parameter ${n} is not an RFC 3339 time: {e}")))?
                    .to_utc(),
            ),
            other => return Err(mismatch(other)),
        }),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "UNKNOWN" => query.bind(text(value)?),
        other => {
            return Err(EffectError::invalid(format!(
                "parameter ${n} has type {} which plugins cannot bind directly; write ${n}::text::{} in the SQL",
                other.to_ascii_lowercase(),
                other.to_ascii_lowercase()
            )))
        }
    })
}

fn decode_row(row: &PgRow) -> Result<Vec<PluginValue>, EffectError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(i).map_err(|e| EffectError::from_sql(&e))?;
        if raw.is_null() {
            values.push(PluginValue::Null);
            continue;
        }
        let ty = raw.type_info().name().to_string();
        let get_err = |e: sqlx::Error| EffectError::from_sql(&e);
        let value = match ty.as_str() {
            "INT8" => PluginValue::Int(row.try_get::<i64, _>(i).map_err(get_err)?),
            "INT4" => PluginValue::Int(row.try_get::<i32, _>(i).map_err(get_err)?.into()),
            "INT2" => PluginValue::Int(row.try_get::<i16, _>(i).map_err(get_err)?.into()),
            "FLOAT8" => PluginValue::Float(row.try_get::<f64, _>(i).map_err(get_err)?),
            "FLOAT4" => PluginValue::Float(row.try_get::<f32, _>(i).map_err(get_err)?.into()),
            "BOOL" => PluginValue::Boolean(row.try_get::<bool, _>(i).map_err(get_err)?),
            "BYTEA" => PluginValue::Bytes(row.try_get::<Vec<u8>, _>(i).map_err(get_err)?),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => PluginValue::Text(row.try_get::<String, _>(i).map_err(get_err)?),
            "JSON" | "JSONB" => PluginValue::Json(row.try_get::<serde_json::Value, _>(i).map_err(get_err)?.to_string()),
            "UUID" => PluginValue::Text(row.try_get::<uuid::Uuid, _>(i).map_err(get_err)?.to_string()),
            "TIMESTAMPTZ" => PluginValue::Text(
                row.try_get::<chrono::DateTime<chrono::Utc>, _>(i).map_err(get_err)?.to_rfc3339(),
            ),
            other => {
                return Err(EffectError::invalid(format!(
                    "result column '{}' has type {} which plugins cannot read directly; select it as {}::text",
                    column.name(),
                    other.to_ascii_lowercase(),
                    column.name()
                )))
            }
        };
        values.push(value);
    }
    Ok(values)
}
