//! `log`: plugin messages into the host's tracing, tagged with the projection.

use crate::runtime::bindings::log::{Host, Level};
use crate::runtime::state::StoreState;

/// Messages per batch; more are counted and dropped so a chatty plugin cannot flood the logs.
const MAX_MESSAGES_PER_BATCH: usize = 1000;

impl Host for StoreState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.batch.logged += 1;
        if self.batch.logged > MAX_MESSAGES_PER_BATCH {
            if self.batch.logged == MAX_MESSAGES_PER_BATCH + 1 {
                tracing::warn!(projection = %self.projection, "plugin logged more than {MAX_MESSAGES_PER_BATCH} messages in one call; dropping the rest");
            }
            return Ok(());
        }
        // Bounded, and on one line: a newline in a plugin's message cannot forge a host line.
        let message = crate::base::text::plugin_message(&message);
        let projection = &*self.projection;
        match level {
            Level::Trace => tracing::trace!(target: "plugin", projection, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", projection, "{message}"),
            Level::Info => tracing::info!(target: "plugin", projection, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", projection, "{message}"),
            Level::Error => tracing::error!(target: "plugin", projection, "{message}"),
        }
        Ok(())
    }
}
