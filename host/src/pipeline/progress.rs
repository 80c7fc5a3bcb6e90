//! Catch-up progress at info level: events done, rate, ETA.

use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(2);

pub struct Progress {
    started: Instant,
    last_report: Instant,
    events: u64,
    events_at_last: u64,
    position_at_last: i64,
}

impl Progress {
    pub fn new() -> Self {
        let now = Instant::now();
        Progress {
            started: now,
            last_report: now,
            events: 0,
            events_at_last: 0,
            position_at_last: 0,
        }
    }

    /// Records a committed batch; logs a line every few seconds while behind the head.
    pub fn record(&mut self, projection: &str, events: usize, position: i64, head: i64) {
        self.events += events as u64;
        let elapsed = self.last_report.elapsed();
        if elapsed < EVERY {
            return;
        }
        let behind = head - position;
        if behind > 0 && self.events > self.events_at_last {
            let rate = (self.events - self.events_at_last) as f64 / elapsed.as_secs_f64();
            let positions_per_sec =
                (position - self.position_at_last).max(0) as f64 / elapsed.as_secs_f64();
            let eta = if positions_per_sec > 0.0 {
                humantime::format_duration(Duration::from_secs(
                    (behind as f64 / positions_per_sec).ceil() as u64,
                ))
                .to_string()
            } else {
                "unknown".into()
            };
            let percent = if head > 0 {
                position as f64 * 100.0 / head as f64
            } else {
                100.0
            };
            tracing::info!(
                projection,
                events_done = self.events,
                position,
                head,
                "catching up: {percent:.1}% ({position}/{head}), {rate:.0} events/s, ETA {eta}"
            );
        }
        self.last_report = Instant::now();
        self.events_at_last = self.events;
        self.position_at_last = position;
    }

    pub fn total(&self) -> (u64, Duration) {
        (self.events, self.started.elapsed())
    }
}
