//! Reading a worker's events: the next batch (from a page prefetched while the previous batch
//! ran, when it matches), the batch size (growing while catching up), and the events of the
//! latest failed batch, kept while its failure is narrowed down.

use std::sync::Arc;

use sqlx::PgPool;

use super::failure::FailedBatch;
use crate::ids::{Epoch, PartitionId};
use crate::source::{EventReader, Page, StoredEvent};

/// The events of the latest failed batch, kept while its failure is narrowed down so that each
/// step re-runs a part of it without reading it again.
struct Retained {
    from: i64,
    up_to: i64,
    /// Read on the first step that needs them.
    events: Option<Vec<(PartitionId, StoredEvent)>>,
}

/// A read started ahead of time: subscribed events in `(after, up_to]`, at most `limit`.
struct Prefetch {
    after: i64,
    up_to: i64,
    limit: u32,
    page: tokio::task::JoinHandle<Result<Page, sqlx::Error>>,
}

pub(super) struct BatchReader {
    reader: Arc<EventReader>,
    pool: PgPool,
    /// Events per read: the live batch size, doubled after each full page up to the largest.
    pub limit: u32,
    prefetch: Option<Prefetch>,
    retained: Option<Retained>,
}

impl BatchReader {
    pub fn new(reader: EventReader, pool: PgPool, limit: u32) -> BatchReader {
        BatchReader {
            reader: Arc::new(reader),
            pool,
            limit,
            prefetch: None,
            retained: None,
        }
    }

    /// Another subscription (a swapped-in build): a prefetched page is of the old one.
    pub fn resubscribe(&mut self, reader: EventReader) {
        self.reader = Arc::new(reader);
        self.prefetch = None;
    }

    /// Subscribed events after `from` up to `safe_head`, from the prefetched page when it
    /// matches (read up to the head as it was then), else read now.
    pub async fn read(&mut self, from: i64, safe_head: i64) -> Result<Page, sqlx::Error> {
        if let Some(prefetch) = self.prefetch.take() {
            if prefetch.after == from && prefetch.limit == self.limit && prefetch.up_to <= safe_head
            {
                // A task that failed (panicked) is read again below.
                if let Ok(page) = prefetch.page.await {
                    return page;
                }
            } else {
                prefetch.page.abort();
            }
        }
        let mut conn = self.pool.acquire().await?;
        self.reader
            .read(&mut conn, from, safe_head, self.limit)
            .await
    }

    /// Starts reading the page after `after` while the current batch runs.
    pub fn start_prefetch(&mut self, after: i64, up_to: i64, limit: u32) {
        if up_to <= after {
            return;
        }
        let pool = self.pool.clone();
        let reader = self.reader.clone();
        let page = tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            reader.read(&mut conn, after, up_to, limit).await
        });
        if let Some(old) = self.prefetch.replace(Prefetch {
            after,
            up_to,
            limit,
            page,
        }) {
            old.page.abort();
        }
    }

    /// The events of a narrowing step: `scope`'s subscribed events in `(from, up_to]`, from the
    /// retained failed batch when it covers the range, else read now (a held event's retry
    /// from an earlier failure: its own range, below the safe head and no larger than the
    /// batch it came from).
    pub async fn step_events(
        &mut self,
        scope: &[(PartitionId, Epoch)],
        from: i64,
        up_to: i64,
        partitions: u32,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let in_step = |p: &PartitionId, e: &StoredEvent| {
            e.global_position > from
                && e.global_position <= up_to
                && scope.iter().any(|(q, _)| q == p)
        };
        match self.retained.as_mut() {
            Some(retained) if retained.from <= from && retained.up_to >= up_to => {
                if retained.events.is_none() {
                    // The range read before, below the safe head: the same events, all of them.
                    let mut conn = self.pool.acquire().await?;
                    let events = self
                        .reader
                        .read(&mut conn, retained.from, retained.up_to, u32::MAX)
                        .await?
                        .events;
                    retained.events = Some(
                        events
                            .into_iter()
                            .map(|e| (PartitionId::of(&e.aggregate_id, partitions), e))
                            .collect(),
                    );
                }
                Ok(retained
                    .events
                    .iter()
                    .flatten()
                    .filter(|(p, e)| in_step(p, e))
                    .map(|(_, e)| e.clone())
                    .collect())
            }
            _ => {
                let mut conn = self.pool.acquire().await?;
                Ok(self
                    .reader
                    .read(&mut conn, from, up_to, u32::MAX)
                    .await?
                    .events
                    .into_iter()
                    .filter(|e| in_step(&PartitionId::of(&e.aggregate_id, partitions), e))
                    .collect())
            }
        }
    }

    /// Subscribed events at these positions (parked events an operator asked to retry).
    pub async fn read_positions(&self, positions: &[i64]) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.reader.read_positions(&mut conn, positions).await
    }

    /// Keeps the failed batch's range so that the narrowing steps can re-run its parts. Only
    /// the latest failure's range is kept (memory stays at one batch); a step outside it reads
    /// its own range instead.
    pub fn retain(&mut self, batch: &FailedBatch) {
        if batch.handed.is_empty() {
            return;
        }
        let covered = self
            .retained
            .as_ref()
            .is_some_and(|r| r.from <= batch.from && r.up_to >= batch.up_to);
        if !covered {
            self.retained = Some(Retained {
                from: batch.from,
                up_to: batch.up_to,
                events: None,
            });
        }
    }

    /// Nothing is narrowed any more: the retained events are not needed.
    pub fn forget_retained(&mut self) {
        self.retained = None;
    }

    /// The aggregate of a retained event, for the log.
    pub fn retained_aggregate(&self, position: i64) -> Option<String> {
        self.retained
            .as_ref()?
            .events
            .iter()
            .flatten()
            .find(|(_, e)| e.global_position == position)
            .map(|(_, e)| e.aggregate_id.clone())
    }
}

/// The next read's size: doubled after a full page (catching up), up to `max_batch_size`;
/// back to the live `batch_size` otherwise.
pub(super) fn next_limit(limit: u32, full: bool, batch_size: u32, max_batch_size: u32) -> u32 {
    if full {
        limit.saturating_mul(2).min(max_batch_size)
    } else {
        batch_size
    }
}

/// Cuts `events` so that the payload and metadata bytes handed to one call stay within
/// `max_bytes`, keeping at least one event. Returns whether it cut.
pub(super) fn cut_to_bytes(events: &mut Vec<StoredEvent>, max_bytes: u64) -> bool {
    let mut bytes = 0u64;
    match events.iter().position(|e| {
        bytes += (e.payload.len() + e.metadata.as_ref().map_or(0, String::len)) as u64;
        bytes > max_bytes
    }) {
        Some(cut) => {
            events.truncate(cut.max(1));
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_double_while_pages_come_back_full_up_to_the_largest() {
        assert_eq!(next_limit(100, true, 100, 10_000), 200);
        assert_eq!(next_limit(8_000, true, 100, 10_000), 10_000);
        assert_eq!(next_limit(10_000, true, 100, 10_000), 10_000);
    }

    #[test]
    fn a_page_that_is_not_full_brings_the_live_batch_size_back() {
        assert_eq!(next_limit(6_400, false, 100, 10_000), 100);
    }

    #[test]
    fn the_largest_batch_never_overflows() {
        assert_eq!(next_limit(u32::MAX, true, 100, u32::MAX), u32::MAX);
    }
}
