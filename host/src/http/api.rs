//! The wire format of the admin API and the probes: every request and response body, shared by
//! the handlers (`admin.rs`, `probes.rs`) and the CLI client (`client.rs`), so that a renamed
//! field breaks the build (or a test) instead of printing "" silently. Field names are the JSON
//! names; `openapi.json` describes the same types (a test below compares the two).
//!
//! These types are separate from the database rows and in-memory statuses they are built from,
//! so that renaming a column or an internal field cannot change what clients see.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::lifecycle::registry;
use crate::pipeline::status as board;
use crate::store::dead_letters;
use crate::store::replica_sets::{Phase, Strategy};

type Time = DateTime<Utc>;

/// `GET /admin/status`: the replica set as the database has it, and this host's projections.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminStatus {
    pub replica_set: String,
    pub generation: i64,
    pub phase: Phase,
    pub strategy: Strategy,
    pub leader: Option<String>,
    pub partitions_total: i32,
    pub stream_head: i64,
    pub this_worker: String,
    pub workers: Vec<Worker>,
    pub partitions: Vec<PartitionStatus>,
    pub projections: Vec<ProjectionView>,
    /// This host's recent failures, newest first.
    pub recent_errors: Vec<RecentError>,
    /// This host's projections over the last minutes, oldest first (the page's chart).
    pub history: Vec<Sample>,
}

/// A worker registered in the replica set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    pub worker_id: String,
    pub hostname: String,
    pub host_version: String,
    pub heartbeat_age_ms: i64,
    pub started_at: Time,
    /// Partitions it owns.
    pub partitions: i64,
}

impl From<&crate::status::WorkerRow> for Worker {
    fn from(w: &crate::status::WorkerRow) -> Self {
        Worker {
            worker_id: w.worker_id.clone(),
            hostname: w.hostname.clone(),
            host_version: w.host_version.clone(),
            heartbeat_age_ms: w.heartbeat_age_ms,
            started_at: w.started_at,
            partitions: w.partitions,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub owner: Option<String>,
    pub epoch: i64,
    pub assigned_to: Option<String>,
    /// Checkpoint per projection.
    pub checkpoints: BTreeMap<String, i64>,
    /// Stream head minus checkpoint, per projection.
    pub lag: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectionView {
    pub name: String,
    pub paused: bool,
    /// Partitions halted by the stop policy: (partition, position).
    pub halted: Vec<(i32, i64)>,
    /// The same halts with their error and time.
    pub halts: Vec<Halt>,
    pub paused_reason: Option<String>,
    pub dead_letters: i64,
    pub lowest_checkpoint: i64,
    pub lag_positions: i64,
    pub last_commit: Option<Time>,
    /// What this host runs and how it is doing, when it runs the projection.
    pub on_this_host: Option<LocalProjection>,
}

/// A partition halted at a failing event (stop policy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Halt {
    pub projection: String,
    pub partition: i32,
    pub position: i64,
    pub error: String,
    pub halted_at: Time,
}

impl From<&crate::status::HaltRow> for Halt {
    fn from(h: &crate::status::HaltRow) -> Self {
        Halt {
            projection: h.projection.clone(),
            partition: h.partition,
            position: h.position,
            error: h.error.clone(),
            halted_at: h.halted_at,
        }
    }
}

/// A projection as this host runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalProjection {
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
    pub last_error_at: Option<Time>,
    pub last_commit_at: Option<Time>,
    /// `--once`: every partition of the replica set reached the head seen at start.
    pub caught_up: bool,
}

impl From<&board::ProjectionStatus> for LocalProjection {
    fn from(s: &board::ProjectionStatus) -> Self {
        LocalProjection {
            name: s.name.clone(),
            plugin_version: s.plugin_version.clone(),
            plugin_sha256: s.plugin_sha256.clone(),
            state: s.state.into(),
            events_processed: s.events_processed,
            lowest_checkpoint: s.lowest_checkpoint,
            lag_events: s.lag_events,
            behind: s.behind,
            last_error: s.last_error.clone(),
            last_error_at: s.last_error_at,
            last_commit_at: s.last_commit_at,
            caught_up: s.caught_up,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

impl From<board::ProjectionState> for ProjectionState {
    fn from(s: board::ProjectionState) -> Self {
        use board::ProjectionState as S;
        match s {
            S::Starting => ProjectionState::Starting,
            S::Running => ProjectionState::Running,
            S::Failing => ProjectionState::Failing,
            S::Paused => ProjectionState::Paused,
            S::Stopped => ProjectionState::Stopped,
        }
    }
}

/// A failure shown on the status page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecentError {
    pub at: Time,
    pub projection: String,
    pub message: String,
}

impl From<&board::RecentError> for RecentError {
    fn from(e: &board::RecentError) -> Self {
        RecentError {
            at: e.at,
            projection: e.projection.clone(),
            message: e.message.clone(),
        }
    }
}

/// The projections of this host at one moment, for the status page's chart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub at: Time,
    pub projections: BTreeMap<String, SamplePoint>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SamplePoint {
    /// Positions behind the stream head, summed over this host's partitions.
    pub behind: i64,
    /// Events applied by this host so far (the page draws the rate between samples).
    pub events_processed: u64,
}

impl From<&board::Sample> for Sample {
    fn from(s: &board::Sample) -> Self {
        Sample {
            at: s.at,
            projections: s
                .projections
                .iter()
                .map(|(name, p)| {
                    let point = SamplePoint {
                        behind: p.behind,
                        events_processed: p.events_processed,
                    };
                    (name.clone(), point)
                })
                .collect(),
        }
    }
}

/// The body of `POST /admin/projections/{name}/pause` (optional).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PauseRequest {
    pub reason: Option<String>,
}

/// The answer of pause and resume.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlResult {
    pub projection: String,
    pub paused: bool,
}

/// The query of `GET /admin/dead-letters`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DeadLetterQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projection: Option<String>,
}

