//! The per-batch buffer of keyed writes.
//!
//! Writes to the same row coalesce in memory (`add` + `add` = one `add`, `set` + `add` = a new
//! `set` ...), so a batch costs one bulk statement per table however many events touched a row.
//! Where a combination cannot be expressed as one statement (e.g. `max` after `add` on a row
//! whose stored value is unknown), or a read needs the row's full current state, the caller
//! *materializes* the row: flushes it alone and reads it back. That keeps every result equal to
//! applying the writes one by one, which is what the tests check.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::sync::Arc;

use super::schema::{ColumnKind, TableSchema};
use super::values::{KeyPart, SqlValue};
use super::EffectError;

/// How an upsert combines a new value with the stored one (the WIT `merge` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Merge {
    Set,
    Add,
    Max,
    Min,
    SetIfAbsent,
}

/// A column write waiting for the flush.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub merge: Merge,
    pub value: SqlValue,
}

/// What the batch knows about a row's stored state.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// Not read: pending writes are relative to whatever is stored.
    Unknown,
    /// The row does not exist (read as absent, or deleted in this batch).
    Absent,
    /// Inserted in this batch over an absent row; columns not written hold their defaults,
    /// which the host does not know.
    Inserted,
    /// The full current row (stored row with this batch's writes applied).
    Present(Vec<SqlValue>),
}

#[derive(Debug, Clone)]
pub struct RowState {
    /// Delete the stored row before writing `ops`.
    pub delete_first: bool,
    pub known: Known,
    /// Per column; `None` = not written in this batch.
    pub ops: Vec<Option<Pending>>,
    /// An upsert reached this row in this batch, so the row exists now whatever was stored.
    pub upserted: bool,
}

impl RowState {
    fn new(columns: usize) -> Self {
        RowState {
            delete_first: false,
            known: Known::Unknown,
            ops: vec![None; columns],
            upserted: false,
        }
    }

    pub fn has_writes(&self) -> bool {
        self.ops.iter().any(Option::is_some)
    }

    /// Host memory held for this row and its key (for the byte limit).
    fn size(&self, key: &Key) -> u64 {
        let known = match &self.known {
            Known::Present(values) => values.iter().map(SqlValue::size).sum(),
            _ => 0,
        };
        ROW_OVERHEAD
            + key.iter().map(KeyPart::size).sum::<u64>()
            + self
                .ops
                .iter()
                .map(|op| {
                    std::mem::size_of::<Option<Pending>>() as u64
                        + op.as_ref().map_or(0, |p| p.value.size())
                })
                .sum::<u64>()
            + known
    }
}

/// Bookkeeping per buffered row beyond its values (hash table entry, row state).
const ROW_OVERHEAD: u64 = 96;

/// The outcome of a buffered operation that may need the database first.
#[derive(Debug, PartialEq)]
pub enum Need {
    Done,
    /// Read the stored row (no pending writes to flush) and call [`EffectBuffer::provide`].
    Fetch,
    /// Flush this row alone, read it back, call [`EffectBuffer::provide`], then retry.
    Materialize,
}

pub type Key = Vec<KeyPart>;

pub struct TableBuffer {
    pub schema: Arc<TableSchema>,
    pub rows: HashMap<Key, RowState, RandomState>,
}

/// All keyed writes of one batch, bounded in rows and in bytes of host memory.
pub struct EffectBuffer {
    tables: Vec<TableBuffer>,
    by_table: HashMap<String, usize, RandomState>,
    rows: usize,
    max_rows: usize,
    bytes: u64,
    max_bytes: u64,
}

impl EffectBuffer {
    pub fn new(max_rows: usize, max_bytes: u64) -> Self {
        EffectBuffer {
            tables: Vec::new(),
            by_table: HashMap::default(),
            rows: 0,
            max_rows,
            bytes: 0,
            max_bytes,
        }
    }

    /// Changes the byte limit (a projection's own setting).
    pub fn set_max_bytes(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
    }

