//! `read-model`: keyed writes into the batch's effect buffer, reads with read-your-writes, and
//! plain SQL, all inside the batch's transaction.
//!
//! Errors the plugin can act on are returned as WIT errors. A lost connection traps instead
//! (the batch is retried as a whole), and any error PostgreSQL raised marks the batch failed,
//! since the transaction is aborted from then on.

use std::sync::Arc;

use sqlx::PgConnection;

use crate::runtime::bindings::read_model::{
    Assignment, ColumnMerge, ColumnValue, Host, Merge as WitMerge, RowError, RowWrite,
};
use crate::runtime::bindings::types::{self, Error as WitError, ErrorKind, Value};
use crate::runtime::state::{BatchContext, StoreState, MAX_QUERY_ROWS};
use crate::sink::buffer::{Key, Merge, Need};
use crate::sink::schema::TableSchema;
use crate::sink::sql::QueryError;
use crate::sink::values::{KeyPart, PluginValue, SqlValue};
use crate::sink::{flush, sql, EffectError, EffectErrorKind};

/// A trap raised because the database connection failed during a plugin call; the pipeline
/// retries the batch.
#[derive(Debug, thiserror::Error)]
#[error("database connection failed during the plugin call: {0}")]
pub struct TransientDatabaseError(pub String);

type ImportResult<T> = wasmtime::Result<Result<T, WitError>>;

impl types::Host for StoreState {}

impl Host for StoreState {
    async fn upsert(
        &mut self,
        table: String,
        key: Vec<Value>,
        assignments: Vec<Assignment>,
    ) -> ImportResult<()> {
        if let Some(earlier) = self.batch.earlier_failure() {
            return Ok(Err(earlier));
        }
        let result = self.batch.upsert(table, key, assignments).await;
        self.batch.settle(result)
    }

    async fn upsert_many(
        &mut self,
        table: String,
        columns: Vec<ColumnMerge>,
        rows: Vec<RowWrite>,
    ) -> wasmtime::Result<Result<(), RowError>> {
        if let Some(earlier) = self.batch.earlier_failure() {
            return Ok(Err(RowError {
                row: 0,
                error: earlier,
            }));
        }
        match self.batch.upsert_many(table, columns, rows).await {
            Ok(()) => Ok(Ok(())),
            Err((row, error)) => Ok(self
                .batch
                .settle::<()>(Err(error))?
                .map_err(|error| RowError { row, error })),
        }
    }

    async fn delete(&mut self, table: String, key: Vec<Value>) -> ImportResult<()> {
        if let Some(earlier) = self.batch.earlier_failure() {
            return Ok(Err(earlier));
        }
        let result = self.batch.delete(table, key).await;
        self.batch.settle(result)
    }

    async fn get(
        &mut self,
        table: String,
        key: Vec<Value>,
    ) -> ImportResult<Option<Vec<ColumnValue>>> {
        if let Some(earlier) = self.batch.earlier_failure() {
            return Ok(Err(earlier));
        }
        let result = self.batch.get(table, key).await;
        self.batch.settle(result)
    }

    async fn execute(&mut self, sql: String, params: Vec<Value>) -> ImportResult<u64> {
        if let Some(earlier) = self.batch.earlier_failure() {
            return Ok(Err(earlier));
        }
        let result = self.batch.execute(sql, params).await;
        self.batch.settle(result)
    }

    async fn query(&mut self, sql: String, params: Vec<Value>) -> ImportResult<Vec<Vec<Value>>> {
        if let Some(earlier) = self.batch.earlier_failure() {
            return Ok(Err(earlier));
        }
        let result = self.batch.query(sql, params).await;
        self.batch.settle(result)
    }
}

impl BatchContext {
    /// After PostgreSQL rejected a statement the transaction is aborted: every later call
    /// reports that first error.
    fn earlier_failure(&self) -> Option<WitError> {
        self.failed.as_ref().map(|failed| WitError {
            message: format!("the batch already failed: {}", failed.message),
            ..to_wit(failed)
        })
    }

    /// Sorts an import's failure into "return to the plugin" or "trap". Errors PostgreSQL
    /// raised (the transaction is aborted) and breached limits stick: the batch fails even if
    /// the plugin carries on.
    fn settle<T>(&mut self, result: Result<T, EffectError>) -> ImportResult<T> {
        let error = match result {
            Ok(value) => return Ok(Ok(value)),
            Err(error) => error,
        };
        if error.database.is_some_and(|db| db.transient) {
            return Err(wasmtime::Error::new(TransientDatabaseError(error.message)));
        }
        let wit = to_wit(&error);
        if error.database.is_some() || error.kind == EffectErrorKind::LimitExceeded {
            self.failed = Some(error);
        }
        Ok(Err(wit))
    }

