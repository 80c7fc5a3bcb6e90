//! Keyed read-model writes, buffered by the host and flushed in bulk at the end of the batch.
//!
//! Consecutive upserts of the same table and columns are gathered here and sent to the host in
//! one `upsert-many` call (order is kept: a different shape, a delete, a read or plain SQL sends
//! what is gathered first). An error in a gathered write is reported when it is sent, with the
//! position of the event that made the write.

use std::cell::{Cell, RefCell};

use crate::bindings::pupsourcing::projection::read_model::{
    self as wit, ColumnMerge, Merge, RowWrite,
};
use crate::{Error, HandlerError, Value};

pub use wit::ColumnValue;

/// One column of an upsert and how it merges with the stored value.
pub type Assignment = wit::Assignment;

/// Rows gathered before they are sent in one call.
const MAX_GATHERED: usize = 8192;

#[derive(Default)]
struct Gathered {
    table: String,
    columns: Vec<ColumnMerge>,
    rows: Vec<RowWrite>,
    positions: Vec<Option<i64>>,
}

thread_local! {
    static GATHERED: RefCell<Gathered> = RefCell::new(Gathered::default());
    static CURRENT_POSITION: Cell<Option<i64>> = const { Cell::new(None) };
}

/// The event being handled, so that a deferred write error names it.
pub(crate) fn set_current_position(position: Option<i64>) {
    CURRENT_POSITION.with(|p| p.set(position));
}

fn assign(column: &str, value: impl Into<Value>, merge: Merge) -> Assignment {
    Assignment {
        column: column.into(),
        value: value.into(),
        merge,
    }
}

/// Overwrite the column.
pub fn set(column: &str, value: impl Into<Value>) -> Assignment {
    assign(column, value, Merge::Set)
}

/// Add to the stored value (the value itself on insert).
pub fn add(column: &str, value: impl Into<Value>) -> Assignment {
    assign(column, value, Merge::Add)
}

/// Keep the greatest of stored and new.
pub fn max(column: &str, value: impl Into<Value>) -> Assignment {
    assign(column, value, Merge::Max)
}

/// Keep the least of stored and new.
pub fn min(column: &str, value: impl Into<Value>) -> Assignment {
    assign(column, value, Merge::Min)
}

/// Write only when the row is inserted.
pub fn set_if_absent(column: &str, value: impl Into<Value>) -> Assignment {
    assign(column, value, Merge::SetIfAbsent)
}

fn same_shape(g: &Gathered, table: &str, assignments: &[Assignment]) -> bool {
    g.table == table
        && g.columns.len() == assignments.len()
        && g.columns
            .iter()
            .zip(assignments)
            .all(|(c, a)| c.column == a.column && c.merge == a.merge)
}

/// Inserts the row `key` of `table` or merges `assignments` into it.
///
/// The write is gathered with others of the same shape; see the module docs for when an error
/// is reported.
pub fn upsert(table: &str, key: &[Value], assignments: &[Assignment]) -> Result<(), Error> {
    let needs_send = GATHERED.with(|g| {
        let g = g.borrow();
        !g.rows.is_empty() && !same_shape(&g, table, assignments)
    });
    if needs_send {
        send().map_err(|e| e.error)?;
    }
    let full = GATHERED.with(|g| {
        let mut g = g.borrow_mut();
        if g.rows.is_empty() {
            g.table.clear();
            g.table.push_str(table);
            g.columns = assignments
                .iter()
                .map(|a| ColumnMerge {
                    column: a.column.clone(),
                    merge: a.merge,
                })
                .collect();
        }
        g.rows.push(RowWrite {
            key: key.to_vec(),
            values: assignments.iter().map(|a| a.value.clone()).collect(),
        });
        g.positions.push(CURRENT_POSITION.with(Cell::get));
        g.rows.len() >= MAX_GATHERED
    });
    if full {
        send().map_err(|e| e.error)?;
    }
    Ok(())
}

/// A gathered write that failed, with the position of the event that made it.
pub(crate) struct DeferredError {
    pub error: Error,
    pub position: Option<i64>,
}

impl From<DeferredError> for HandlerError {
    fn from(e: DeferredError) -> Self {
        HandlerError {
            message: format!("{:?}: {}", e.error.kind, e.error.message),
            position: e.position,
        }
    }
}

/// Sends gathered upserts to the host.
pub(crate) fn send() -> Result<(), DeferredError> {
    let gathered = GATHERED.with(|g| std::mem::take(&mut *g.borrow_mut()));
    if gathered.rows.is_empty() {
        return Ok(());
    }
    wit::upsert_many(&gathered.table, &gathered.columns, &gathered.rows).map_err(|e| {
        DeferredError {
            position: gathered.positions.get(e.row as usize).copied().flatten(),
            error: e.error,
        }
    })
}

/// Drops gathered writes (the batch failed).
pub(crate) fn discard() {
    GATHERED.with(|g| *g.borrow_mut() = Gathered::default());
}

/// Deletes the row `key` of `table` (no error when absent).
pub fn delete(table: &str, key: &[Value]) -> Result<(), Error> {
    send().map_err(|e| e.error)?;
    wit::delete(table, key)
}

/// Reads the row `key` of `table`, including this batch's pending writes.
pub fn get(table: &str, key: &[Value]) -> Result<Option<Vec<ColumnValue>>, Error> {
    send().map_err(|e| e.error)?;
    wit::get(table, key)
}
