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

use super::wire::{RouteStepV2, RouteV3, WireRoute, WireRouteRef, WireRouteRefV3, WireStepRef, WireStepRefV2};
use super::{DecodeError, EncodeError};
use crate::hash::FastState;
use crate::workflow::Route;

/// Most routes kept by each map.
const ROUTE_CACHE: usize = 1024;

/// A route, the envelope version it is written in, and its encoded bytes.
type EncodedRoute = (Arc<Route>, RouteBytes);

/// A route's encoded bytes and the envelope version they are written in.
pub(super) type RouteBytes = (u8, Arc<[u8]>);

/// The envelope version a route is written in: the oldest that holds it
/// (3 with forks, 2 with a step that waits, 1 otherwise), so that builds
/// which read only older versions keep reading every route that does not
/// use what a newer one added.
pub(super) fn version_of(route: &Route) -> u8 {
    if !route.forks.is_empty() {
        3
    } else if route.steps.iter().any(|s| s.wait.is_some()) {
        2
    } else {
        1
    }
}

#[derive(Default)]
struct Routes {
    /// Version 1's routes, then version 2's and 3's: the same bytes read
    /// differently in each.
    by_bytes: [HashMap<Box<[u8]>, Arc<Route>, FastState>; 3],
    /// Keyed by the `Arc`'s address; the entry holds the `Arc`, so the
    /// address cannot be reused while it is cached.
    by_ptr: HashMap<usize, EncodedRoute, FastState>,
}

/// The route read last, and its bytes.
struct Last {
    version: u8,
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
    /// The encoded bytes of `route` and their envelope version: cached by
    /// the `Arc`'s identity.
    pub(super) fn bytes_of(&self, route: &Arc<Route>) -> Result<RouteBytes, EncodeError> {
        let key = Arc::as_ptr(route) as usize;
        if let Some(hit) = self
            .maps
            .read()
            .ok()
            .and_then(|m| m.by_ptr.get(&key).map(|e| e.1.clone()))
        {
            return Ok(hit);
        }
        let version = version_of(route);
        let written = match version {
            1 => postcard::to_stdvec(&WireRouteRef::<'_, WireStepRef<'_>>::from(&**route)),
            2 => postcard::to_stdvec(&WireRouteRef::<'_, WireStepRefV2<'_>>::from(&**route)),
            _ => postcard::to_stdvec(&WireRouteRefV3::from(&**route)),
        };
        let bytes: Arc<[u8]> = written.map_err(|e| EncodeError::Failed(e.to_string()))?.into();
        if let Ok(mut m) = self.maps.write() {
            if m.by_ptr.len() >= ROUTE_CACHE {
                m.by_ptr.clear();
            }
            m.by_ptr.insert(key, (route.clone(), (version, bytes.clone())));
        }
        Ok((version, bytes))
    }

    /// The route encoded as `bytes` in envelope `version` (1 to 3): from
    /// the cache, or decoded, checked and cached.
    pub(super) fn intern(&self, version: u8, bytes: &[u8]) -> Result<Arc<Route>, DecodeError> {
        if let Some(last) = &*self.last.load() {
            if last.version == version && *last.bytes == *bytes {
                return Ok(last.route.clone());
            }
        }
        let route = self.intern_shared(version, bytes)?;
        self.last.store(Some(Arc::new(Last {
            version,
            bytes: bytes.into(),
            route: route.clone(),
        })));
        Ok(route)
    }

    fn intern_shared(&self, version: u8, bytes: &[u8]) -> Result<Arc<Route>, DecodeError> {
        let slot = usize::from(version.clamp(1, 3) - 1);
        if let Some(hit) = self.maps.read().ok().and_then(|m| m.by_bytes[slot].get(bytes).cloned()) {
            return Ok(hit);
        }
        let route = Arc::new(match version {
            1 => Route::try_from(read_route::<WireRoute>(bytes)?)?,
            2 => Route::try_from(read_route::<WireRoute<RouteStepV2>>(bytes)?)?,
            _ => Route::try_from(read_route::<RouteV3>(bytes)?)?,
        });
        if let Ok(mut m) = self.maps.write() {
            if m.by_bytes[slot].len() >= ROUTE_CACHE {
                m.by_bytes[slot].clear();
            }
            m.by_bytes[slot].insert(bytes.into(), route.clone());
            if m.by_ptr.len() < ROUTE_CACHE {
                m.by_ptr.insert(
                    Arc::as_ptr(&route) as usize,
                    (route.clone(), (version, Arc::from(bytes))),
                );
            }
        }
        Ok(route)
    }

    /// How many routes are held, by bytes and by identity.
    #[cfg(test)]
    pub(super) fn len(&self) -> (usize, usize) {
        self.maps
            .read()
            .map(|m| (m.by_bytes.iter().map(HashMap::len).sum(), m.by_ptr.len()))
            .unwrap_or_default()
    }
}

/// The whole of `bytes` as one route's wire form.
fn read_route<'b, R: serde::Deserialize<'b>>(bytes: &'b [u8]) -> Result<R, DecodeError> {
    match postcard::take_from_bytes(bytes) {
        Ok((route, [])) => Ok(route),
        Ok((_, rest)) => Err(DecodeError::Malformed(format!(
            "route has {} trailing bytes",
            rest.len()
        ))),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(DecodeError::Truncated),
        Err(e) => Err(DecodeError::Malformed(format!("route: {e}"))),
    }
}
