//! Per-projection settings: what to do when a plugin keeps failing on an event, and the
//! sandbox limits. Defaults come from the global flags; `--projection NAME:key=value,...`
//! overrides them for one projection.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::base::units::parse_bytes;

/// What happens once a plugin failed on one event `max_retries` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// The event's partition halts at it until an operator resumes the projection. The
    /// default: a read model that silently lacks some events is worse than a stopped one.
    Stop,
    /// The event is parked with every later event of its aggregate; the rest keeps flowing.
    DeadLetter,
}

impl std::str::FromStr for OnFailure {
    type Err = String;

    /// The names `ON_FAILURE` accepts, in any case.
    fn from_str(value: &str) -> Result<OnFailure, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "stop" => Ok(OnFailure::Stop),
            "dead-letter" => Ok(OnFailure::DeadLetter),
            _ => Err(format!(
                "on_failure must be stop or dead-letter, not '{value}'"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionSettings {
    pub on_failure: OnFailure,
    /// Retries of a single failing event before `on_failure` applies.
    pub max_retries: u32,
    pub memory_limit: u64,
    pub call_timeout: Duration,
    /// Largest sum of payload and metadata bytes handed to one call.
    pub max_batch_bytes: u64,
    /// Host memory the keyed writes of one batch may hold.
    pub max_write_bytes: u64,
    /// Host memory one `query` result (or one `get` row) may hold.
    pub max_query_bytes: u64,
}

/// Defaults plus per-projection overrides.
#[derive(Debug, Clone)]
pub struct Settings {
    pub defaults: ProjectionSettings,
    pub overrides: BTreeMap<String, ProjectionSettings>,
}

impl Settings {
    pub fn for_projection(&self, name: &str) -> ProjectionSettings {
        self.overrides
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.defaults.clone())
    }

    /// Parses `NAME:key=value,key=value` (keys: on_failure, max_retries, memory, timeout,
    /// max_batch_bytes).
    pub fn add_override(&mut self, spec: &str) -> Result<(), String> {
        let (name, pairs) = spec.split_once(':').ok_or_else(|| {
            format!("'{spec}' should look like 'name:on_failure=dead-letter,memory=64MiB'")
        })?;
        crate::runtime::loader::validate_name(name)
            .map_err(|e| format!("'{name}' is not a projection name: {e}"))?;
        let mut settings = self.for_projection(name);
        for pair in pairs.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not key=value"))?;
            let value = value.trim();
            match key.trim() {
                "on_failure" => {
                    settings.on_failure = value.parse()?
                }
                "max_retries" => settings.max_retries = value.parse().map_err(|_| format!("max_retries must be a number, not '{value}'"))?,
                "memory" => settings.memory_limit = parse_bytes(value)?,
                "timeout" => {
                    settings.call_timeout = humantime::parse_duration(value).map_err(|e| format!("timeout '{value}': {e}"))?
                }
                "max_batch_bytes" => settings.max_batch_bytes = parse_bytes(value)?,
                "max_write_bytes" => settings.max_write_bytes = parse_bytes(value)?,
                "max_query_bytes" => settings.max_query_bytes = parse_bytes(value)?,
                other => {
                    return Err(format!(
                        "unknown setting '{other}' (known: on_failure, max_retries, memory, timeout, max_batch_bytes, max_write_bytes, max_query_bytes)"
                    ))
                }
            }
        }
        self.overrides.insert(name.to_string(), settings);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            defaults: ProjectionSettings {
                on_failure: OnFailure::Stop,
                max_retries: 5,
                memory_limit: 256 << 20,
                call_timeout: Duration::from_secs(10),
                max_batch_bytes: 16 << 20,
                max_write_bytes: 64 << 20,
                max_query_bytes: 16 << 20,
            },
            overrides: BTreeMap::new(),
        }
    }

    #[test]
    fn overrides_apply_to_one_projection_only() {
        let mut s = settings();
        s.add_override("orders:on_failure=dead-letter,memory=64MiB,timeout=2s,max_retries=1")
            .unwrap();
        let orders = s.for_projection("orders");
        assert_eq!(orders.on_failure, OnFailure::DeadLetter);
        assert_eq!(orders.memory_limit, 64 << 20);
        assert_eq!(orders.call_timeout, Duration::from_secs(2));
        assert_eq!(orders.max_retries, 1);
        assert_eq!(s.for_projection("other"), s.defaults);
    }

    #[test]
    fn bad_overrides_say_what_is_wrong() {
        let mut s = settings();
        assert!(s
            .add_override("orders")
            .unwrap_err()
            .contains("should look like"));
        assert!(s
            .add_override("orders:colour=red")
            .unwrap_err()
            .contains("unknown setting 'colour'"));
        assert!(s
            .add_override("orders:on_failure=explode")
            .unwrap_err()
            .contains("stop or dead-letter"));
        assert!(s
            .add_override("Orders:max_retries=1")
            .unwrap_err()
            .contains("not a projection name"));
    }
}