/// One parked event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: i64,
    pub projection: String,
    pub partition: i32,
    pub position: i64,
    pub aggregate_id: String,
    pub event_type: String,
    pub error: String,
    pub parked_at: Time,
    pub retry_requested: bool,
    pub attempts: i32,
}

impl From<dead_letters::DeadLetter> for DeadLetter {
    fn from(d: dead_letters::DeadLetter) -> Self {
        DeadLetter {
            id: d.id,
            projection: d.projection,
            partition: d.partition,
            position: d.position,
            aggregate_id: d.aggregate_id,
            event_type: d.event_type,
            error: d.error,
            parked_at: d.parked_at,
            retry_requested: d.retry_requested,
            attempts: d.attempts,
        }
    }
}

/// The body of `POST /admin/dead-letters/retry`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RetryRequest {
    pub projection: String,
    pub aggregate_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RetryResult {
    pub projection: String,
    pub aggregate_id: String,
    /// Parked events that will be applied again, in order.
    pub events: u64,
}

/// A registered plugin version (without its bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plugin {
    pub projection: String,
    pub sha256: String,
    pub version: String,
    pub interface: String,
    pub state: registry::State,
    pub mode: registry::Mode,
    pub track: String,
    pub namespace: String,
    pub source: String,
    pub created_at: Time,
    pub activated_at: Option<Time>,
    pub retired_at: Option<Time>,
}

impl From<registry::PluginRow> for Plugin {
    fn from(r: registry::PluginRow) -> Self {
        Plugin {
            projection: r.projection,
            sha256: r.sha256,
            version: r.version,
            interface: r.interface,
            state: r.state,
            mode: r.mode,
            track: r.track,
            namespace: r.namespace,
            source: r.source,
            created_at: r.created_at,
            activated_at: r.activated_at,
            retired_at: r.retired_at,
        }
    }
}

/// The query of `POST /admin/plugins`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PushQuery {
    pub mode: Option<registry::Mode>,
    pub activate: Option<bool>,
}

/// The body of `POST /admin/plugins/{projection}/promote`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PromoteRequest {
    pub sha256: String,
}

/// The body of a POST that needs none (`{}`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

/// Every error answer of the admin API.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /ready` once the host has started. The fields are in the alphabetical order the
/// hand-built JSON had.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub generation: i64,
    pub partitions_held: usize,
    pub ready: bool,
    pub reasons: Vec<String>,
    pub worker: String,
}

/// Every route but `/health` while the host starts (503).
#[derive(Debug, Serialize, Deserialize)]
pub struct Starting {
    pub ready: bool,
    pub reasons: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn spec() -> Value {
        serde_json::from_str(super::super::admin::OPENAPI).expect("openapi.json is JSON")
    }

