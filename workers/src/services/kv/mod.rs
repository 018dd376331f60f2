//! The services' state in NATS KV buckets, shared by every process of a
//! service on any host. There is no shared database: each service owns its
//! buckets.
//!
//! - `payments`: key = order id, value `{"amount_cents", "charged",
//!   "refunded"}`. A charge is a `create` (it fails if the key exists), so an
//!   order cannot be charged twice whatever the redeliveries or processes; a
//!   refund is a compare-and-swap.
//! - `inventory`: the stock levels (`sku.<SKU>` = `{"available",
//!   "reserved"}`) and what the inventory did for each order
//!   (`order.<id>`: its lines and whether they are reserved, were short,
//!   were released, or the order was closed first), in one bucket so that
//!   one atomic batch (nats-server 2.12+) changes both. A reservation of
//!   several lines is all or nothing and costs one batch: the order's
//!   record and, shared with the other orders committed with it, the
//!   levels of its SKUs ([`commit`]).
//!
//! The files: `store` (reading and writing values, and store errors told
//! apart by kind and code), `payment` (the ledger), `record` (the
//! inventory's keys and values), `commit` (group commit of reservations
//! and releases), `stock` (the inventory's store) and `stats` (what a
//! process asked of its buckets).

mod commit;
mod payment;
mod record;
pub mod stats;
mod stock;
mod store;

use std::collections::BTreeMap;

use async_nats::jetstream::kv::{self, Store};
use waybill::transport::fault;
use waybill::transport::nats::Nats;
use waybill::transport::Error as TransportError;

pub use payment::KvLedger;
pub use stock::KvStock;

use record::SkuValue;
use store::{check_key, encode};

/// The payment ledger's bucket.
pub const PAYMENTS: &str = "payments";
/// Stock levels per SKU and what the inventory did for each order.
pub const INVENTORY: &str = "inventory";

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
    for bucket in [PAYMENTS, INVENTORY] {
        match nats.key_value(bucket).await {
            Ok(_) => continue,
            // Missing: create it.
            Err(TransportError::BadConfig(_)) => {}
            Err(e) => return Err(kv_err(bucket, e)),
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
    // The inventory changes a reservation's levels and record in one
    // atomic batch.
    let inventory = open(nats, INVENTORY).await?;
    nats.allow_atomic_publish(&inventory.stream_name)
        .await
        .map_err(|e| kv_err(INVENTORY, e))
}

/// Opens a bucket that `waybill setup` created.
pub async fn open(nats: &Nats, bucket: &'static str) -> Result<Store, KvError> {
    nats.key_value(bucket).await.map_err(|e| match e {
        TransportError::BadConfig(e) => kv_err(bucket, format!("is not there ({e}); create it with `waybill setup`")),
        e => kv_err(bucket, e),
    })
}

/// How long seeding waits out an unavailable bucket: a replicated bucket
/// just created answers "no responders" until it has elected its leader.
const SEED_UNAVAILABLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Seeds stock levels; SKUs that already have a level keep it (setup is
/// idempotent and never resets live stock). Returns how many were created.
/// An unavailable bucket (no leader yet, a node away) is tried again, 50 ms
/// doubling to 1 s apart, for up to 30 s: a fault of the infrastructure
/// delays the setup, it does not fail it.
pub async fn seed_stock(nats: &Nats, stock: &BTreeMap<String, i64>) -> Result<usize, KvError> {
    let store = open(nats, INVENTORY).await?;
    let mut created = 0;
    for (sku, &available) in stock {
        check_key(sku).map_err(|e| kv_err(INVENTORY, e))?;
        let value = SkuValue { available, reserved: 0 };
        let deadline = tokio::time::Instant::now() + SEED_UNAVAILABLE_LIMIT;
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            match store.create(record::sku_key(sku), encode(&value)).await {
                Ok(_) => created += 1,
                Err(e) if fault::is_conflict(&e) => {}
                Err(e) if fault::is_unavailable(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::info!(%sku, error = %e, "the inventory bucket is unavailable; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(kv_err(INVENTORY, e)),
            }
            break;
        }
    }
    Ok(created)
}