    fn conn(&mut self) -> Result<&mut PgConnection, EffectError> {
        match self.tx.as_mut() {
            Some(tx) => Ok(tx.conn()),
            None => Err(EffectError::invalid(
                "the read model is only available during setup and handle-batch",
            )),
        }
    }

    async fn schema(&mut self, table: &str) -> Result<Arc<TableSchema>, EffectError> {
        let conn = match self.tx.as_mut() {
            Some(tx) => tx.conn(),
            None => {
                return Err(EffectError::invalid(
                    "the read model is only available during setup and handle-batch",
                ))
            }
        };
        self.schemas.get(conn, table).await
    }

    /// The plugin runs its own SQL: its session is reset after the batch.
    fn mark_dirty(&mut self) {
        if let Some(tx) = self.tx.as_mut() {
            tx.mark_dirty();
        }
    }

    fn key(schema: &TableSchema, key: Vec<Value>) -> Result<Key, EffectError> {
        if key.len() != schema.key.len() {
            let names: Vec<&str> = schema
                .key
                .iter()
                .map(|c| schema.columns[*c].name.as_str())
                .collect();
            return Err(EffectError::invalid(format!(
                "table '{}' has a {}-column key ({}); {} value(s) were given",
                schema.name,
                names.len(),
                names.join(", "),
                key.len()
            )));
        }
        key.into_iter()
            .zip(&schema.key)
            .map(|(value, column)| {
                let col = &schema.columns[*column];
                KeyPart::for_column(from_wit(value), col.kind, &col.name)
            })
            .collect()
    }

    async fn upsert(
        &mut self,
        table: String,
        key: Vec<Value>,
        assignments: Vec<Assignment>,
    ) -> Result<(), EffectError> {
        let schema = self.schema(&table).await?;
        let key = Self::key(&schema, key)?;
        let writes = assignments
            .into_iter()
            .map(|a| {
                let (column, kind) = Self::column(&schema, &a.column)?;
                let value = SqlValue::for_column(from_wit(a.value), kind, &a.column)?;
                Ok((column, merge(a.merge), value))
            })
            .collect::<Result<Vec<_>, EffectError>>()?;
        self.upsert_row(&schema, &key, &writes).await
    }

    /// Rows of one shape; the error names the row that failed (earlier rows stay applied).
    async fn upsert_many(
        &mut self,
        table: String,
        columns: Vec<ColumnMerge>,
        rows: Vec<RowWrite>,
    ) -> Result<(), (u32, EffectError)> {
        let schema = self.schema(&table).await.map_err(|e| (0, e))?;
        let shape = columns
            .iter()
            .map(|c| {
                Self::column(&schema, &c.column).map(|(index, kind)| (index, kind, merge(c.merge)))
            })
            .collect::<Result<Vec<_>, EffectError>>()
            .map_err(|e| (0, e))?;
        let mut writes: Vec<(usize, Merge, SqlValue)> = Vec::with_capacity(shape.len());
        for (i, row) in rows.into_iter().enumerate() {
            let at = |e| (i as u32, e);
            if row.values.len() != shape.len() {
                return Err(at(EffectError::invalid(format!(
                    "row has {} values for {} columns",
                    row.values.len(),
                    shape.len()
                ))));
            }
            let key = Self::key(&schema, row.key).map_err(at)?;
            writes.clear();
            for ((column, kind, merge), value) in shape.iter().zip(row.values) {
                let name = &schema.columns[*column].name;
                writes.push((
                    *column,
                    *merge,
                    SqlValue::for_column(from_wit(value), *kind, name).map_err(at)?,
                ));
            }
            self.upsert_row(&schema, &key, &writes).await.map_err(at)?;
        }
        Ok(())
    }

    fn column(
        schema: &TableSchema,
        name: &str,
    ) -> Result<(usize, crate::sink::schema::ColumnKind), EffectError> {
        let index = schema.column_index(name)?;
        Ok((index, schema.columns[index].kind))
    }

    async fn upsert_row(
        &mut self,
        schema: &Arc<TableSchema>,
        key: &Key,
        writes: &[(usize, Merge, SqlValue)],
    ) -> Result<(), EffectError> {
        if self.buffer.upsert(schema, key, writes)? == Need::Materialize {
            self.materialize(schema, key).await?;
            self.buffer.upsert(schema, key, writes)?;
        }
        Ok(())
    }

    async fn delete(&mut self, table: String, key: Vec<Value>) -> Result<(), EffectError> {
        let schema = self.schema(&table).await?;
        let key = Self::key(&schema, key)?;
        self.buffer.delete(&schema, &key)
    }

