//! Reading and writing the buckets: values as JSON, the latest value from
//! the stream leader, SKU keys, and store errors told apart by kind and
//! code ([`fault::classify`]), never by their text.

use std::time::Duration;

use async_nats::jetstream::kv::Store;
use async_nats::jetstream::stream::LastRawMessageError;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use waybill::transport::fault::{self, Fault};

use super::super::inventory::StockError;
use super::super::payment::LedgerError;

pub(super) fn encode<T: Serialize>(v: &T) -> Bytes {
    // Plain structs of numbers, strings and maps: encoding cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// A value in a bucket that does not read as what the service stored.
#[derive(Debug, thiserror::Error)]
#[error("bucket {bucket}, key {key}: unreadable value: {source}")]
pub(super) struct Unreadable {
    bucket: &'static str,
    key: String,
    source: serde_json::Error,
}

pub(super) fn decode<T: DeserializeOwned>(bucket: &'static str, key: &str, b: &[u8]) -> Result<T, Unreadable> {
    serde_json::from_slice(b).map_err(|source| Unreadable {
        bucket,
        key: key.to_owned(),
        source,
    })
}

/// A key's latest value and revision, read from the bucket's stream leader:
/// every write acknowledged before this read is in it. `Store::entry` reads
/// with a direct get, which any replica answers, and a replica that lags
/// (a node catching up after a restart) answers with an older value. Where
/// a write follows the read, its compare-and-swap refuses a stale revision;
/// where a decision rests on the read alone (nothing left to settle,
/// nothing charged, not enough stock), the read must be this one. The
/// cluster soak found a stock marker left behind because a settle read a
/// lagging replica that did not have it yet.
async fn latest(store: &Store, key: &str) -> Result<Option<(Bytes, u64)>, LastRawMessageError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = waybill::subject::kv_key(&store.prefix, key);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => {
            let removed = m
                .headers
                .get(waybill::headers::KV_OPERATION)
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            Ok((!removed).then_some((m.payload, m.sequence)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`latest`], decoded as `T`, with the service's own errors: `unavailable`
/// for a leader that does not answer, `broken` for anything else.
pub(super) async fn latest_as<T: DeserializeOwned, E>(
    store: &Store,
    bucket: &'static str,
    key: &str,
    unavailable: fn(String) -> E,
    broken: fn(String) -> E,
) -> Result<Option<(T, u64)>, E> {
    match latest(store, key).await {
        Ok(Some((value, revision))) => {
            let value = decode(bucket, key, &value).map_err(|e| broken(e.to_string()))?;
            Ok(Some((value, revision)))
        }
        Ok(None) => Ok(None),
        Err(e) => {
            let told = match fault::classify(&e) {
                Fault::Unavailable => unavailable,
                Fault::Conflict | Fault::Other => broken,
            };
            Err(told(format!("bucket {bucket}, key {key}: {e}")))
        }
    }
}

/// Waits a little after losing a compare-and-swap race: under many
/// concurrent reservations of one SKU, retrying at once only loses again.
pub(super) async fn after_conflict(tries: &mut u32) {
    *tries += 1;
    let cap_us = 200u64 << (*tries).min(6);
    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..cap_us))).await;
}

/// A SKU that cannot be a key of the `inventory` bucket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SKU `{0}` cannot be stored: use letters, digits, `-`, `_`, `=`, `/` and `.`")]
pub(super) struct BadSku(String);

/// A SKU must be a valid KV key: letters, digits, `-`, `_`, `=`, `/`, `.`.
pub(super) fn check_key(sku: &str) -> Result<(), BadSku> {
    let ok = !sku.is_empty()
        && !sku.starts_with('.')
        && !sku.ends_with('.')
        && sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'/' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(BadSku(sku.to_owned()))
    }
}

/// A store error of the ledger, told apart by its kind and code
/// ([`fault::classify`]): an unavailable store (no responders, a leader
/// election, a time-out) is waited out without spending an attempt. A lost
/// race is handled where it can happen; anywhere else it, like the rest,
/// is an error worth a retry.
pub(super) fn ledger_err<E: std::error::Error + 'static>(e: E) -> LedgerError {
    match fault::classify(&e) {
        Fault::Unavailable => LedgerError::Unavailable(e.to_string()),
        Fault::Conflict | Fault::Other => LedgerError::Store(e.to_string()),
    }
}

/// A store error of the stock, as [`ledger_err`] tells them apart.
pub(super) fn stock_err<E: std::error::Error + 'static>(e: E) -> StockError {
    match fault::classify(&e) {
        Fault::Unavailable => StockError::Unavailable(e.to_string()),
        Fault::Conflict | Fault::Other => StockError::Store(e.to_string()),
    }
}
