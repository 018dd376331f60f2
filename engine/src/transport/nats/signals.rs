//! Signals over NATS: one KV bucket, `waybill_signals`, a key per order and
//! signal (`<order>.<name>`) holding the signal's JSON. Delivering one
//! creates its key (a second delivery finds it there: a duplicate) and
//! wakes the order; the worker at the waiting step reads the key.
//!
//! Neither side can miss the other: the deliverer writes the key, then
//! wakes the order's timer; the worker that stores a hop waiting for the
//! signal reads the key after the hop is stored, and wakes it itself if
//! the signal is there. And the hop that comes at the deadline reads the
//! key again before it gives up.

use async_nats::jetstream::kv;

use super::{nats_err, Nats};
use crate::id::{OrderId, SignalName};
use crate::transport::{Error, KeptSignal};

/// The bucket of signals.
pub const SIGNALS_BUCKET: &str = "waybill_signals";

/// Largest signal a bucket entry holds: the JSON of one signal.
pub const MAX_SIGNAL_BYTES: usize = 64 * 1024;

fn key(order: &OrderId, name: &SignalName) -> String {
    format!("{order}.{name}")
}

impl Nats {
    pub(super) fn signals_config(&self) -> kv::Config {
        kv::Config {
            bucket: SIGNALS_BUCKET.into(),
            description: "Signals delivered to orders (key: <order>.<signal>; value: its JSON)".into(),
            history: 1,
            // As long as the hops are kept: no order outlives them.
            max_age: self.config.max_age,
            max_value_size: i32::try_from(MAX_SIGNAL_BYTES).unwrap_or(i32::MAX),
            num_replicas: self.config.replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        }
    }

    /// The bucket, opened once per connection (its clones share it).
    async fn signals(&self) -> Result<&kv::Store, Error> {
        self.signals.get_or_try_init(|| self.key_value(SIGNALS_BUCKET)).await
    }

    pub(super) async fn put_signal(&self, order: OrderId, name: &SignalName, data: &str) -> Result<bool, Error> {
        let kv = self.signals().await?;
        let fresh = match kv.create(key(&order, name), data.to_owned().into()).await {
            Ok(_) => true,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
            Err(e) => return Err(nats_err(&format!("cannot record signal `{name}` of order {order}"), e)),
        };
        // Woken again on a duplicate, too: the first delivery may have
        // stopped before it woke the order. A wake that fails is tried
        // again here, then reported: the signal is kept, and the caller
        // sends it again (answered `duplicate`) to wake the order.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.wake_timer(order, None, Some(name)).await {
                Ok(()) => return Ok(fresh),
                Err(e) if e.is_retryable() && tries < 4 => {
                    tokio::time::sleep(crate::transition::unavailable_delay(tries, fastrand::f64())).await;
                }
                Err(e) => {
                    return Err(Error::Unavailable(format!(
                        "signal `{name}` of order {order} is kept, but the order could not be woken: {e}"
                    )))
                }
            }
        }
    }

    /// Read from the bucket stream's leader, not by the bucket's own read
    /// (a direct get, which any replica answers): a replica a moment
    /// behind would not have a signal that was just stored and woke the
    /// order, which would then sleep until its deadline.
    pub(super) async fn get_signal(&self, order: &OrderId, name: &SignalName) -> Result<Option<KeptSignal>, Error> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let kv = self.signals().await?;
        let subject = format!("{}{}", kv.prefix, key(order, name));
        let m = match kv.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(nats_err(&format!("cannot read signal `{name}` of order {order}"), e)),
        };
        // A deleted or purged key is a marker, not a signal.
        let op = m
            .headers
            .get(crate::headers::KV_OPERATION)
            .map(|v| v.as_str().to_owned());
        if matches!(op.as_deref(), Some("DEL" | "PURGE")) {
            return Ok(None);
        }
        let at = super::log::micros(m.time.unix_timestamp_nanos());
        Some(m.payload)
            .map(|b| {
                String::from_utf8(b.to_vec())
                    .map(|data| KeptSignal { data, at })
                    .map_err(|_| Error::Other {
                        message: format!("signal `{name}` of order {order} is not UTF-8 JSON"),
                        retryable: false,
                    })
            })
            .transpose()
    }
}