    async fn get(
        &mut self,
        table: String,
        key: Vec<Value>,
    ) -> Result<Option<Vec<ColumnValue>>, EffectError> {
        let schema = self.schema(&table).await?;
        let key = Self::key(&schema, key)?;
        let values = match self.buffer.get(&schema, &key) {
            Ok(values) => values,
            Err(Need::Fetch) => {
                let max = self.memory.query_bytes;
                let stored = flush::fetch_row(self.conn()?, &schema, &key, max).await?;
                self.buffer.provide(&schema, &key, stored.clone())?;
                stored
            }
            Err(_) => self.materialize(&schema, &key).await?,
        };
        Ok(values.map(|values| {
            values
                .into_iter()
                .zip(&schema.columns)
                .map(|(value, col)| ColumnValue {
                    column: col.name.clone(),
                    value: to_wit_value(value.into_plugin(col.kind)),
                })
                .collect()
        }))
    }

    /// Flushes one row's pending writes, then reads the row back so that later operations on it
    /// work on known values.
    async fn materialize(
        &mut self,
        schema: &Arc<TableSchema>,
        key: &Key,
    ) -> Result<Option<Vec<SqlValue>>, EffectError> {
        if let Some(row) = self.buffer.take_row(schema, key) {
            flush::flush_rows(self.conn()?, schema, &[(key.clone(), row)]).await?;
        }
        let max = self.memory.query_bytes;
        let stored = flush::fetch_row(self.conn()?, schema, key, max).await?;
        self.buffer.provide(schema, key, stored.clone())?;
        Ok(stored)
    }

    /// Writes all buffered rows (before plain SQL, and at the end of the batch).
    pub async fn flush(&mut self) -> Result<(), EffectError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let tables = self.buffer.take();
        flush::flush_all(self.conn()?, tables).await
    }

    async fn execute(&mut self, statement: String, params: Vec<Value>) -> Result<u64, EffectError> {
        self.flush().await?;
        self.mark_dirty();
        // The statement may change a table's shape.
        self.schemas.clear();
        let params = params.into_iter().map(from_wit).collect();
        sql::execute(self.conn()?, &statement, params).await
    }

    async fn query(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> Result<Vec<Vec<Value>>, EffectError> {
        self.flush().await?;
        self.mark_dirty();
        // The statement may change a table's shape (a data-modifying CTE may hold DDL's effects).
        self.schemas.clear();
        let params = params.into_iter().map(from_wit).collect();
        let max_bytes = self.memory.query_bytes;
        let rows =
            match sql::query(self.conn()?, &statement, params, MAX_QUERY_ROWS, max_bytes).await {
                Ok(rows) => rows,
                Err(QueryError::Failed(e)) => return Err(e),
                Err(QueryError::Abandoned(e)) => {
                    // The rest of the result is still on its way: the session is ended, not read.
                    if let Some(tx) = self.tx.as_mut() {
                        tx.poison();
                    }
                    return Err(e);
                }
            };
        Ok(rows
            .into_iter()
            .map(|row| row.into_iter().map(to_wit_value).collect())
            .collect())
    }
}

fn merge(m: WitMerge) -> Merge {
    match m {
        WitMerge::Set => Merge::Set,
        WitMerge::Add => Merge::Add,
        WitMerge::Max => Merge::Max,
        WitMerge::Min => Merge::Min,
        WitMerge::SetIfAbsent => Merge::SetIfAbsent,
    }
}

fn from_wit(value: Value) -> PluginValue {
    match value {
        Value::Null => PluginValue::Null,
        Value::Int(v) => PluginValue::Int(v),
        Value::Float(v) => PluginValue::Float(v),
        Value::Text(v) => PluginValue::Text(v),
        Value::Boolean(v) => PluginValue::Boolean(v),
        Value::Json(v) => PluginValue::Json(v),
        Value::Bytes(v) => PluginValue::Bytes(v),
    }
}

fn to_wit_value(value: PluginValue) -> Value {
    match value {
        PluginValue::Null => Value::Null,
        PluginValue::Int(v) => Value::Int(v),
        PluginValue::Float(v) => Value::Float(v),
        PluginValue::Text(v) => Value::Text(v),
        PluginValue::Boolean(v) => Value::Boolean(v),
        PluginValue::Json(v) => Value::Json(v),
        PluginValue::Bytes(v) => Value::Bytes(v),
    }
}

fn to_wit(error: &EffectError) -> WitError {
    WitError {
        kind: match error.kind {
            EffectErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
            EffectErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            EffectErrorKind::Conflict => ErrorKind::Conflict,
            EffectErrorKind::LimitExceeded => ErrorKind::LimitExceeded,
            EffectErrorKind::Database => ErrorKind::Database,
        },
        message: error.message.clone(),
    }
}
