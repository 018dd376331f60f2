//! Telling NATS errors apart by their kinds and codes, never their text.
//!
//! async-nats reports one error per operation (`PublishError`,
//! `kv::UpdateError`, `DirectGetError`, …), often wrapping another as its
//! `source`: a KV update that lost its compare-and-swap is an `UpdateError`
//! whose source is a `PublishError` whose source is the server's JetStream
//! error with its code. [`classify`] walks that chain and answers with the
//! first thing it recognises:
//!
//! - [`Fault::Conflict`]: another writer was first (a compare-and-swap or a
//!   create that lost). A single server answers code 10071 (which async-nats
//!   maps to `WrongLastSequence`); a clustered one answers 10164, which
//!   async-nats 0.51 does not know and reports as `Other` with the code
//!   inside.
//! - [`Fault::Unavailable`]: the infrastructure is away for now: no
//!   responders (status 503), no stream (while a replicated stream or
//!   bucket elects its leader), a time-out, a lost or broken connection,
//!   JetStream not ready or not enough of the cluster. The same request later
//!   may succeed; it is never a business failure.
//! - [`Fault::Other`]: anything else (a bad key, a malformed answer).

use std::error::Error as StdError;

use async_nats::jetstream::context::{
    AccountErrorKind, CreateStreamErrorKind, GetStreamErrorKind, PublishErrorKind,
    RequestErrorKind as JsRequestErrorKind,
};
use async_nats::jetstream::kv::{CreateErrorKind, EntryErrorKind, PutErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::{ConsumerErrorKind, DirectGetErrorKind, LastRawMessageErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::{ConnectErrorKind, RequestErrorKind};

/// What an error of NATS comes to, for deciding what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Another writer was first: read again and decide again.
    Conflict,
    /// The infrastructure is unavailable for now: wait and try again.
    Unavailable,
    /// Neither: trying again will not help.
    Other,
}

/// The server's code for a lost compare-and-swap in a cluster ("wrong last
/// sequence", its constant form), unknown to async-nats 0.51.
const CLUSTERED_WRONG_LAST_SEQUENCE: ErrorCode = ErrorCode(10164);

/// The server's code for an atomic batch that did not arrive whole (a
/// message lost with a connection, or the batch abandoned after a pause):
/// nothing of it was stored, and sending it again may succeed.
const ATOMIC_BATCH_INCOMPLETE: ErrorCode = ErrorCode(10176);

/// Classifies an error of async-nats (any of its operations), walking its
/// chain of sources.
pub fn classify(e: &(dyn StdError + 'static)) -> Fault {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(f) = classify_one(err) {
            return f;
        }
        cur = err.source();
    }
    Fault::Other
}

