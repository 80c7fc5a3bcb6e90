//! Every metric family the host exports, registered once at start on the host's own registry.
//!
//! The `pupsourcing_orchestrator_*` families keep the seed's names, types and labels so that
//! existing dashboards and alerts keep working; unlike in the seed, every one of them is
//! updated. `projection_lag_events` feeds the seed's HPA.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// States of `projection_host_partition_state`: committing, paused by an operator, halted at a
/// failing event (stop policy), or held while its failing event waits for a retry.
pub const PARTITION_STATES: [&str; 4] = ["running", "paused", "halted", "retrying"];

/// States of `pupsourcing_orchestrator_worker_state`, as the seed's code names them.
pub const WORKER_STATES: [&str; 5] = ["pending", "ready", "running", "stopping", "stopped"];

#[derive(Clone)]
pub struct HostMetrics {
    registry: Registry,
    // Seed families.
    pub generations_total: IntCounter,
    pub workers_registered_total: IntCounter,
    pub partition_assignments_total: IntCounter,
    pub reconfiguration_total: IntCounter,
    pub stale_workers_cleaned_total: IntCounter,
    events_processed_total: IntCounterVec,
    projection_errors_total: IntCounterVec,
    pub active_workers: IntGauge,
    pub current_generation_partitions: IntGauge,
    worker_state: IntGaugeVec,
    pub coordination_duration_seconds: Histogram,
    event_processing_duration_seconds: HistogramVec,
    pub heartbeat_latency_seconds: Histogram,
    // For the HPA.
    projection_lag_events: GaugeVec,
    // The host's own.
    pub generation: IntGauge,
    batch_events: HistogramVec,
    plugin_call_duration_seconds: HistogramVec,
    plugin_limit_trips_total: IntCounterVec,
    batch_retries_total: IntCounterVec,
    fenced_batches_total: IntCounterVec,
    dead_letters: IntGaugeVec,
    plugin_info: IntGaugeVec,
    checkpoint_position: IntGaugeVec,
    partition_state: IntGaugeVec,
    partition_lag_events: IntGaugeVec,
    halted_position: IntGaugeVec,
    partition_dead_letters: IntGaugeVec,
    /// The partitions each projection exports series for, to remove them when they go.
    exported: Arc<Mutex<BTreeMap<String, BTreeSet<u32>>>>,
    pipeline_panics_total: IntCounterVec,
    pub holes_passed: IntCounter,
    pub oldest_writer_seconds: Gauge,
    pub safe_head_held_back_seconds: Gauge,
    pub stream_head: Gauge,
    pub owned_partitions: IntGauge,
}

/// Seconds buckets from 1 ms to 60 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

/// Creates families on the host's registry, every one labelled with its replica set.
struct Families {
    registry: Registry,
    replica_set: std::collections::HashMap<String, String>,
}

impl Families {
    fn new(replica_set: &str) -> Families {
        Families {
            registry: Registry::new(),
            replica_set: labels(&[("replica_set", replica_set)]),
        }
    }

    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(name, help).const_labels(self.replica_set.clone())
    }

    fn histogram_opts(&self, name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
        HistogramOpts::new(name, help)
            .const_labels(self.replica_set.clone())
            .buckets(buckets)
    }

    /// The names, helps and labels are constants of this file: an invalid or duplicate one is
    /// a bug that the first test run finds, hence the `expect`s.
    fn register<C: Collector + Clone + 'static>(&self, family: prometheus::Result<C>) -> C {
        let family = family.expect("valid metric");
        self.registry
            .register(Box::new(family.clone()))
            .expect("unique metric");
        family
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::with_opts(self.opts(name, help)))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(self.opts(name, help), labels))
    }

    fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::with_opts(self.opts(name, help)))
    }

    fn int_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(self.opts(name, help), labels))
    }

    fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.register(Gauge::with_opts(self.opts(name, help)))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.register(GaugeVec::new(self.opts(name, help), labels))
    }

    /// Latency buckets.
    fn histogram(&self, name: &str, help: &str) -> Histogram {
        let opts = self.histogram_opts(name, help, latency_buckets());
        self.register(Histogram::with_opts(opts))
    }

    /// Per projection.
    fn histogram_vec(&self, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
        let opts = self.histogram_opts(name, help, buckets);
        self.register(HistogramVec::new(opts, &["projection"]))
    }
}