    /// Host memory the buffered rows hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Runs `change` on a row and keeps the byte count; refuses once the buffer holds more than
    /// its limit (the change stays: the batch fails as a whole).
    fn account<T>(
        &mut self,
        schema: &Arc<TableSchema>,
        key: &Key,
        change: impl FnOnce(&mut RowState) -> Result<T, EffectError>,
    ) -> Result<T, EffectError> {
        let max_bytes = self.max_bytes;
        let row = self.row_mut(schema, key)?;
        let before = row.size(key);
        let result = change(row);
        let after = row.size(key);
        self.bytes = (self.bytes + after).saturating_sub(before);
        if self.bytes > max_bytes {
            return Err(EffectError::limit(format!(
                "the batch's buffered writes hold {} bytes, over the limit of {max_bytes} bytes (limit max_write_bytes)",
                self.bytes
            )));
        }
        result
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rows with pending writes or deletes.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Hands every buffered table to the flush and leaves the buffer empty.
    pub fn take(&mut self) -> Vec<TableBuffer> {
        self.by_table.clear();
        self.rows = 0;
        self.bytes = 0;
        std::mem::take(&mut self.tables)
    }

    pub fn clear(&mut self) {
        self.take();
    }

    /// Removes one row, for flushing it alone.
    pub fn take_row(&mut self, schema: &Arc<TableSchema>, key: &Key) -> Option<RowState> {
        let index = *self.by_table.get(&schema.qualified)?;
        let row = self.tables[index].rows.remove(key)?;
        self.rows -= 1;
        self.bytes = self.bytes.saturating_sub(row.size(key));
        Some(row)
    }

    fn row_mut(
        &mut self,
        schema: &Arc<TableSchema>,
        key: &Key,
    ) -> Result<&mut RowState, EffectError> {
        let index = match self.by_table.get(&schema.qualified) {
            Some(i) => *i,
            None => {
                self.tables.push(TableBuffer {
                    schema: schema.clone(),
                    rows: HashMap::default(),
                });
                self.by_table
                    .insert(schema.qualified.clone(), self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        let table = &mut self.tables[index];
        if !table.rows.contains_key(key) {
            if self.rows >= self.max_rows {
                return Err(EffectError::limit(format!(
                    "a batch may write at most {} distinct rows (limit max_pending_rows)",
                    self.max_rows
                )));
            }
            self.rows += 1;
            return Ok(table
                .rows
                .entry(key.clone())
                .or_insert_with(|| RowState::new(schema.columns.len())));
        }
        Ok(table.rows.get_mut(key).expect("checked above"))
    }

    fn row(&self, schema: &TableSchema, key: &Key) -> Option<&RowState> {
        let index = *self.by_table.get(&schema.qualified)?;
        self.tables[index].rows.get(key)
    }

    /// Buffers an upsert. All-or-nothing: on `Materialize` nothing changed.
    pub fn upsert(
        &mut self,
        schema: &Arc<TableSchema>,
        key: &Key,
        assignments: &[(usize, Merge, SqlValue)],
    ) -> Result<Need, EffectError> {
        for (column, merge, value) in assignments {
            validate_assignment(schema, *column, *merge, value)?;
        }
        self.account(schema, key, |row| Self::upsert_row(row, assignments))
    }

    fn upsert_row(
        row: &mut RowState,
        assignments: &[(usize, Merge, SqlValue)],
    ) -> Result<Need, EffectError> {
        // Plan first, so that a row is never left half-updated.
        let mut planned: Vec<(usize, Option<Pending>)> = Vec::with_capacity(assignments.len());
        for (column, merge, value) in assignments {
            let current = planned
                .iter()
                .rev()
                .find(|(c, _)| c == column)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| row.ops[*column].clone());
            let next = match &row.known {
                Known::Present(values) => {
                    let stored = values[*column].clone();
                    Some(Pending {
                        merge: Merge::Set,
                        value: apply(Some(&stored), *merge, value)?,
                    })
                }
                Known::Absent => Some(Pending {
                    merge: Merge::Set,
                    value: apply(None, *merge, value)?,
                }),
                Known::Inserted => match (current, merge) {
                    (_, Merge::Set) => Some(Pending {
                        merge: Merge::Set,
                        value: value.clone(),
                    }),
                    (current, Merge::SetIfAbsent) => current,
                    (
                        Some(Pending {
                            merge: Merge::Set,
                            value: v,
                        }),
                        m,
                    ) => Some(Pending {
                        merge: Merge::Set,
                        value: apply(Some(&v), *m, value)?,
                    }),
                    // The column holds its default, which only the database knows.
                    _ => return Ok(Need::Materialize),
                },
                Known::Unknown => match combine(current, *merge, value, row.upserted)? {
                    Some(next) => next,
                    None => return Ok(Need::Materialize),
                },
            };
            planned.push((*column, next));
        }
        for (column, next) in planned {
            row.ops[column] = next;
        }
        if let Known::Present(values) = &mut row.known {
            for (column, op) in row.ops.iter().enumerate() {
                if let Some(Pending { value, .. }) = op {
                    values[column] = value.clone();
                }
            }
        } else if row.known == Known::Absent {
            row.known = Known::Inserted;
        }
        row.upserted = true;
        Ok(Need::Done)
    }

    /// Buffers a delete.
    pub fn delete(&mut self, schema: &Arc<TableSchema>, key: &Key) -> Result<(), EffectError> {
        self.account(schema, key, |row| {
            let may_be_stored = match row.known {
                Known::Unknown | Known::Present(_) => true,
                Known::Absent | Known::Inserted => false,
            };
            row.delete_first |= may_be_stored;
            row.known = Known::Absent;
            row.ops.iter_mut().for_each(|op| *op = None);
            row.upserted = false;
            Ok(())
        })
    }

    /// The row as this batch sees it, if that is known without the database.
    pub fn get(&self, schema: &TableSchema, key: &Key) -> Result<Option<Vec<SqlValue>>, Need> {
        match self.row(schema, key) {
            None => Err(Need::Fetch),
            Some(row) => match &row.known {
                Known::Present(values) => Ok(Some(values.clone())),
                Known::Absent => Ok(None),
                Known::Inserted => Err(Need::Materialize),
                Known::Unknown if !row.has_writes() && !row.delete_first => Err(Need::Fetch),
                Known::Unknown => Err(Need::Materialize),
            },
        }
    }

    /// Records the stored row, read after any pending writes to it were flushed.
    pub fn provide(
        &mut self,
        schema: &Arc<TableSchema>,
        key: &Key,
        stored: Option<Vec<SqlValue>>,
    ) -> Result<(), EffectError> {
        self.account(schema, key, |row| {
            debug_assert!(
                !row.has_writes() && !row.delete_first,
                "flush the row before providing it"
            );
            row.known = match stored {
                Some(values) => Known::Present(values),
                None => Known::Absent,
            };
            row.upserted = false;
            Ok(())
        })
    }
}

fn validate_assignment(
    schema: &TableSchema,
    column: usize,
    merge: Merge,
    value: &SqlValue,
) -> Result<(), EffectError> {
    let col = &schema.columns[column];
    if schema.is_key(column) {
        return Err(EffectError::invalid(format!(
            "column '{}' is part of the primary key of '{}'; pass it in the key",
            col.name, schema.name
        )));
    }
    if matches!(merge, Merge::Add | Merge::Max | Merge::Min) {
        if !matches!(col.kind, ColumnKind::Int | ColumnKind::Float) {
            return Err(EffectError::invalid(format!(
                "merge {merge:?} on column '{}' needs an integer or float column, not {}; use execute for other types",
                col.name, col.sql_type
            )));
        }
        if *value == SqlValue::Null {
            return Err(EffectError::invalid(format!(
                "merge {merge:?} on column '{}' needs a value, not null",
                col.name
            )));
        }
    }
    Ok(())
}

/// Combines a new write with a pending one on a row whose stored state is unknown.
/// `Ok(None)`: not expressible without knowing the stored value.
fn combine(
    current: Option<Pending>,
    merge: Merge,
    value: &SqlValue,
    row_upserted: bool,
) -> Result<Option<Option<Pending>>, EffectError> {
    let pending = |merge, value| Ok(Some(Some(Pending { merge, value })));
    match (current, merge) {
        (_, Merge::Set) => pending(Merge::Set, value.clone()),
        // The row exists once any upsert reached it, so a later set-if-absent does nothing.
        (current, Merge::SetIfAbsent) if row_upserted => Ok(Some(current)),
        (Some(p), Merge::SetIfAbsent) => Ok(Some(Some(p))),
        (None, m) => pending(m, value.clone()),
        (
            Some(Pending {
                merge: Merge::Set,
                value: v,
            }),
            m,
        ) => pending(Merge::Set, apply(Some(&v), m, value)?),
        (
            Some(Pending {
                merge: Merge::Add,
                value: a,
            }),
            Merge::Add,
        ) => pending(Merge::Add, arith(&a, value, Merge::Add)?),
        (
            Some(Pending {
                merge: Merge::Max,
                value: a,
            }),
            Merge::Max,
        ) => pending(Merge::Max, arith(&a, value, Merge::Max)?),
        (
            Some(Pending {
                merge: Merge::Min,
                value: a,
            }),
            Merge::Min,
        ) => pending(Merge::Min, arith(&a, value, Merge::Min)?),
        _ => Ok(None),
    }
}

/// Applies one write to a known stored value (`None`: the row is absent), as PostgreSQL would.
fn apply(
    stored: Option<&SqlValue>,
    merge: Merge,
    value: &SqlValue,
) -> Result<SqlValue, EffectError> {
    match (stored, merge) {
        (_, Merge::Set) | (None, _) => Ok(value.clone()),
        (Some(stored), Merge::SetIfAbsent) => Ok(stored.clone()),
        // NULL + x is NULL; GREATEST/LEAST ignore NULL.
        (Some(SqlValue::Null), Merge::Add) => Ok(SqlValue::Null),
        (Some(SqlValue::Null), Merge::Max | Merge::Min) => Ok(value.clone()),
        (Some(stored), m) => arith(stored, value, m),
    }
}

fn arith(a: &SqlValue, b: &SqlValue, merge: Merge) -> Result<SqlValue, EffectError> {
    let overflow = || EffectError::invalid("integer overflow in add merge");
    Ok(match (a, b, merge) {
        (SqlValue::Int(a), SqlValue::Int(b), Merge::Add) => {
            SqlValue::Int(a.checked_add(*b).ok_or_else(overflow)?)
        }
        (SqlValue::Int(a), SqlValue::Int(b), Merge::Max) => SqlValue::Int(*a.max(b)),
        (SqlValue::Int(a), SqlValue::Int(b), Merge::Min) => SqlValue::Int(*a.min(b)),
        (a, b, m) => {
            let (Some(x), Some(y)) = (as_f64(a), as_f64(b)) else {
                return Err(EffectError::invalid(format!(
                    "cannot merge {a:?} and {b:?} with {m:?}"
                )));
            };
            SqlValue::Float(match m {
                Merge::Add => x + y,
                Merge::Max => x.max(y),
                _ => x.min(y),
            })
        }
    })
}

fn as_f64(v: &SqlValue) -> Option<f64> {
    match v {
        SqlValue::Int(i) => Some(*i as f64),
        SqlValue::Float(f) => Some(*f),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::schema::test_schema;

    fn key(id: &str) -> Key {
        vec![KeyPart::Text(id.into())]
    }

    // Columns of the test schema: 0 id (key, text), 1 balance (int), 2 count (int), 3 best (int),
    // 4 first_seen (int), 5 note (text).
    fn upsert(
        buf: &mut EffectBuffer,
        schema: &Arc<TableSchema>,
        id: &str,
        writes: &[(usize, Merge, i64)],
    ) -> Need {
        let assignments: Vec<_> = writes
            .iter()
            .map(|(c, m, v)| (*c, *m, SqlValue::Int(*v)))
            .collect();
        buf.upsert(schema, &key(id), &assignments).unwrap()
    }

    fn ops(buf: &EffectBuffer, schema: &TableSchema, id: &str) -> Vec<Option<Pending>> {
        buf.row(schema, &key(id)).unwrap().ops.clone()
    }

    #[test]
    fn adds_to_one_row_coalesce_into_one_write() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        for amount in [5, -2, 10] {
            assert_eq!(
                upsert(
                    &mut buf,
                    &schema,
                    "a",
                    &[(1, Merge::Add, amount), (2, Merge::Add, 1)]
                ),
                Need::Done
            );
        }
        let ops = ops(&buf, &schema, "a");
        assert_eq!(
            ops[1],
            Some(Pending {
                merge: Merge::Add,
                value: SqlValue::Int(13)
            })
        );
        assert_eq!(
            ops[2],
            Some(Pending {
                merge: Merge::Add,
                value: SqlValue::Int(3)
            })
        );
        assert_eq!(buf.len(), 1);
    }

    #[test]
    fn set_then_add_becomes_a_set_and_max_keeps_the_greatest() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        upsert(
            &mut buf,
            &schema,
            "a",
            &[(1, Merge::Set, 7), (3, Merge::Max, 4)],
        );
        upsert(
            &mut buf,
            &schema,
            "a",
            &[(1, Merge::Add, 3), (3, Merge::Max, 9)],
        );
        upsert(&mut buf, &schema, "a", &[(3, Merge::Max, 2)]);
        let ops = ops(&buf, &schema, "a");
        assert_eq!(
            ops[1],
            Some(Pending {
                merge: Merge::Set,
                value: SqlValue::Int(10)
            })
        );
        assert_eq!(
            ops[3],
            Some(Pending {
                merge: Merge::Max,
                value: SqlValue::Int(9)
            })
        );
    }

    #[test]
    fn an_inexpressible_combination_asks_for_materialization_and_changes_nothing() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        upsert(&mut buf, &schema, "a", &[(1, Merge::Add, 5)]);
        let need = upsert(
            &mut buf,
            &schema,
            "a",
            &[(2, Merge::Add, 1), (1, Merge::Max, 100)],
        );
        assert_eq!(need, Need::Materialize);
        let ops = ops(&buf, &schema, "a");
        assert_eq!(
            ops[1],
            Some(Pending {
                merge: Merge::Add,
                value: SqlValue::Int(5)
            })
        );
        assert_eq!(
            ops[2], None,
            "the first assignment of the refused upsert must not stick"
        );
    }

    #[test]
    fn set_if_absent_after_an_upsert_of_the_same_row_does_nothing() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        upsert(
            &mut buf,
            &schema,
            "a",
            &[(2, Merge::Add, 1), (4, Merge::SetIfAbsent, 10)],
        );
        upsert(
            &mut buf,
            &schema,
            "a",
            &[(2, Merge::Add, 1), (4, Merge::SetIfAbsent, 20)],
        );
        upsert(&mut buf, &schema, "b", &[(2, Merge::Add, 1)]);
        upsert(&mut buf, &schema, "b", &[(4, Merge::SetIfAbsent, 30)]);
        assert_eq!(
            ops(&buf, &schema, "a")[4],
            Some(Pending {
                merge: Merge::SetIfAbsent,
                value: SqlValue::Int(10)
            })
        );
        assert_eq!(
            ops(&buf, &schema, "b")[4],
            None,
            "row b existed after its first upsert"
        );
    }