    fn names(value: &Value) -> BTreeSet<String> {
        match value {
            Value::Object(map) => map.keys().cloned().collect(),
            Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// A component schema must name exactly the fields the type serializes, all required
    /// (an `Option` is written as `null`, never left out).
    fn assert_described(spec: &Value, schema: &str, value: &impl Serialize) {
        let described = &spec["components"]["schemas"][schema];
        let fields = names(&serde_json::to_value(value).expect("serializes"));
        assert!(!fields.is_empty(), "{schema}: not an object");
        assert_eq!(
            names(&described["properties"]),
            fields,
            "openapi.json's {schema} and the type disagree"
        );
        assert_eq!(
            names(&described["required"]),
            fields,
            "openapi.json's {schema}: every field is always present"
        );
    }

    fn at() -> Time {
        DateTime::from_timestamp(1_700_000_000, 0).expect("a valid time")
    }

    fn local() -> LocalProjection {
        LocalProjection {
            name: "bank_balances".into(),
            plugin_version: "0.1.0".into(),
            plugin_sha256: "abc".into(),
            state: ProjectionState::Running,
            events_processed: 7,
            lowest_checkpoint: 3,
            lag_events: 1.5,
            behind: 2,
            last_error: None,
            last_error_at: None,
            last_commit_at: Some(at()),
            caught_up: false,
        }
    }

    fn status() -> AdminStatus {
        let halt = Halt {
            projection: "bank_balances".into(),
            partition: 1,
            position: 9,
            error: "boom".into(),
            halted_at: at(),
        };
        AdminStatus {
            replica_set: "main".into(),
            generation: 4,
            phase: Phase::Running,
            strategy: Strategy::Cooperative,
            leader: Some("w1".into()),
            partitions_total: 2,
            stream_head: 10,
            this_worker: "w1".into(),
            workers: vec![Worker {
                worker_id: "w1".into(),
                hostname: "h".into(),
                host_version: "0.1.0".into(),
                heartbeat_age_ms: 5,
                started_at: at(),
                partitions: 2,
            }],
            partitions: vec![PartitionStatus {
                partition: 1,
                owner: Some("w1".into()),
                epoch: 3,
                assigned_to: Some("w1".into()),
                checkpoints: BTreeMap::from([("bank_balances".into(), 8)]),
                lag: BTreeMap::from([("bank_balances".into(), 2)]),
            }],
            projections: vec![ProjectionView {
                name: "bank_balances".into(),
                paused: false,
                halted: vec![(1, 9)],
                halts: vec![halt],
                paused_reason: None,
                dead_letters: 0,
                lowest_checkpoint: 3,
                lag_positions: 7,
                last_commit: Some(at()),
                on_this_host: Some(local()),
            }],
            recent_errors: vec![RecentError {
                at: at(),
                projection: "bank_balances".into(),
                message: "boom".into(),
            }],
            history: vec![Sample {
                at: at(),
                projections: BTreeMap::from([(
                    "bank_balances".into(),
                    SamplePoint {
                        behind: 2,
                        events_processed: 7,
                    },
                )]),
            }],
        }
    }

    fn dead_letter() -> DeadLetter {
        DeadLetter {
            id: 1,
            projection: "faulty".into(),
            partition: 0,
            position: 5,
            aggregate_id: "a".into(),
            event_type: "Opened".into(),
            error: "boom".into(),
            parked_at: at(),
            retry_requested: false,
            attempts: 0,
        }
    }

    fn plugin() -> Plugin {
        Plugin {
            projection: "bank_balances".into(),
            sha256: "abc".into(),
            version: "0.1.0".into(),
            interface: "projection".into(),
            state: registry::State::Active,
            mode: registry::Mode::Continue,
            track: "bank_balances".into(),
            namespace: "bank_balances".into(),
            source: "upload".into(),
            created_at: at(),
            activated_at: None,
            retired_at: None,
        }
    }

    #[test]
    fn the_openapi_schemas_describe_the_wire_types() {
        let spec = spec();
        let status = status();
        let projection = &status.projections[0];
        assert_described(&spec, "Status", &status);
        assert_described(&spec, "Worker", &status.workers[0]);
        assert_described(&spec, "Partition", &status.partitions[0]);
        assert_described(&spec, "Projection", projection);
        assert_described(&spec, "Halt", &projection.halts[0]);
        assert_described(&spec, "LocalProjection", &local());
        assert_described(&spec, "RecentError", &status.recent_errors[0]);
        assert_described(&spec, "Sample", &status.history[0]);
        assert_described(
            &spec,
            "SamplePoint",
            &status.history[0].projections["bank_balances"],
        );
        assert_described(&spec, "DeadLetter", &dead_letter());
        assert_described(&spec, "Plugin", &plugin());
        let control = ControlResult {
            projection: "p".into(),
            paused: true,
        };
        assert_described(&spec, "Control", &control);
        let retry = RetryResult {
            projection: "p".into(),
            aggregate_id: "a".into(),
            events: 1,
        };
        assert_described(&spec, "RetryResult", &retry);
        let error = ErrorBody { error: "no".into() };
        assert_described(&spec, "Error", &error);
    }

    #[test]
    fn every_projection_state_is_described() {
        let described = names(
            &spec()["components"]["schemas"]["LocalProjection"]["properties"]["state"]["enum"],
        );
        let states = [
            ProjectionState::Starting,
            ProjectionState::Running,
            ProjectionState::Failing,
            ProjectionState::Paused,
            ProjectionState::Stopped,
        ];
        let written: BTreeSet<String> = states
            .iter()
            .map(|s| {
                serde_json::to_value(s)
                    .expect("serializes")
                    .as_str()
                    .expect("a string")
                    .to_string()
            })
            .collect();
        assert_eq!(described, written);
    }

    #[test]
    fn a_status_reads_back_as_it_was_written() {
        let text = serde_json::to_string(&status()).expect("serializes");
        let read: AdminStatus = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(serde_json::to_string(&read).expect("serializes"), text);
    }
}
