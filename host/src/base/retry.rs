//! Backoff for retries: exponential with jitter, so that a fleet does not retry in lockstep.

use std::time::Duration;

/// The delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`, capped at `max`,
/// then drawn uniformly from its upper half.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    half + full.mul_f64(rand::random::<f64>() * 0.5)
}

/// Waits until `at`, or for ever when there is nothing to wait for (a `select!` branch that
/// only fires when a deadline exists).
pub async fn sleep_until(at: Option<impl Into<tokio::time::Instant>>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_its_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(30);
        for attempt in 1..40 {
            let d = backoff(attempt, base, max);
            let full = base
                .saturating_mul(1 << attempt.saturating_sub(1).min(20))
                .min(max);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} outside [{:?}, {full:?}]",
                full / 2
            );
        }
        assert!(backoff(1, base, max) <= base);
        assert!(backoff(30, base, max) >= max / 2);
    }
}
