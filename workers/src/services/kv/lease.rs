//! Leases: one run of an order's step acts at a time. A redelivery can
//! overlap a slow original run; the run that holds the lease in the order's
//! record acts, the other is deferred. A run acts for at most
//! [`RUN_BUDGET`]; one that fails gives its lease up as it returns.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::inventory::{Run, StockError};
use super::reservation::ResRecord;
use super::KvStock;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Lease {
    run: String,
    until_ms: u64,
}

/// The longest one run of a reservation or a release acts. A run takes
/// milliseconds; one that cannot finish in this time faces a store that is
/// away or overloaded: it gives up as an unavailable store (the step waits
/// and tries again, spending no attempt) and lets its lease go. The lease
/// is this long plus [`LEASE_MARGIN`], so a run whose worker died holds the
/// order back 6.5 s, not the step's whole timeout (10 s) plus 5 s: the
/// fault suite measured 15-20 s of recovery after a worker's SIGKILL, set
/// by that lease. 2.5 s was tried: under the fault suite's load (2,000
/// orders, 512 in flight, debug build on 2 cores) 84 reservations of the
/// run without faults took longer and waited, and its order p99 rose from
/// 2.9 s to 5.3 s, for no gain in recovery (p99 11.5 s against 11.1 s).
const RUN_BUDGET: Duration = Duration::from_millis(5000);

/// Added to a run's budget in its lease: covers a write still in flight
/// when the run gives up, and clock differences between hosts (the lease
/// is wall-clock time; hosts must agree within this margin).
const LEASE_MARGIN: Duration = Duration::from_millis(1500);

/// How long one run may act: [`RUN_BUDGET`], within its step's time.
pub(super) fn run_budget(run: Run) -> Duration {
    super::super::store_budget(run.window).min(RUN_BUDGET)
}

/// How long giving up a lease may take, each of its two calls: the run
/// keeps [`STORE_MARGIN`](super::super::STORE_MARGIN) of its step's time for it.
const LET_GO_WITHIN: Duration = Duration::from_millis(900);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A fresh lease for a run.
pub(super) fn lease(id: &str, run: Run) -> Lease {
    let ms = u64::try_from((run_budget(run) + LEASE_MARGIN).as_millis()).unwrap_or(u64::MAX);
    Lease {
        run: id.to_owned(),
        until_ms: now_ms().saturating_add(ms),
    }
}

/// Runs one run of a step within its budget ([`run_budget`]): a store that
/// does not answer by then is unavailable, and the run still has time to
/// give up its lease.
pub(super) async fn within_run<T>(
    run: Run,
    op: impl std::future::Future<Output = Result<T, StockError>>,
) -> Result<T, StockError> {
    let budget = run_budget(run);
    match tokio::time::timeout(budget, op).await {
        Ok(r) => r,
        Err(_) => Err(StockError::Unavailable(format!(
            "the stock store did not answer within {} ms",
            budget.as_millis()
        ))),
    }
}

impl KvStock {
    /// Takes the order's lease for this run, or defers while another run
    /// holds it.
    pub(super) async fn take_lease(
        &self,
        order: &str,
        mut rec: ResRecord,
        rev: u64,
        id: &str,
        run: Run,
    ) -> Result<(ResRecord, u64), StockError> {
        if let Some(l) = &rec.lease {
            let now = now_ms();
            if l.run != id && l.until_ms > now {
                return Err(StockError::Busy(Duration::from_millis(l.until_ms - now)));
            }
        }
        rec.lease = Some(lease(id, run));
        let rev = self.save(order, &rec, rev).await?;
        Ok((rec, rev))
    }

    /// Gives up the order's lease after a run failed with an error (best
    /// effort): the step's next attempt then goes ahead at once instead of
    /// waiting for the lease to lapse. A run that dies or hangs cannot, and
    /// its lease lapses after the step's timeout plus the margin.
    pub(super) async fn let_go(&self, key: &str, id: &str) {
        // Bounded: with the store away, the lease lapses by itself.
        let Ok(Ok(Some((mut rec, rev)))) = tokio::time::timeout(LET_GO_WITHIN, self.record(key)).await else {
            return;
        };
        if rec.lease.as_ref().is_some_and(|l| l.run == id) {
            rec.lease = None;
            match tokio::time::timeout(LET_GO_WITHIN, self.save(key, &rec, rev)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(order = key, error = %e, "could not give up the lease"),
                Err(_) => tracing::debug!(order = key, "could not give up the lease in time"),
            }
        }
    }
}
