//! Plain SQL inside the batch's transaction, for what the keyed API cannot express. Keyed
//! writes made before are applied first, so statements see them.

use crate::bindings::pupsourcing::projection::read_model as wit;
use crate::{Error, Value};

/// Runs a statement with `$1`.. parameters; returns the number of rows affected.
pub fn execute(sql: &str, params: &[Value]) -> Result<u64, Error> {
    crate::read_model::send().map_err(|e| e.error)?;
    wit::execute(sql, params)
}

/// Runs a query with `$1`.. parameters; returns its rows.
pub fn query(sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, Error> {
    crate::read_model::send().map_err(|e| e.error)?;
    wit::query(sql, params)
}
