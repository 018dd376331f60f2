//! The services' state in NATS KV buckets, shared by every process of a
//! service on any host. There is no shared database: each service owns its
//! buckets.
//!
//! - `payments`: key = order id, value `{"amount_cents", "charged",
//!   "refunded"}`. A charge is a `create` (it fails if the key exists), so an
//!   order cannot be charged twice whatever the redeliveries or processes; a
//!   refund is a compare-and-swap.
//! - `inventory`: key = SKU, value `{"available", "reserved"}`, changed only by
//!   compare-and-swap on the revision. Each change also records, in the same
//!   swap, a marker `"<order>:<op>"` under `"pending"`; a redelivered step
//!   that finds its marker knows its change is already made. Markers are
//!   removed once the order's own record says the change is done, so at rest
//!   a value is exactly `{"available", "reserved"}`.
//! - `reservations`: key = order id, what the inventory did for the order:
//!   the lines, which SKUs are reserved, undone or released, and the outcome.
//!   A reservation of several lines is all or nothing: if a later line is
//!   short, the earlier ones are undone before the answer is given.
//!
//! The files: `store` (reading and writing values, and store errors told
//! apart by kind and code), `payment` (the ledger), `stock` (the levels),
//! `lease` (one run of an order's step at a time) and `reservation` (the
//! inventory's protocol: reserve all or nothing, release once).

mod lease;
mod payment;
mod reservation;
mod stock;
mod store;

use std::collections::BTreeMap;

use async_nats::jetstream::kv::{self, Store};
use waybill::transport::fault;
use waybill::transport::nats::Nats;

pub use payment::KvLedger;
pub use stock::KvStock;

use stock::SkuValue;
use store::{check_key, encode};

/// The payment ledger's bucket.
pub const PAYMENTS: &str = "payments";
/// Stock levels per SKU.
pub const INVENTORY: &str = "inventory";
/// What the inventory did for each order.
pub const RESERVATIONS: &str = "reservations";

/// Why a bucket could not be created, opened or used.
#[derive(Debug, thiserror::Error)]
#[error("KV bucket `{bucket}`: {message}")]
pub struct KvError {
    pub bucket: &'static str,
    pub message: String,
}

fn kv_err(bucket: &'static str, e: impl std::fmt::Display) -> KvError {
    KvError {
        bucket,
        message: e.to_string(),
    }
}

/// Creates the services' buckets if they do not exist (`waybill setup`).
pub async fn setup_buckets(nats: &Nats, replicas: usize) -> Result<(), KvError> {
    for bucket in [PAYMENTS, INVENTORY, RESERVATIONS] {
        if nats.key_value(bucket).await.is_ok() {
            continue;
        }
        nats.create_key_value(kv::Config {
            bucket: bucket.into(),
            history: 1,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| kv_err(bucket, e))?;
    }
    Ok(())
}

/// Opens a bucket that `waybill setup` created.
pub async fn open(nats: &Nats, bucket: &'static str) -> Result<Store, KvError> {
    nats.key_value(bucket)
        .await
        .map_err(|e| kv_err(bucket, format!("is not there ({e}); create it with `waybill setup`")))
}

/// Seeds stock levels; SKUs that already have a level keep it (setup is
/// idempotent and never resets live stock). Returns how many were created.
pub async fn seed_stock(nats: &Nats, stock: &BTreeMap<String, i64>) -> Result<usize, KvError> {
    let store = open(nats, INVENTORY).await?;
    let mut created = 0;
    for (sku, &available) in stock {
        check_key(sku).map_err(|e| kv_err(INVENTORY, e))?;
        let value = SkuValue {
            available,
            reserved: 0,
            pending: BTreeMap::new(),
        };
        match store.create(sku, encode(&value)).await {
            Ok(_) => created += 1,
            Err(e) if fault::is_conflict(&e) => {}
            Err(e) => return Err(kv_err(INVENTORY, e)),
        }
    }
    Ok(created)
}