    #[test]
    fn delete_then_upsert_reinserts_from_scratch() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        upsert(&mut buf, &schema, "a", &[(1, Merge::Add, 5)]);
        buf.delete(&schema, &key("a")).unwrap();
        assert_eq!(buf.get(&schema, &key("a")), Ok(None));
        upsert(
            &mut buf,
            &schema,
            "a",
            &[(1, Merge::Add, 3), (3, Merge::Max, 2)],
        );
        let row = buf.row(&schema, &key("a")).unwrap();
        assert!(
            row.delete_first,
            "the stored row must be deleted before the insert"
        );
        assert_eq!(row.known, Known::Inserted);
        assert_eq!(
            row.ops[1],
            Some(Pending {
                merge: Merge::Set,
                value: SqlValue::Int(3)
            })
        );
        assert_eq!(
            row.ops[3],
            Some(Pending {
                merge: Merge::Set,
                value: SqlValue::Int(2)
            })
        );
        assert_eq!(
            buf.get(&schema, &key("a")),
            Err(Need::Materialize),
            "defaults are unknown"
        );
    }

    #[test]
    fn reads_see_the_batch_s_own_writes_once_the_row_is_known() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        assert_eq!(buf.get(&schema, &key("a")), Err(Need::Fetch));
        let stored = vec![
            SqlValue::Text("a".into()),
            SqlValue::Int(100),
            SqlValue::Int(4),
            SqlValue::Null,
            SqlValue::Int(1),
            SqlValue::Null,
        ];
        buf.provide(&schema, &key("a"), Some(stored)).unwrap();
        upsert(
            &mut buf,
            &schema,
            "a",
            &[
                (1, Merge::Add, -30),
                (2, Merge::Add, 1),
                (3, Merge::Max, 8),
                (4, Merge::SetIfAbsent, 9),
            ],
        );
        let row = buf.get(&schema, &key("a")).unwrap().unwrap();
        assert_eq!(row[1], SqlValue::Int(70));
        assert_eq!(row[2], SqlValue::Int(5));
        assert_eq!(row[3], SqlValue::Int(8), "GREATEST ignores a stored NULL");
        assert_eq!(
            row[4],
            SqlValue::Int(1),
            "set-if-absent keeps the stored value"
        );
    }

    #[test]
    fn key_columns_and_non_numeric_adds_are_refused() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        let err = buf
            .upsert(
                &schema,
                &key("a"),
                &[(0, Merge::Set, SqlValue::Text("b".into()))],
            )
            .unwrap_err();
        assert!(err.message.contains("primary key"), "{}", err.message);
        let err = buf
            .upsert(
                &schema,
                &key("a"),
                &[(5, Merge::Add, SqlValue::Text("x".into()))],
            )
            .unwrap_err();
        assert!(err.message.contains("integer or float"), "{}", err.message);
    }

    #[test]
    fn the_row_limit_is_reported_with_its_name() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(2, u64::MAX);
        upsert(&mut buf, &schema, "a", &[(2, Merge::Add, 1)]);
        upsert(&mut buf, &schema, "b", &[(2, Merge::Add, 1)]);
        let err = buf
            .upsert(&schema, &key("c"), &[(2, Merge::Add, SqlValue::Int(1))])
            .unwrap_err();
        assert!(err.message.contains("max_pending_rows"), "{}", err.message);
    }

    #[test]
    fn the_byte_limit_counts_what_the_buffer_holds_not_how_often_a_row_was_written() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, 10_000);
        for _ in 0..1_000 {
            upsert(
                &mut buf,
                &schema,
                "a",
                &[(1, Merge::Add, 1), (2, Merge::Add, 1)],
            );
        }
        let one_row = buf.bytes();
        assert!(one_row > 0 && one_row < 1_000, "{one_row}");
        let big = SqlValue::Text("x".repeat(20_000));
        let err = buf
            .upsert(&schema, &key("b"), &[(5, Merge::Set, big)])
            .unwrap_err();
        assert!(err.message.contains("max_write_bytes"), "{}", err.message);
        assert!(err.message.contains("10000 bytes"), "{}", err.message);
    }

    #[test]
    fn flushing_a_row_alone_gives_its_bytes_back() {
        let schema = test_schema();
        let mut buf = EffectBuffer::new(100, u64::MAX);
        buf.upsert(
            &schema,
            &key("a"),
            &[(5, Merge::Set, SqlValue::Text("x".repeat(5_000)))],
        )
        .unwrap();
        assert!(buf.bytes() > 5_000);
        buf.take_row(&schema, &key("a")).unwrap();
        assert_eq!(buf.bytes(), 0);
    }
}
