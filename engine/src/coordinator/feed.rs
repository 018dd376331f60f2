//! Reads the hop log into the view, from the start (or, after an error,
//! from the last hop read) for as long as the coordinator runs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::tracker::{Read, Tracker};
use super::view::StoredHop;
use crate::codec::{Codec, DecodeError, Format};
use crate::headers;
use crate::transport::{Error, HopLog, LogReader, Stored};

/// Hops read and applied at a time.
const BATCH: usize = 1024;

pub(super) async fn feed<T: HopLog>(transport: T, tracker: &Tracker, codec: &Codec, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let from = tracker.last_seq() + 1;
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = read_from(&transport, tracker, codec, from) => r,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, from, "reading the hop log failed; reading again from the last hop seen");
        }
        if tracker.last_seq() + 1 > from {
            // The reader got on before it broke: a new break starts the
            // waits from the shortest again.
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Reads until the reader breaks.
async fn read_from<T: HopLog>(transport: &T, tracker: &Tracker, codec: &Codec, from: u64) -> Result<(), Error> {
    let info = transport.log_info().await?;
    tracker.begin_replay(&info);
    let mut reader = transport.read_log(from).await?;
    let mut hops = Vec::with_capacity(BATCH);
    loop {
        let batch = reader.next_batch(BATCH).await?;
        hops.clear();
        hops.extend(batch.into_iter().map(|m| to_hop(tracker, codec, m)));
        tracker.apply(&hops);
    }
}

fn to_hop(tracker: &Tracker, codec: &Codec, m: Stored) -> Read {
    tracker.hops_read.fetch_add(1, Ordering::Relaxed);
    let envelope = match m.message.headers.get(headers::CONTENT_TYPE) {
        Some(ct) => Format::from_content_type(ct).and_then(|f| codec.peek(&m.message.payload, f)),
        None => Err(DecodeError::MissingContentType),
    };
    match envelope {
        Ok(envelope) => Ok(StoredHop {
            seq: m.sequence,
            stored_at: m.stored_at,
            envelope,
        }),
        Err(e) => {
            tracker.undecodable.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sequence = m.sequence, subject = %m.message.subject, error = %e, "skipping a message that is not a document");
            Err(m.sequence)
        }
    }
}
