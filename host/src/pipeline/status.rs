//! What each projection is doing, for probes, the admin API and `--once`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionState {
    Starting,
    Running,
    /// Batches fail and are being retried.
    Failing,
    /// Paused by an operator.
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub plugin_version: String,
    pub plugin_sha256: String,
    pub state: ProjectionState,
    pub events_processed: u64,
    pub lowest_checkpoint: i64,
    pub lag_events: f64,
    /// Positions behind the stream head, summed over this host's partitions (halted and
    /// paused ones in full).
    pub behind: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_commit_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `--once`: every partition of the replica set reached the head seen at start.
    pub caught_up: bool,
}

/// A failure shown on the status page.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    pub at: chrono::DateTime<chrono::Utc>,
    pub projection: String,
    pub message: String,
}

/// How many recent errors are kept.
const RECENT_ERRORS: usize = 20;

/// How often the status page's history is sampled, and how many samples it keeps (five
/// minutes).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const HISTORY: usize = 150;

/// The projections of this host at one moment, for the status page's chart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub at: chrono::DateTime<chrono::Utc>,
    pub projections: BTreeMap<String, SamplePoint>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SamplePoint {
    /// Positions behind the stream head, summed over this host's partitions.
    pub behind: i64,
    /// Events applied by this host so far (the page draws the rate between samples).
    pub events_processed: u64,
}

/// Statuses of all projections of this host.
#[derive(Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<BTreeMap<String, ProjectionStatus>>>,
    errors: Arc<Mutex<std::collections::VecDeque<RecentError>>>,
    history: Arc<Mutex<VecDeque<Sample>>>,
}

impl StatusBoard {
    pub fn update(&self, name: &str, f: impl FnOnce(&mut ProjectionStatus)) {
        if let Ok(mut map) = self.inner.lock() {
            if let Some(status) = map.get_mut(name) {
                f(status);
            }
        }
    }

    pub fn insert(&self, status: ProjectionStatus) {
        if let Ok(mut map) = self.inner.lock() {
            map.insert(status.name.clone(), status);
        }
    }

    pub fn record_error(&self, projection: &str, message: &str) {
        if let Ok(mut errors) = self.errors.lock() {
            if errors.len() == RECENT_ERRORS {
                errors.pop_front();
            }
            errors.push_back(RecentError {
                at: chrono::Utc::now(),
                projection: projection.to_string(),
                message: message.to_string(),
            });
        }
    }

    /// Newest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.errors
            .lock()
            .map(|e| e.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    pub fn all(&self) -> Vec<ProjectionStatus> {
        self.inner
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Records the projections' state now, dropping the oldest sample beyond the window.
    pub fn sample(&self) {
        let projections = self
            .all()
            .into_iter()
            .map(|s| {
                (
                    s.name,
                    SamplePoint {
                        behind: s.behind,
                        events_processed: s.events_processed,
                    },
                )
            })
            .collect();
        if let Ok(mut history) = self.history.lock() {
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(Sample {
                at: chrono::Utc::now(),
                projections,
            });
        }
    }

    /// Oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }
}
