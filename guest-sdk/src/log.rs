//! Logging into the host's structured logs.

use crate::bindings::pupsourcing::projection::log::{self as wit, Level};

pub fn debug(message: &str) {
    wit::log(Level::Debug, message);
}

pub fn info(message: &str) {
    wit::log(Level::Info, message);
}

pub fn warn(message: &str) {
    wit::log(Level::Warn, message);
}

pub fn error(message: &str) {
    wit::log(Level::Error, message);
}
