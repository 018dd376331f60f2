//! `waybill cancel`: one order, or every order in flight a filter takes.
//!
//! A cancel goes through the coordinator (`waybill.cancel.<id>`), which
//! refuses an order it does not know or that already ended, and records the
//! cancel for every worker: the order stops at its next hop, its completed
//! steps are undone newest first, and it ends `cancelled`. `--force` records
//! it directly, for an order no coordinator tracks.

use std::time::Duration;

use futures::StreamExt;
use waybill::coordinator::api::{OrdersQuery, OrdersReply};
use waybill::coordinator::{CoordinatorClient, Filter};
use waybill::subject;
use waybill::transport::{Rpc, Transport};
use waybill::{OrderId, Status};

use crate::ops::OpsError;

/// Cancels sent at once by a bulk cancel.
const AT_ONCE: usize = 32;

/// Why a `--where` filter cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhereError {
    #[error("`{0}` is not `key=value` (keys: status, step, workflow; e.g. `status=stalled,step=reserve`)")]
    NotAPair(String),
    #[error("unknown key `{0}` (keys: status, step, workflow)")]
    UnknownKey(String),
    #[error("`{0}` is given twice")]
    Twice(&'static str),
    #[error("status `{0}`: an order can be cancelled while running, compensating or stalled")]
    BadStatus(String),
    #[error("an empty filter would cancel every order in flight: say which, e.g. `status=stalled`")]
    Empty,
}

/// Parses `status=stalled,step=reserve,workflow=order`: the orders in
/// flight a bulk cancel takes. `status` is `running`, `compensating` or
/// `stalled` (past its step's deadline); `step` a step name or
/// `workflow/step`.
pub fn parse_where(text: &str) -> Result<Filter, WhereError> {
    let mut filter = Filter::default();
    let mut status_given = false;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| WhereError::NotAPair(part.to_owned()))?;
        match key {
            "status" => {
                if std::mem::replace(&mut status_given, true) {
                    return Err(WhereError::Twice("status"));
                }
                match value {
                    "stalled" => filter.stalled = true,
                    "running" => filter.status = Some(Status::Running),
                    "compensating" => filter.status = Some(Status::Compensating),
                    other => return Err(WhereError::BadStatus(other.to_owned())),
                }
            }
            "step" if filter.step.is_some() => return Err(WhereError::Twice("step")),
            "step" => filter.step = Some(value.to_owned()),
            "workflow" if filter.workflow.is_some() => return Err(WhereError::Twice("workflow")),
            "workflow" => filter.workflow = Some(value.to_owned()),
            other => return Err(WhereError::UnknownKey(other.to_owned())),
        }
    }
    if filter.is_empty() {
        return Err(WhereError::Empty);
    }
    Ok(filter)
}

/// Cancels one order; `Ok(false)` when a cancel of it was asked already.
/// Unless `force`, through the coordinator (an order unknown to it, or
/// ended, is an error).
pub async fn cancel_one<T: Rpc + Transport>(
    transport: &T,
    id: &str,
    reason: &str,
    force: bool,
    timeout: Duration,
) -> Result<bool, OpsError> {
    let order = id.parse::<OrderId>()?;
    if force {
        return transport
            .request_cancel(order, reason)
            .await
            .map_err(|error| OpsError::CancelNotRecorded { id: order, error });
    }
    CoordinatorClient::new(transport.clone(), timeout)
        .cancel(&order, Some(reason))
        .await
        .map(|reply| !reply.already_asked)
        .map_err(|e| OpsError::request(&subject::cancel(&order), timeout, e))
}

/// The orders in flight `filter` takes: how many, and at most `limit` ids
/// (oldest latest hop first).
pub async fn matching<T: Rpc>(
    transport: &T,
    filter: &Filter,
    limit: usize,
    timeout: Duration,
) -> Result<OrdersReply, OpsError> {
    let mut query = OrdersQuery {
        limit: Some(limit),
        stalled: filter.stalled,
        step: filter.step.clone(),
        workflow: filter.workflow.clone(),
        ..OrdersQuery::default()
    };
    query.status = filter.status;
    crate::ops::orders(transport, &query, timeout).await
}

/// What a bulk cancel did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BulkOutcome {
    pub cancelled: usize,
    pub already_asked: usize,
    /// Orders that ended in the meantime, or that a cancel could not be
    /// recorded for, and why.
    pub failed: Vec<(OrderId, String)>,
}

/// Cancels every order of `ids` through the coordinator, a few at once.
pub async fn cancel_many<T: Rpc + Transport>(
    transport: &T,
    ids: &[OrderId],
    reason: &str,
    timeout: Duration,
) -> BulkOutcome {
    let results: Vec<(OrderId, Result<bool, OpsError>)> = futures::stream::iter(ids.iter().copied())
        .map(|id| async move { (id, cancel_one(transport, &id.to_string(), reason, false, timeout).await) })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut out = BulkOutcome::default();
    for (id, r) in results {
        match r {
            Ok(true) => out.cancelled += 1,
            Ok(false) => out.already_asked += 1,
            Err(e) => out.failed.push((id, crate::cli::with_causes(&e))),
        }
    }
    out.failed.sort();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_where_filter_names_orders_in_flight() {
        let f = parse_where("status=stalled, step=reserve").unwrap();
        assert!(f.stalled);
        assert_eq!((f.status, f.step.as_deref()), (None, Some("reserve")));
        let f = parse_where("workflow=order,status=compensating").unwrap();
        assert_eq!(f.status, Some(Status::Compensating));
        assert_eq!(f.workflow.as_deref(), Some("order"));
        assert_eq!(
            parse_where("status=completed"),
            Err(WhereError::BadStatus("completed".into()))
        );
        assert_eq!(parse_where("colour=red"), Err(WhereError::UnknownKey("colour".into())));
        assert_eq!(parse_where("step"), Err(WhereError::NotAPair("step".into())));
        assert_eq!(parse_where("step="), Err(WhereError::NotAPair("step=".into())));
        assert_eq!(parse_where("step=a,step=b"), Err(WhereError::Twice("step")));
        assert_eq!(
            parse_where("status=running,status=stalled"),
            Err(WhereError::Twice("status"))
        );
        assert_eq!(parse_where(" , "), Err(WhereError::Empty));
    }
}
