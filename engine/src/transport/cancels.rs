//! The cancels this process knows of: asked for here, or (over NATS)
//! followed from the bucket every process writes them to. A worker looks an
//! order up at each hop, so the common case (no cancel at all) takes no
//! lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use crate::hash::FastMap;
use crate::id::OrderId;

/// Orders a cancel was asked for, and why.
#[derive(Debug, Default)]
pub struct CancelSet {
    any: AtomicBool,
    reasons: RwLock<FastMap<OrderId, String>>,
    /// Woken at every cancel noted.
    noted: tokio::sync::Notify,
}

impl CancelSet {
    /// Notes a cancel; `false` if one was noted for the order already (its
    /// first reason stays).
    pub fn insert(&self, order: OrderId, reason: String) -> bool {
        let mut reasons = self.reasons.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = !reasons.contains_key(&order);
        if new {
            reasons.insert(order, reason);
        }
        self.any.store(true, Ordering::Release);
        drop(reasons);
        self.noted.notify_waiters();
        new
    }

    /// Waits until a cancel of `order` is noted here.
    pub async fn noted(&self, order: &OrderId) {
        loop {
            let woken = self.noted.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.get(order).is_some() {
                return;
            }
            woken.await;
        }
    }

    /// Forgets a cancel (its record expired or was deleted).
    pub fn remove(&self, order: &OrderId) {
        let mut reasons = self.reasons.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        reasons.remove(order);
        self.any.store(!reasons.is_empty(), Ordering::Release);
    }

    /// Why `order` is to be cancelled, if it is.
    pub fn get(&self, order: &OrderId) -> Option<String> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let reasons = self.reasons.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        reasons.get(order).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::CancelSet;
    use crate::id::OrderId;

    #[test]
    fn a_cancel_is_noted_once_and_forgotten() {
        let set = CancelSet::default();
        let (a, b) = (OrderId::new(), OrderId::new());
        assert_eq!(set.get(&a), None);
        assert!(set.insert(a, "asked".into()));
        assert!(!set.insert(a, "again".into()));
        assert_eq!(set.get(&a).as_deref(), Some("asked"));
        assert_eq!(set.get(&b), None);
        set.remove(&a);
        assert_eq!(set.get(&a), None);
    }
}
