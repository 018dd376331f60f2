//! The fetch loop: one per consumer handle of a service.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use super::handle::{Service, Shared};
use super::process::process;
use crate::transport::{Consumer, Transport};

/// Fetches work for one service and runs up to `concurrency` steps at once,
/// driving them inside this task (no task per message: the hot path of the
/// embedded default is measured in microseconds).
pub(super) async fn pump<T: Transport>(
    shared: Arc<Shared<T>>,
    svc: Arc<Service>,
    mut consumer: T::Consumer,
    limit: usize,
) {
    let mut running = FuturesUnordered::new();
    let mut failures = 0u32;
    loop {
        let room = limit - running.len();
        let fetching = room > 0 && !shared.cancel.is_cancelled();
        if !fetching && running.is_empty() {
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
            _ = shared.cancel.cancelled(), if fetching => {}
            batch = consumer.fetch(room.min(shared.batch)), if fetching => match batch {
                Ok(deliveries) => {
                    failures = 0;
                    for d in deliveries {
                        running.push(process(&shared, &svc, d));
                    }
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
