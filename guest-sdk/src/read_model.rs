//! Keyed read-model writes, buffered by the host and flushed in bulk at the end of the batch.

use crate::bindings::pupsourcing::projection::read_model::{self as wit, Merge};
use crate::{Error, Value};

pub use wit::ColumnValue;

/// One column of an upsert and how it merges with the stored value.
pub type Assignment = wit::Assignment;

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

/// Inserts the row `key` of `table` or merges `assignments` into it.
pub fn upsert(table: &str, key: &[Value], assignments: &[Assignment]) -> Result<(), Error> {
    wit::upsert(table, key, assignments)
}

/// Deletes the row `key` of `table` (no error when absent).
pub fn delete(table: &str, key: &[Value]) -> Result<(), Error> {
    wit::delete(table, key)
}

/// Reads the row `key` of `table`, including this batch's pending writes.
pub fn get(table: &str, key: &[Value]) -> Result<Option<Vec<ColumnValue>>, Error> {
    wit::get(table, key)
}
