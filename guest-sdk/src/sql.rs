//! Plain SQL inside the batch's transaction, for what the keyed API cannot express.

use crate::bindings::pupsourcing::projection::read_model as wit;
use crate::{Error, Value};

/// Runs a statement with `$1`.. parameters; returns the number of rows affected.
pub fn execute(sql: &str, params: &[Value]) -> Result<u64, Error> {
    wit::execute(sql, params)
}

/// Runs a query with `$1`.. parameters; returns its rows.
pub fn query(sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, Error> {
    wit::query(sql, params)
}