/// Whether `e` is an unavailable infrastructure (see [`Fault::Unavailable`]).
pub fn is_unavailable(e: &(dyn StdError + 'static)) -> bool {
    classify(e) == Fault::Unavailable
}

/// Whether `e` says another writer was first (see [`Fault::Conflict`]).
pub fn is_conflict(e: &(dyn StdError + 'static)) -> bool {
    classify(e) == Fault::Conflict
}

/// What one link of the chain says, if it says anything for sure.
fn classify_one(e: &(dyn StdError + 'static)) -> Option<Fault> {
    use Fault::{Conflict, Unavailable};
    type E<K> = async_nats::error::Error<K>;
    if let Some(e) = e.downcast_ref::<async_nats::jetstream::Error>() {
        return Some(api_error(e));
    }
    if let Some(e) = e.downcast_ref::<E<PublishErrorKind>>() {
        return match e.kind() {
            PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => Some(Conflict),
            PublishErrorKind::StreamNotFound
            | PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending => Some(Unavailable),
            PublishErrorKind::MaxPayloadExceeded => Some(Fault::Other),
            PublishErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<UpdateErrorKind>>() {
        return match e.kind() {
            UpdateErrorKind::WrongLastRevision => Some(Conflict),
            UpdateErrorKind::TimedOut => Some(Unavailable),
            UpdateErrorKind::InvalidKey => Some(Fault::Other),
            UpdateErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<CreateErrorKind>>() {
        return match e.kind() {
            CreateErrorKind::AlreadyExists => Some(Conflict),
            CreateErrorKind::InvalidKey => Some(Fault::Other),
            // `Publish` and `Ack` wrap the publish's own error (or none, for
            // a time-out): look deeper, else it is the store being away.
            CreateErrorKind::Publish | CreateErrorKind::Ack => {
                Some(e.source().and_then(classify_one).unwrap_or(Unavailable))
            }
            CreateErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<PutErrorKind>>() {
        return match e.kind() {
            PutErrorKind::InvalidKey => Some(Fault::Other),
            PutErrorKind::Publish | PutErrorKind::Ack => Some(e.source().and_then(classify_one).unwrap_or(Unavailable)),
        };
    }
    if let Some(e) = e.downcast_ref::<E<EntryErrorKind>>() {
        return match e.kind() {
            EntryErrorKind::TimedOut => Some(Unavailable),
            EntryErrorKind::InvalidKey => Some(Fault::Other),
            EntryErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<DirectGetErrorKind>>() {
        return match e.kind() {
            DirectGetErrorKind::TimedOut | DirectGetErrorKind::Request => Some(Unavailable),
            DirectGetErrorKind::ErrorResponse(status, _) => Some(
                if status == async_nats::StatusCode::NO_RESPONDERS || status.as_u16() >= 500 {
                    Unavailable
                } else {
                    Fault::Other
                },
            ),
            DirectGetErrorKind::NotFound | DirectGetErrorKind::InvalidSubject => Some(Fault::Other),
            DirectGetErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<LastRawMessageErrorKind>>() {
        return match e.kind() {
            LastRawMessageErrorKind::JetStream(api) => Some(api_error(&api)),
            LastRawMessageErrorKind::NoMessageFound | LastRawMessageErrorKind::InvalidSubject => Some(Fault::Other),
            LastRawMessageErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<RequestErrorKind>>() {
        return match e.kind() {
            RequestErrorKind::TimedOut | RequestErrorKind::NoResponders => Some(Unavailable),
            RequestErrorKind::InvalidSubject | RequestErrorKind::MaxPayloadExceeded => Some(Fault::Other),
            RequestErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<JsRequestErrorKind>>() {
        return match e.kind() {
            JsRequestErrorKind::TimedOut | JsRequestErrorKind::NoResponders => Some(Unavailable),
            JsRequestErrorKind::InvalidSubject => Some(Fault::Other),
            JsRequestErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<GetStreamErrorKind>>() {
        return match e.kind() {
            GetStreamErrorKind::JetStream(api) => Some(api_error(&api)),
            GetStreamErrorKind::Request => Some(Unavailable),
            GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => Some(Fault::Other),
        };
    }
    if let Some(e) = e.downcast_ref::<E<CreateStreamErrorKind>>() {
        return match e.kind() {
            CreateStreamErrorKind::JetStream(api) => Some(api_error(&api)),
            CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => Some(Unavailable),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<ConsumerErrorKind>>() {
        return match e.kind() {
            ConsumerErrorKind::JetStream(api) => Some(api_error(&api)),
            ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => Some(Unavailable),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<AccountErrorKind>>() {
        return match e.kind() {
            AccountErrorKind::JetStream(api) => Some(api_error(&api)),
            AccountErrorKind::TimedOut | AccountErrorKind::JetStreamUnavailable => Some(Unavailable),
            AccountErrorKind::Other => None,
        };
    }
    if let Some(e) = e.downcast_ref::<E<ConnectErrorKind>>() {
        return Some(match e.kind() {
            ConnectErrorKind::TimedOut
            | ConnectErrorKind::Io
            | ConnectErrorKind::Dns
            | ConnectErrorKind::MaxReconnects => Unavailable,
            _ => Fault::Other,
        });
    }
    if e.downcast_ref::<std::io::Error>().is_some() || e.downcast_ref::<tokio::time::error::Elapsed>().is_some() {
        return Some(Unavailable);
    }
    None
}

/// What an error answered by the JetStream API says.
fn api_error(e: &async_nats::jetstream::Error) -> Fault {
    let code = e.error_code();
    if code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
        || code == CLUSTERED_WRONG_LAST_SEQUENCE
        || code == ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID
    {
        return Fault::Conflict;
    }
    let away = [
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::CLUSTER_NOT_ACTIVE,
        ErrorCode::CLUSTER_INCOMPLETE,
        ErrorCode::CLUSTER_NOT_ASSIGNED,
        ErrorCode::CLUSTER_NO_PEERS,
        ErrorCode::JETSTREAM_NOT_ENABLED,
        ErrorCode::STREAM_NOT_FOUND,
        ATOMIC_BATCH_INCOMPLETE,
    ];
    if away.contains(&code) || e.code() == 503 || e.code() == 408 {
        Fault::Unavailable
    } else {
        Fault::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::PublishError;
    use async_nats::jetstream::kv::{CreateError, EntryError, UpdateError};

    fn api(code: usize, err_code: u64) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({"code": code, "err_code": err_code, "description": "x"})).unwrap()
    }

    #[test]
    fn lost_races_are_conflicts_single_or_clustered() {
        // A single server: async-nats knows the code.
        let single: UpdateError = PublishError::new(PublishErrorKind::WrongLastSequence).into();
        assert_eq!(classify(&single), Fault::Conflict);
        // A cluster's 10164 arrives as `Other` with the API error inside.
        let clustered: UpdateError = PublishError::with_source(PublishErrorKind::Other, api(400, 10164)).into();
        assert_eq!(clustered.kind(), UpdateErrorKind::Other);
        assert_eq!(classify(&clustered), Fault::Conflict);
        let exists: CreateError = clustered.into();
        assert_eq!(classify(&exists), Fault::Conflict);
    }

    #[test]
    fn outages_are_unavailable() {
        for kind in [
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
        ] {
            let u: UpdateError = PublishError::new(kind).into();
            assert_eq!(classify(&u), Fault::Unavailable, "{kind:?}");
            let c: CreateError = u.into();
            assert_eq!(classify(&c), Fault::Unavailable, "{kind:?}");
        }
        let no_responders: async_nats::jetstream::stream::DirectGetError =
            async_nats::RequestError::new(RequestErrorKind::NoResponders).into();
        let entry = EntryError::with_source(EntryErrorKind::Other, no_responders);
        assert_eq!(classify(&entry), Fault::Unavailable);
        assert_eq!(classify(&EntryError::new(EntryErrorKind::TimedOut)), Fault::Unavailable);
        let not_ready = PublishError::with_source(PublishErrorKind::Other, api(503, 10008));
        assert_eq!(classify(&not_ready), Fault::Unavailable);
    }

    #[test]
    fn the_rest_is_other() {
        assert_eq!(classify(&UpdateError::new(UpdateErrorKind::InvalidKey)), Fault::Other);
        let bad = PublishError::with_source(PublishErrorKind::Other, api(400, 10003));
        assert_eq!(classify(&bad), Fault::Other);
        let plain = std::fmt::Error;
        assert_eq!(classify(&plain), Fault::Other);
    }
}