impl HostMetrics {
    /// Creates and registers every family; label sets that are known up front are
    /// pre-initialised so that the series exist from the first scrape.
    pub fn new(replica_set: &str, worker_id: &str) -> HostMetrics {
        let f = Families::new(replica_set);
        let metrics = HostMetrics {
            generations_total: f.counter(
                "pupsourcing_orchestrator_generations_total",
                "Generations (assignment changes) created by this worker as leader.",
            ),
            workers_registered_total: f.counter(
                "pupsourcing_orchestrator_workers_registered_total",
                "Times this worker registered in its replica set.",
            ),
            partition_assignments_total: f.counter(
                "pupsourcing_orchestrator_partition_assignments_total",
                "Partitions (re)assigned by this worker as leader.",
            ),
            reconfiguration_total: f.counter(
                "pupsourcing_orchestrator_reconfiguration_total",
                "Generations that changed this worker's partitions.",
            ),
            stale_workers_cleaned_total: f.counter(
                "pupsourcing_orchestrator_stale_workers_cleaned_total",
                "Workers removed by this worker as leader after their heartbeat went stale.",
            ),
            events_processed_total: f.counter_vec(
                "pupsourcing_orchestrator_events_processed_total",
                "Events applied to read models (committed).",
                &["projection"],
            ),
            projection_errors_total: f.counter_vec(
                "pupsourcing_orchestrator_projection_errors_total",
                "Failed batch attempts (plugin failures and database errors).",
                &["projection"],
            ),
            active_workers: f.int_gauge(
                "pupsourcing_orchestrator_active_workers",
                "Live workers in the replica set, as last seen by this worker.",
            ),
            current_generation_partitions: f.int_gauge(
                "pupsourcing_orchestrator_current_generation_partitions",
                "Partitions this worker owns in the current generation.",
            ),
            worker_state: f.int_gauge_vec(
                "pupsourcing_orchestrator_worker_state",
                "1 for this worker's current state, 0 for the others.",
                &["worker_id", "state"],
            ),
            coordination_duration_seconds: f.histogram(
                "pupsourcing_orchestrator_coordination_duration_seconds",
                "Duration of one coordination round (leader duties, claims, releases).",
            ),
            event_processing_duration_seconds: f.histogram_vec(
                "pupsourcing_orchestrator_event_processing_duration_seconds",
                "Duration of one batch: read, plugin, write, commit.",
                latency_buckets(),
            ),
            heartbeat_latency_seconds: f.histogram(
                "pupsourcing_orchestrator_heartbeat_latency_seconds",
                "Round trip of one heartbeat write.",
            ),
            projection_lag_events: f.gauge_vec(
                "projection_lag_events",
                "Events between the stream head and this host's checkpoints of the projection (position gap summed over owned partitions, divided by the partition count).",
                &["projection"],
            ),
            generation: f.int_gauge(
                "projection_host_generation",
                "The replica set's current generation, as last seen by this worker.",
            ),
            batch_events: f.histogram_vec(
                "projection_host_batch_events",
                "Events handed to the plugin per batch.",
                vec![
                    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
                ],
            ),
            plugin_call_duration_seconds: f.histogram_vec(
                "projection_host_plugin_call_duration_seconds",
                "Duration of one handle-batch call including its writes.",
                latency_buckets(),
            ),
            plugin_limit_trips_total: f.counter_vec(
                "projection_host_plugin_limit_trips_total",
                "Plugin calls stopped by a sandbox limit.",
                &["projection", "limit"],
            ),
            batch_retries_total: f.counter_vec(
                "projection_host_batch_retries_total",
                "Batches rolled back and retried.",
                &["projection", "reason"],
            ),
            fenced_batches_total: f.counter_vec(
                "projection_host_fenced_batches_total",
                "Batches rolled back because this worker no longer owned a partition.",
                &["projection"],
            ),
            dead_letters: f.int_gauge_vec(
                "projection_host_dead_letters",
                "Events parked in the dead-letter list.",
                &["projection"],
            ),
            plugin_info: f.int_gauge_vec(
                "projection_host_plugin_info",
                "1 for the plugin build each projection runs.",
                &["projection", "version", "sha256"],
            ),
            checkpoint_position: f.int_gauge_vec(
                "projection_host_checkpoint_position",
                "Lowest checkpoint of the projection over the partitions this host holds (halted ones included); absent while it holds none.",
                &["projection"],
            ),
            partition_state: f.int_gauge_vec(
                "projection_host_partition_state",
                "1 for the state of each partition this host holds (running, paused, halted, retrying), 0 for the others.",
                &["projection", "partition", "state"],
            ),
            partition_lag_events: f.int_gauge_vec(
                "projection_host_partition_lag_events",
                "Positions between the stream head and the partition's checkpoint (a halted or paused partition counts in full).",
                &["projection", "partition"],
            ),
            halted_position: f.int_gauge_vec(
                "projection_host_halted_position",
                "Position of the event a halted partition stopped at (present only while halted).",
                &["projection", "partition"],
            ),
            partition_dead_letters: f.int_gauge_vec(
                "projection_host_partition_dead_letters",
                "Events parked in the dead-letter list, per partition this host holds.",
                &["projection", "partition"],
            ),
            exported: Arc::default(),
            pipeline_panics_total: f.counter_vec(
                "projection_host_pipeline_panics_total",
                "Pipeline tasks that panicked (each was logged and restarted).",
                &["projection"],
            ),
            holes_passed: f.counter(
                "projection_host_holes_passed_total",
                "Positions passed as proven-final holes in global_position.",
            ),
            oldest_writer_seconds: f.gauge(
                "projection_host_oldest_open_writer_seconds",
                "Age of the oldest open transaction writing to the events table.",
            ),
            safe_head_held_back_seconds: f.gauge(
                "projection_host_safe_head_held_back_seconds",
                "How long the oldest unproven hole has held reading back.",
            ),
            stream_head: f.gauge(
                "projection_host_stream_head_position",
                "Highest visible global_position.",
            ),
            owned_partitions: f.int_gauge(
                "projection_host_owned_partitions",
                "Partitions this worker holds right now.",
            ),
            // Last: every family above registers on it first.
            registry: f.registry,
        };
        metrics.set_worker_state(worker_id, "pending");
        metrics
    }

