//! Cancels over NATS: one KV bucket, `waybill_cancels`, a key per order
//! (its id) holding the reason. `waybill cancel` creates the key; every
//! worker follows the bucket and keeps the set in memory, so a hop looks an
//! order up without asking the server.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;

use super::{nats_err, Nats};
use crate::id::OrderId;
use crate::transport::cancels::CancelSet;
use crate::transport::Error;

/// The bucket of cancels.
pub const CANCELS_BUCKET: &str = "waybill_cancels";

/// How long `follow` waits for the cancels already asked for.
const CATCH_UP: Duration = Duration::from_secs(30);

/// What the clones of one connection share: the set, and whether a task
/// follows the bucket into it.
#[derive(Debug, Default)]
pub(super) struct Cancels {
    pub(super) set: CancelSet,
    following: tokio::sync::OnceCell<()>,
}

impl Nats {
    pub(super) fn cancels_config(&self) -> kv::Config {
        kv::Config {
            bucket: CANCELS_BUCKET.into(),
            description: "Orders to cancel at their next hop (key: order id; value: the reason)".into(),
            history: 1,
            // As long as the hops are kept: no order outlives them.
            max_age: self.config.max_age,
            num_replicas: self.config.replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        }
    }

    pub(super) async fn ask_cancel(&self, order: OrderId, reason: &str) -> Result<bool, Error> {
        let kv = self.key_value(CANCELS_BUCKET).await?;
        let fresh = match kv.create(order.to_string(), reason.to_owned().into()).await {
            Ok(_) => {
                self.cancels.set.insert(order, reason.to_owned());
                true
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
            Err(e) => return Err(nats_err(&format!("cannot record the cancel of order {order}"), e)),
        };
        // Asked again, too: an earlier ask may have stopped before this.
        self.wake_timer(order, Some(reason), None).await?;
        Ok(fresh)
    }

    /// Wakes `order` if it sleeps on a timer (a step's wait, a signal's
    /// deadline, a long backoff), so that its next hop comes now: to meet
    /// its cancel (`cancel`, the reason, which the woken hop carries: it
    /// may come before the cancel reaches its worker) or its signal. The
    /// timer is published again, due now: a schedule replaces the one
    /// before it on the order's timer subject. Expected at the sequence
    /// read, so a timer that fired meanwhile is left alone (its hop is
    /// under way already).
    /// With `signal`, only a timer that waits for it (its `Waybill-Awaits`
    /// header): a signal kept for a later step leaves the order asleep.
    /// The timers of the order's branches, if it has any asleep, are
    /// woken the same way: found by their subjects, which the stream lists.
    pub(super) async fn wake_timer(
        &self,
        order: OrderId,
        cancel: Option<&str>,
        signal: Option<&crate::id::SignalName>,
    ) -> Result<(), Error> {
        use futures::TryStreamExt;
        self.wake_one(&crate::subject::timer(&order), order, cancel, signal).await?;
        let stream = self.hops().await?;
        let mut subjects = stream
            .info_with_subjects(crate::subject::branch_timers(&order))
            .await
            .map_err(|e| nats_err(&format!("cannot list the branch timers of order {order}"), e))?;
        let mut timers = Vec::new();
        while let Some((subject, _)) = subjects
            .try_next()
            .await
            .map_err(|e| nats_err(&format!("cannot list the branch timers of order {order}"), e))?
        {
            timers.push(subject);
        }
        for timer in timers {
            self.wake_one(&timer, order, cancel, signal).await?;
        }
        Ok(())
    }

    /// Wakes the timer on subject `timer` (see [`Nats::wake_timer`]).
    async fn wake_one(
        &self,
        timer: &str,
        order: OrderId,
        cancel: Option<&str>,
        signal: Option<&crate::id::SignalName>,
    ) -> Result<(), Error> {
        use async_nats::jetstream::context::PublishErrorKind;
        use async_nats::jetstream::stream::LastRawMessageErrorKind;

        let stream = self.hops().await?;
        // A cancel that loses the race to another wake (a signal's, which
        // carries no cancel) tries again on the timer that wake left, so
        // that the woken hop still says it is cancelled.
        let mut tries = 0;
        loop {
            tries += 1;
            let m = match stream.get_last_raw_message_by_subject(timer).await {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(()),
                Err(e) => return Err(nats_err(&format!("cannot read the timer of order {order}"), e)),
            };
            if cancel.is_some() && m.headers.get(crate::headers::CANCEL).is_some() {
                return Ok(());
            }
            if let Some(s) = signal {
                let awaits = m.headers.get(crate::headers::AWAITS).map(|v| v.as_str());
                if awaits != Some(s.as_str()) {
                    return Ok(());
                }
            }
            let mut headers = async_nats::HeaderMap::new();
            for (name, values) in m.headers.iter() {
                let name: &str = name.as_ref();
                let skip = name.eq_ignore_ascii_case(crate::headers::SCHEDULE)
                    || name.eq_ignore_ascii_case(crate::headers::MSG_ID);
                if let (false, Some(v)) = (skip, values.first()) {
                    headers.insert(name, v.as_str());
                }
            }
            let now = crate::coordinator::api::rfc3339(crate::document::Timestamp::now());
            headers.insert(crate::headers::SCHEDULE, format!("@at {now}").as_str());
            if let Some(reason) = cancel {
                // A header value is one line.
                let reason: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
                headers.insert(crate::headers::CANCEL, reason.as_str());
            }
            let p = async_nats::jetstream::message::PublishMessage::build()
                .payload(m.payload)
                .headers(headers)
                .expected_last_subject_sequence(m.sequence);
            let stored = self
                .js
                .send_publish(timer.to_owned(), p)
                .await
                .map_err(|e| nats_err("waking a timer failed", e))?
                .await;
            return match stored {
                Ok(_) => {
                    tracing::info!(%order, cancel = cancel.is_some(), "woke the order from its wait");
                    Ok(())
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    if cancel.is_some() && tries < 3 {
                        continue;
                    }
                    Ok(())
                }
                Err(e) => Err(nats_err("waking a timer was not acknowledged", e)),
            };
        }
    }

    /// Starts, once per connection, a task that follows the bucket into the
    /// set; returns when the cancels already asked for are in it.
    pub(super) async fn follow(&self) -> Result<(), Error> {
        self.cancels
            .following
            .get_or_try_init(|| async {
                let kv = self.key_value(CANCELS_BUCKET).await?;
                let mut watch = kv
                    .watch_with_history(">")
                    .await
                    .map_err(|e| nats_err("cannot follow the cancels", e))?;
                let known = kv
                    .status()
                    .await
                    .map_err(|e| nats_err("cannot read the cancels bucket", e))?
                    .values();
                // The ones asked for already, before serving anything.
                let caught_up = async {
                    let mut seen = 0;
                    while seen < known {
                        match watch.next().await {
                            Some(Ok(entry)) => {
                                apply(&self.cancels, &entry);
                                seen += 1;
                                if entry.delta == 0 {
                                    break;
                                }
                            }
                            Some(Err(e)) => return Err(nats_err("following the cancels failed", e)),
                            None => break,
                        }
                    }
                    Ok(())
                };
                tokio::time::timeout(CATCH_UP, caught_up).await.map_err(|_| {
                    Error::TimedOut(format!("the cancels asked for were not read within {CATCH_UP:?}"))
                })??;
                let cancels = Arc::clone(&self.cancels);
                tokio::spawn(async move {
                    while let Some(entry) = watch.next().await {
                        match entry {
                            Ok(entry) => apply(&cancels, &entry),
                            Err(e) => tracing::warn!(error = %e, "following the cancels failed"),
                        }
                    }
                    tracing::warn!("the cancels are no longer followed: a cancel asked from now on is not seen here");
                });
                Ok(())
            })
            .await
            .map(|_| ())
    }
}

fn apply(cancels: &Cancels, entry: &kv::Entry) {
    let Ok(order) = entry.key.parse::<OrderId>() else {
        tracing::warn!(key = %entry.key, "a cancel under a key that is not an order id; ignored");
        return;
    };
    match entry.operation {
        kv::Operation::Put => {
            cancels
                .set
                .insert(order, String::from_utf8_lossy(&entry.value).into_owned());
        }
        kv::Operation::Delete | kv::Operation::Purge => cancels.set.remove(&order),
    }
}
