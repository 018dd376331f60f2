//! The routes a [`Codec`](super::Codec) has seen, so a hop does not re-read
//! (or re-write) a route that every document of its workflow version shares.
//!
//! One cache per codec, shared by its clones: a worker decodes a hop and
//! encodes the next one with the same codec, so the route it decoded is
//! found again, by identity, when it writes. Bounded: a map that fills up is
//! cleared, which only costs re-reading.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwapOption;

use super::wire::{WireRoute, WireRouteRef};
use super::{DecodeError, EncodeError};
use crate::hash::FastState;
use crate::workflow::Route;

/// Most routes kept by each map.
const ROUTE_CACHE: usize = 1024;

/// A route and its encoded bytes.
type EncodedRoute = (Arc<Route>, Arc<[u8]>);

#[derive(Default)]
struct Routes {
    by_bytes: HashMap<Box<[u8]>, Arc<Route>, FastState>,
    /// Keyed by the `Arc`'s address; the entry holds the `Arc`, so the
    /// address cannot be reused while it is cached.
    by_ptr: HashMap<usize, EncodedRoute, FastState>,
}

/// The route read last, and its bytes.
struct Last {
    bytes: Box<[u8]>,
    route: Arc<Route>,
}

/// Routes already seen, by their encoded bytes (decoding) and by identity
/// (encoding).
#[derive(Default)]
pub(super) struct RouteCache {
    /// Hops of one workflow version come in runs: the route read last is
    /// compared first, without hashing or locking.
    last: ArcSwapOption<Last>,
    maps: RwLock<Routes>,
}

impl RouteCache {
    /// The encoded bytes of `route`: cached by the `Arc`'s identity.
    pub(super) fn bytes_of(&self, route: &Arc<Route>) -> Result<Arc<[u8]>, EncodeError> {
        let key = Arc::as_ptr(route) as usize;
        if let Some(hit) = self
            .maps
            .read()
            .ok()
            .and_then(|m| m.by_ptr.get(&key).map(|e| e.1.clone()))
        {
            return Ok(hit);
        }
        let bytes: Arc<[u8]> = postcard::to_stdvec(&WireRouteRef::from(&**route))
            .map_err(|e| EncodeError::Failed(e.to_string()))?
            .into();
        if let Ok(mut m) = self.maps.write() {
            if m.by_ptr.len() >= ROUTE_CACHE {
                m.by_ptr.clear();
            }
            m.by_ptr.insert(key, (route.clone(), bytes.clone()));
        }
        Ok(bytes)
    }

    /// The route encoded as `bytes`: from the cache, or decoded, checked and
    /// cached.
    pub(super) fn intern(&self, bytes: &[u8]) -> Result<Arc<Route>, DecodeError> {
        if let Some(last) = &*self.last.load() {
            if *last.bytes == *bytes {
                return Ok(last.route.clone());
            }
        }
        let route = self.intern_shared(bytes)?;
        self.last.store(Some(Arc::new(Last {
            bytes: bytes.into(),
            route: route.clone(),
        })));
        Ok(route)
    }

    fn intern_shared(&self, bytes: &[u8]) -> Result<Arc<Route>, DecodeError> {
        if let Some(hit) = self.maps.read().ok().and_then(|m| m.by_bytes.get(bytes).cloned()) {
            return Ok(hit);
        }
        let wire: WireRoute = match postcard::take_from_bytes(bytes) {
            Ok((route, [])) => route,
            Ok((_, rest)) => {
                return Err(DecodeError::Malformed(format!(
                    "route has {} trailing bytes",
                    rest.len()
                )))
            }
            Err(postcard::Error::DeserializeUnexpectedEnd) => return Err(DecodeError::Truncated),
            Err(e) => return Err(DecodeError::Malformed(format!("route: {e}"))),
        };
        let route = Arc::new(Route::try_from(wire)?);
        if let Ok(mut m) = self.maps.write() {
            if m.by_bytes.len() >= ROUTE_CACHE {
                m.by_bytes.clear();
            }
            m.by_bytes.insert(bytes.into(), route.clone());
            if m.by_ptr.len() < ROUTE_CACHE {
                m.by_ptr
                    .insert(Arc::as_ptr(&route) as usize, (route.clone(), Arc::from(bytes)));
            }
        }
        Ok(route)
    }

    /// How many routes are held, by bytes and by identity.
    #[cfg(test)]
    pub(super) fn len(&self) -> (usize, usize) {
        self.maps
            .read()
            .map(|m| (m.by_bytes.len(), m.by_ptr.len()))
            .unwrap_or_default()
    }
}
