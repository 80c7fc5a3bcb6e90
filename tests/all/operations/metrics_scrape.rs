use std::time::Duration;

use crate::support::{eventually, series, HttpHost, TestDb, Writer};

const SEED_FAMILIES: [&str; 13] = [
    "pupsourcing_orchestrator_generations_total",
    "pupsourcing_orchestrator_workers_registered_total",
    "pupsourcing_orchestrator_partition_assignments_total",
    "pupsourcing_orchestrator_reconfiguration_total",
    "pupsourcing_orchestrator_stale_workers_cleaned_total",
    "pupsourcing_orchestrator_events_processed_total",
    "pupsourcing_orchestrator_projection_errors_total",
    "pupsourcing_orchestrator_active_workers",
    "pupsourcing_orchestrator_current_generation_partitions",
    "pupsourcing_orchestrator_worker_state",
    "pupsourcing_orchestrator_coordination_duration_seconds",
    "pupsourcing_orchestrator_event_processing_duration_seconds",
    "pupsourcing_orchestrator_heartbeat_latency_seconds",
];

/// A scrape of each host of a running two-host fleet has every family, with live values.
#[tokio::test]
async fn every_metric_family_is_exported_with_live_values() {
    let db = TestDb::new("metrics").await;
    db.append_w1(0, 1_999, 50).await;
    let writer = Writer::start(db.pool.clone(), 2_000, 50, 20, Duration::from_millis(20));
    let args = [
        "--plugin",
        test_artifacts::BANK_BALANCES,
        "--replica-set",
        "m",
        "--heartbeat-interval",
        "300ms",
        "--stale-worker-timeout",
        "3s",
    ];
    let a = HttpHost::run("a", &db.url, &[&args[..], &["--worker-id", "a"]].concat());
    // a holds every partition first, then gives half to b.
    eventually(
        "a to export all 32 partitions",
        Duration::from_secs(60),
        || async { (exported_partitions(&a.scrape().await).len() == 32).then_some(()) },
    )
    .await;
    let b = HttpHost::run("b", &db.url, &[&args[..], &["--worker-id", "b"]].concat());
    let scrapes = eventually("both hosts to hold their share and process events", Duration::from_secs(60), || async {
        let (sa, sb) = (a.scrape().await, b.scrape().await);
        let live = |s: &str, w: &str| {
            series(s, &format!("pupsourcing_orchestrator_worker_state{{replica_set=\"m\",state=\"running\",worker_id=\"{w}\"}}")) == Some(1.0)
                && series(s, "pupsourcing_orchestrator_events_processed_total{projection=\"bank_balances\",replica_set=\"m\"}").unwrap_or(0.0) > 0.0
                && series(s, "pupsourcing_orchestrator_active_workers{replica_set=\"m\"}") == Some(2.0)
                && series(s, "projection_host_owned_partitions{replica_set=\"m\"}") == Some(16.0)
        };
        (live(&sa, "a") && live(&sb, "b")).then_some((sa, sb))
    })
    .await;
    writer.stop().await;
    // A partition's series come from the pod that holds it only: a stopped exporting what it
    // handed to b, so sums over pods count each partition once.
    let (pa, pb) = (
        exported_partitions(&scrapes.0),
        exported_partitions(&scrapes.1),
    );
    assert_eq!((pa.len(), pb.len()), (16, 16), "{pa:?} {pb:?}");
    assert!(pa.is_disjoint(&pb), "{pa:?} {pb:?}");
    for scrape in [&scrapes.0, &scrapes.1] {
        for family in SEED_FAMILIES {
            assert!(
                scrape.contains(&format!("# TYPE {family} ")),
                "missing {family}"
            );
        }
        for family in [
            "projection_lag_events",
            "projection_host_batch_events",
            "projection_host_plugin_call_duration_seconds",
            "projection_host_plugin_limit_trips_total",
            "projection_host_dead_letters",
            "projection_host_holes_passed_total",
            "projection_host_oldest_open_writer_seconds",
            "projection_host_plugin_info",
            "projection_host_generation",
        ] {
            assert!(
                scrape.contains(&format!("# TYPE {family} ")),
                "missing {family}"
            );
        }
        assert_eq!(
            series(
                scrape,
                "pupsourcing_orchestrator_current_generation_partitions{replica_set=\"m\"}"
            ),
            Some(16.0)
        );
        assert!(
            series(
                scrape,
                "pupsourcing_orchestrator_heartbeat_latency_seconds_count{replica_set=\"m\"}"
            )
            .unwrap()
                > 0.0
        );
        assert!(
            series(
                scrape,
                "pupsourcing_orchestrator_coordination_duration_seconds_count{replica_set=\"m\"}"
            )
            .unwrap()
                > 0.0
        );
        assert!(series(scrape, "pupsourcing_orchestrator_event_processing_duration_seconds_count{projection=\"bank_balances\",replica_set=\"m\"}").unwrap() > 0.0);
        assert_eq!(
            series(
                scrape,
                "pupsourcing_orchestrator_workers_registered_total{replica_set=\"m\"}"
            ),
            Some(1.0)
        );
        assert!(scrape.contains(
            "projection_host_plugin_info{projection=\"bank_balances\",replica_set=\"m\",sha256=\""
        ));
    }
    // Exactly one of them led the generations and assigned the partitions.
    let generations: f64 = [&scrapes.0, &scrapes.1]
        .iter()
        .map(|s| {
            series(
                s,
                "pupsourcing_orchestrator_generations_total{replica_set=\"m\"}",
            )
            .unwrap()
        })
        .sum();
    assert!(
        generations >= 1.0,
        "the leader counts the generations it created"
    );
    let assigned: f64 = [&scrapes.0, &scrapes.1]
        .iter()
        .map(|s| {
            series(
                s,
                "pupsourcing_orchestrator_partition_assignments_total{replica_set=\"m\"}",
            )
            .unwrap()
        })
        .sum();
    assert!(
        assigned >= 32.0,
        "every partition was assigned at least once: {assigned}"
    );
    db.drop_db().await;
}

/// The partitions a scrape has per-partition series for (bank_balances).
fn exported_partitions(scrape: &str) -> std::collections::BTreeSet<u32> {
    scrape
        .lines()
        .filter(|l| l.starts_with("projection_host_partition_lag_events{"))
        .filter(|l| l.contains("projection=\"bank_balances\""))
        .filter_map(|l| {
            let at = l.find("partition=\"")? + 11;
            l[at..].split('"').next()?.parse().ok()
        })
        .collect()
}
