//! One line of text that one task writes and others read: what the start is doing now, shown
//! by `/ready` while the host is not ready yet.

use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct StatusLine(Arc<Mutex<String>>);

impl StatusLine {
    pub fn set(&self, text: impl Into<String>) {
        if let Ok(mut line) = self.0.lock() {
            *line = text.into();
        }
    }

    pub fn get(&self) -> String {
        self.0.lock().map(|line| line.clone()).unwrap_or_default()
    }
}
