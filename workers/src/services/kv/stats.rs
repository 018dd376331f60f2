//! Counts of what the services asked of their buckets in this process:
//! reads, stored writes (each message of an atomic batch counts), atomic
//! batches and lost compare-and-swaps. A worker prints them once as it
//! exits (`kv ops: reads=R writes=W conflicts=C`), so a benchmark can say
//! what an order costs the store.

use std::sync::atomic::{AtomicU64, Ordering};

static READS: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static BATCHES: AtomicU64 = AtomicU64::new(0);
static CONFLICTS: AtomicU64 = AtomicU64::new(0);

/// The counts so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvOps {
    pub reads: u64,
    pub writes: u64,
    pub batches: u64,
    pub conflicts: u64,
}

impl KvOps {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for KvOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kv ops: reads={} writes={} conflicts={} batches={}",
            self.reads, self.writes, self.conflicts, self.batches
        )
    }
}

/// The counts of this process so far.
pub fn snapshot() -> KvOps {
    KvOps {
        reads: READS.load(Ordering::Relaxed),
        writes: WRITES.load(Ordering::Relaxed),
        batches: BATCHES.load(Ordering::Relaxed),
        conflicts: CONFLICTS.load(Ordering::Relaxed),
    }
}

pub(super) fn read() {
    READS.fetch_add(1, Ordering::Relaxed);
}

pub(super) fn written(messages: usize) {
    WRITES.fetch_add(messages as u64, Ordering::Relaxed);
}

pub(super) fn batch() {
    BATCHES.fetch_add(1, Ordering::Relaxed);
}

pub(super) fn conflict() {
    CONFLICTS.fetch_add(1, Ordering::Relaxed);
}
