//! The fetch loop: one per consumer handle of a service.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::time::Instant;

use super::handle::{Service, Shared, WorkerStats};
use super::process::process;
use crate::transport::{Consumer, Delivery, Transport};

/// A delivery taken from the consumer, waiting for a free slot.
struct Waiting<D> {
    delivery: D,
    /// When its ack deadline was last restarted (taken, or kept alive).
    since: Instant,
}

/// Fetches work for one service and runs up to `limit` steps at once,
/// driving them inside this task (no task per message: the hot path of the
/// embedded default is measured in microseconds).
///
/// It takes deliveries ahead of free slots, up to `prefetch` of them, so
/// that the consumer can ask for big batches (a NATS server spends less per
/// message on them). Those waiting are kept alive: every third of the ack
/// wait, the ones that have waited that long get a progress
/// acknowledgement, so a busy worker's backlog is not redelivered to
/// another worker and run twice. Draining, it hands them back at once.
pub(super) async fn pump<T: Transport>(
    shared: Arc<Shared<T>>,
    svc: Arc<Service>,
    mut consumer: T::Consumer,
    limit: usize,
    prefetch: usize,
) {
    let mut running = FuturesUnordered::new();
    let mut waiting: VecDeque<Waiting<<T::Consumer as Consumer>::Delivery>> = VecDeque::new();
    let keep_every = (shared.ack_wait / 3).max(Duration::from_millis(10));
    let mut keep = tokio::time::interval(keep_every);
    keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        while running.len() < limit {
            let Some(w) = waiting.pop_front() else { break };
            running.push(process(&shared, &svc, w.delivery));
        }
        let draining = shared.cancel.is_cancelled();
        if draining && !waiting.is_empty() {
            hand_back_unstarted(&shared, &mut consumer, &mut waiting).await;
        }
        let fetching = !draining && waiting.len() < prefetch;
        if draining && running.is_empty() {
            // The acknowledgements of the last steps are queued on the
            // connection: send them before the process may exit, or those
            // steps are delivered again and run twice.
            // Bounded: with the server gone, a flush waits for a reconnect.
            match tokio::time::timeout(Duration::from_secs(5), shared.transport.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not flush the last acknowledgements"),
                Err(_) => tracing::warn!("the last acknowledgements were not flushed within 5 s"),
            }
            return;
        }
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            _ = shared.cancel.cancelled(), if !draining => {}
            _ = keep.tick(), if !waiting.is_empty() => keep_alive_waiting(&mut waiting, keep_every).await,
            batch = consumer.fetch(prefetch - waiting.len()), if fetching => match batch {
                Ok(deliveries) => {
                    failures = 0;
                    let now = Instant::now();
                    waiting.extend(deliveries.into_iter().map(|delivery| Waiting { delivery, since: now }));
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(50 * u64::from(failures.min(40)));
                    tracing::warn!(error = %e, retry_in = ?wait, "fetch failed");
                    if !e.is_retryable() && failures > 20 {
                        tracing::error!(error = %e, "giving up on this service");
                        shared.cancel.cancel();
                        continue;
                    }
                    // Keep finishing what runs while waiting to fetch again.
                    let pause = tokio::time::sleep(wait);
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            _ = &mut pause => break,
                            _ = shared.cancel.cancelled() => break,
                            Some(()) = running.next(), if !running.is_empty() => {}
                        }
                    }
                }
            },
        }
    }
}

/// Restarts the ack deadline of the deliveries that have waited a third of
/// the ack wait since it last started.
async fn keep_alive_waiting<D: Delivery>(waiting: &mut VecDeque<Waiting<D>>, every: Duration) {
    let now = Instant::now();
    for w in waiting.iter_mut().filter(|w| now.duration_since(w.since) >= every) {
        if let Err(e) = w.delivery.in_progress().await {
            tracing::warn!(error = %e, "could not extend the ack deadline of a waiting delivery");
        }
        w.since = now;
    }
}

/// Draining: hands back, to be delivered again at once (to another
/// worker, or to this service's next start), what was taken and not
/// started, and what the consumer holds ready. Left alone, each would come
/// back only after its ack wait.
async fn hand_back_unstarted<T: Transport>(
    shared: &Shared<T>,
    consumer: &mut T::Consumer,
    waiting: &mut VecDeque<Waiting<<T::Consumer as Consumer>::Delivery>>,
) {
    while let Some(Ok(more)) = consumer.fetch(usize::MAX).now_or_never() {
        if more.is_empty() {
            break;
        }
        waiting.extend(more.into_iter().map(|delivery| Waiting {
            delivery,
            since: Instant::now(),
        }));
    }
    for w in waiting.drain(..) {
        WorkerStats::bump(&shared.stats.naks);
        if let Err(e) = w.delivery.nak(None).await {
            tracing::warn!(error = %e, "could not hand back a delivery not started; it comes back after its ack wait");
        }
    }
}
