//! A fast hasher for maps keyed by Waybill's own ids.
//!
//! Order ids are UUID v7: their low 64 bits are random, so a multiplicative
//! mix is enough; std's SipHash showed in profiles. These maps are keyed by
//! ids the engine made or validated; they are not exposed to arbitrary keys
//! chosen by a remote party.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The hasher; see the module documentation.
#[derive(Default, Debug, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(buf));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// Builds [`FastHasher`]s.
pub type FastState = BuildHasherDefault<FastHasher>;

/// A `HashMap` with the fast hasher.
pub type FastMap<K, V> = HashMap<K, V, FastState>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OrderId;

    #[test]
    fn distinct_ids_spread() {
        let mut m: FastMap<OrderId, u32> = FastMap::default();
        for i in 0..10_000 {
            m.insert(OrderId::new(), i);
        }
        assert_eq!(m.len(), 10_000);
    }
}