    /// Creates every per-projection series at zero.
    pub fn register_projection(&self, projection: &str, version: &str, sha256: &str) {
        self.events_processed_total.with_label_values(&[projection]);
        self.projection_errors_total
            .with_label_values(&[projection]);
        self.event_processing_duration_seconds
            .with_label_values(&[projection]);
        self.plugin_call_duration_seconds
            .with_label_values(&[projection]);
        self.batch_events.with_label_values(&[projection]);
        self.projection_lag_events
            .with_label_values(&[projection])
            .set(0.0);
        self.fenced_batches_total.with_label_values(&[projection]);
        self.dead_letters.with_label_values(&[projection]).set(0);
        self.pipeline_panics_total.with_label_values(&[projection]);
        for limit in ["deadline", "memory"] {
            self.plugin_limit_trips_total
                .with_label_values(&[projection, limit]);
        }
        for reason in ["plugin", "database"] {
            self.batch_retries_total
                .with_label_values(&[projection, reason]);
        }
        self.plugin_info
            .with_label_values(&[projection, version, sha256])
            .set(1);
    }

    /// A projection now runs another plugin build.
    pub fn plugin_swapped(&self, projection: &str, from: (&str, &str), to: (&str, &str)) {
        let _ = self
            .plugin_info
            .remove_label_values(&[projection, from.0, from.1]);
        self.plugin_info
            .with_label_values(&[projection, to.0, to.1])
            .set(1);
    }

    pub fn set_worker_state(&self, worker_id: &str, state: &str) {
        for s in WORKER_STATES {
            self.worker_state
                .with_label_values(&[worker_id, s])
                .set(i64::from(s == state));
        }
    }

    pub fn batch_committed(
        &self,
        projection: &str,
        events: usize,
        seconds: f64,
        plugin_seconds: f64,
    ) {
        self.events_processed_total
            .with_label_values(&[projection])
            .inc_by(events as u64);
        self.event_processing_duration_seconds
            .with_label_values(&[projection])
            .observe(seconds);
        if events > 0 {
            self.plugin_call_duration_seconds
                .with_label_values(&[projection])
                .observe(plugin_seconds);
            self.batch_events
                .with_label_values(&[projection])
                .observe(events as f64);
        }
    }

    pub fn batch_failed(&self, projection: &str, reason: &str) {
        self.projection_errors_total
            .with_label_values(&[projection])
            .inc();
        self.batch_retries_total
            .with_label_values(&[projection, reason])
            .inc();
    }

    pub fn pipeline_panicked(&self, projection: &str) {
        self.pipeline_panics_total
            .with_label_values(&[projection])
            .inc();
    }

    pub fn limit_tripped(&self, projection: &str, limit: &str) {
        self.plugin_limit_trips_total
            .with_label_values(&[projection, limit])
            .inc();
    }

    pub fn batch_fenced(&self, projection: &str) {
        self.fenced_batches_total
            .with_label_values(&[projection])
            .inc();
    }

    /// The projection's lag and lowest checkpoint over the partitions held (`None`: holds none,
    /// so it has no checkpoint to report and must not pull a `min()` over pods down).
    pub fn set_lag(&self, projection: &str, lag: f64, lowest_checkpoint: Option<i64>) {
        self.projection_lag_events
            .with_label_values(&[projection])
            .set(lag);
        match lowest_checkpoint {
            Some(lowest) => self
                .checkpoint_position
                .with_label_values(&[projection])
                .set(lowest),
            None => {
                let _ = self.checkpoint_position.remove_label_values(&[projection]);
            }
        }
    }

