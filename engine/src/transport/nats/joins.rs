//! Joins over NATS: one KV bucket, `waybill_joins`, a key per order and
//! fork (`<order>.<fork>`) holding the join's record ([`crate::join`]).
//! Written with compare-and-set on the key's revision: the fork creates
//! it, each branch's arrival updates it at the revision it read, and a
//! write that lost the race is read again.

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::{nats_err, Nats};
use crate::id::OrderId;
use crate::transport::Error;

/// The bucket of joins' records.
pub const JOINS_BUCKET: &str = "waybill_joins";

fn key(order: &OrderId, fork: u8) -> String {
    format!("{order}.{fork}")
}

impl Nats {
    pub(super) fn joins_config(&self) -> kv::Config {
        kv::Config {
            bucket: JOINS_BUCKET.into(),
            description: "Joins of orders' parallel branches (key: <order>.<fork>; value: the join's record)".into(),
            history: 1,
            // As long as the hops are kept: no order outlives them.
            max_age: self.config.max_age,
            num_replicas: self.config.replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        }
    }

    /// The bucket, opened once per connection (its clones share it).
    async fn joins(&self) -> Result<&kv::Store, Error> {
        self.joins.get_or_try_init(|| self.key_value(JOINS_BUCKET)).await
    }

    /// Read from the bucket stream's leader, not by a direct get that any
    /// replica answers: a record a moment old would lose its write anyway,
    /// but a stop check reading one would let a branch run a step after
    /// its join was decided.
    pub(super) async fn get_join(&self, order: &OrderId, fork: u8) -> Result<Option<(Bytes, u64)>, Error> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let kv = self.joins().await?;
        let subject = format!("{}{}", kv.prefix, key(order, fork));
        let m = match kv.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(nats_err(&format!("cannot read the join of fork {fork} of order {order}"), e)),
        };
        let op = m.headers.get(crate::headers::KV_OPERATION).map(|v| v.as_str().to_owned());
        if matches!(op.as_deref(), Some("DEL" | "PURGE")) {
            return Ok(None);
        }
        Ok(Some((m.payload, m.sequence)))
    }

    pub(super) async fn put_join(&self, order: OrderId, fork: u8, state: Bytes, expected: u64) -> Result<bool, Error> {
        let kv = self.joins().await?;
        let what = || format!("cannot write the join of fork {fork} of order {order}");
        if expected == 0 {
            return match kv.create(key(&order, fork), state).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(nats_err(&what(), e)),
            };
        }
        match kv.update(key(&order, fork), state, expected).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(nats_err(&what(), e)),
        }
    }
}