    /// One held partition's state and lag; `halted_at` is the event a halted one stopped at.
    pub fn set_partition(&self, projection: &str, partition: &PartitionReport) {
        let label = partition.partition.to_string();
        for state in PARTITION_STATES {
            self.partition_state
                .with_label_values(&[projection, &label, state])
                .set(i64::from(state == partition.state));
        }
        self.partition_lag_events
            .with_label_values(&[projection, &label])
            .set(partition.lag);
        match partition.halted_at {
            Some(position) => self
                .halted_position
                .with_label_values(&[projection, &label])
                .set(position),
            None => {
                let _ = self
                    .halted_position
                    .remove_label_values(&[projection, &label]);
            }
        }
        self.exported(projection, partition.partition);
    }

    pub fn set_partition_dead_letters(&self, projection: &str, partition: u32, count: i64) {
        self.partition_dead_letters
            .with_label_values(&[projection, &partition.to_string()])
            .set(count);
        self.exported(projection, partition);
    }

    /// Notes a partition series, so that [`Self::retain_partitions`] can remove it.
    fn exported(&self, projection: &str, partition: u32) {
        self.exported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(projection.to_string())
            .or_default()
            .insert(partition);
    }

    /// Removes the per-partition series of `projection` for partitions not in `held`, or of
    /// every projection when `projection` is `None` (ownership changed): a partition this host
    /// no longer holds must not be counted twice across pods.
    pub fn retain_partitions(&self, projection: Option<&str>, held: &BTreeSet<u32>) {
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        for (name, partitions) in exported.iter_mut() {
            if projection.is_some_and(|p| p != name) {
                continue;
            }
            let gone: Vec<u32> = partitions.difference(held).copied().collect();
            for partition in gone {
                let label = partition.to_string();
                for state in PARTITION_STATES {
                    let _ = self
                        .partition_state
                        .remove_label_values(&[name, &label, state]);
                }
                let _ = self
                    .partition_lag_events
                    .remove_label_values(&[name, &label]);
                let _ = self.halted_position.remove_label_values(&[name, &label]);
                let _ = self
                    .partition_dead_letters
                    .remove_label_values(&[name, &label]);
                partitions.remove(&partition);
            }
        }
    }

    pub fn set_dead_letters(&self, projection: &str, count: i64) {
        self.dead_letters
            .with_label_values(&[projection])
            .set(count);
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// What the host knows of one partition it holds, for [`HostMetrics::set_partition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionReport {
    pub partition: u32,
    /// One of [`PARTITION_STATES`].
    pub state: &'static str,
    pub lag: i64,
    pub halted_at: Option<i64>,
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "pupsourcing_orchestrator";

    #[test]
    fn every_seed_family_is_exported_from_the_first_scrape() {
        let m = HostMetrics::new("main", "w1");
        m.register_projection("bank_balances", "0.1.0", "abc");
        let text = m.render();
        for family in [
            "generations_total",
            "workers_registered_total",
            "partition_assignments_total",
            "reconfiguration_total",
            "stale_workers_cleaned_total",
            "events_processed_total",
            "projection_errors_total",
            "active_workers",
            "current_generation_partitions",
            "worker_state",
            "coordination_duration_seconds",
            "event_processing_duration_seconds",
            "heartbeat_latency_seconds",
        ] {
            assert!(
                text.contains(&format!("{SEED}_{family}")),
                "missing {family}"
            );
        }
        assert!(text
            .contains("projection_lag_events{projection=\"bank_balances\",replica_set=\"main\"}"));
        assert!(text
            .contains("worker_state{replica_set=\"main\",state=\"pending\",worker_id=\"w1\"} 1"));
    }

    #[test]
    fn a_partition_that_is_no_longer_held_stops_being_exported() {
        let m = HostMetrics::new("main", "w1");
        for (partition, state) in [(3, "halted"), (4, "running")] {
            m.set_partition(
                "p",
                &PartitionReport {
                    partition,
                    state,
                    lag: 7,
                    halted_at: (state == "halted").then_some(42),
                },
            );
        }
        let text = m.render();
        assert!(text.contains("projection_host_halted_position{partition=\"3\",projection=\"p\",replica_set=\"main\"} 42"), "{text}");
        assert!(
            text.contains(
                "partition=\"4\",projection=\"p\",replica_set=\"main\",state=\"running\"} 1"
            ),
            "{text}"
        );
        m.retain_partitions(None, &BTreeSet::from([4]));
        let text = m.render();
        assert!(!text.contains("partition=\"3\""), "{text}");
        assert!(text.contains("partition=\"4\""), "{text}");
    }
}
