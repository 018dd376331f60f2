//! Prometheus metrics over HTTP: `GET /metrics` on the address a worker's
//! `--metrics` names, in the OpenMetrics text format, with the process's
//! CPU time and memory and the build's version beside the series given.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Why the metrics cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct MetricsError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// OpenMetrics text, as Prometheus asks for it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry with the process's and the build's series in it already.
pub fn registry(program: &str) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "waybill_build",
        "The program and its version",
        Info::new(vec![
            ("program".to_owned(), program.to_owned()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ]),
    );
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// Serves `registry` at `http://<addr>/metrics` from a task of its own,
/// until the runtime stops; returns the address bound (`addr` may ask for
/// port 0).
pub async fn serve(addr: &str, registry: Registry) -> Result<SocketAddr, MetricsError> {
    serve_router(addr, router(registry)).await
}

/// `GET /metrics`: `registry` in the OpenMetrics text format.
pub fn router<S: Clone + Send + Sync + 'static>(registry: Registry) -> Router<S> {
    let registry = Arc::new(registry);
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (StatusCode::OK, [(CONTENT_TYPE, OPENMETRICS)], body),
                    Err(e) => {
                        tracing::error!(error = %e, "could not encode the metrics");
                        let why = format!("cannot encode the metrics: {e}\n");
                        (StatusCode::INTERNAL_SERVER_ERROR, [(CONTENT_TYPE, "text/plain")], why)
                    }
                }
            }
        }),
    )
}

/// Serves `app` at `addr` from a task of its own, until the runtime stops;
/// returns the address bound (`addr` may ask for port 0).
pub async fn serve_router(addr: &str, app: Router) -> Result<SocketAddr, MetricsError> {
    let fail = |source| MetricsError {
        addr: addr.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    Ok(bound)
}

/// `process_cpu_seconds_total` and `process_resident_memory_bytes`, read
/// from `/proc/self` at each scrape (Linux; elsewhere they are left out).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = cpu_seconds() {
            let c = ConstCounter::new(cpu);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        if let Some(rss) = resident_bytes() {
            let g = ConstGauge::new(rss);
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        Ok(())
    }
}

/// utime + stime of `/proc/self/stat`, in clock ticks of 1/100 s (Linux's
/// USER_HZ).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// VmRSS of `/proc/self/status`.
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_reads_its_own_cpu_and_memory() {
        assert!(super::cpu_seconds().is_some_and(|s| s >= 0.0));
        assert!(super::resident_bytes().is_some_and(|b| b > 0));
    }
}

/// The coordinator's series, read from its view at each scrape:
/// `waybill_orders{workflow,status}` (tracked in memory),
/// `waybill_orders_waiting_on_infrastructure`, `waybill_orders_in_flight`,
/// `waybill_orders_waiting{workflow,step}` (in flight, by the step their
/// latest hop is for), `waybill_orders_stalled`,
/// `waybill_orders_finished_total{status}` (since the view began),
/// `waybill_coordinator_hops_read_total` and
/// `waybill_coordinator_redriven_total`.
#[derive(Debug)]
pub struct CoordinatorCollector<T>(pub waybill::coordinator::CoordinatorCounts<T>);

impl<T: std::fmt::Debug + Send + Sync + 'static> Collector for CoordinatorCollector<T> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let summary = self.0.summary();
        let feed = self.0.feed_stats();
        let mut gauge = |name: &str, help: &str, pairs: Vec<(Vec<(&str, String)>, u64)>| {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (labels, value) in pairs {
                let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                g.encode(family.encode_family(&labels)?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        let by_workflow = summary
            .by_workflow
            .iter()
            .flat_map(|(w, counts)| {
                counts
                    .iter()
                    .map(move |(s, n)| (vec![("workflow", w.clone()), ("status", s.to_string())], *n))
            })
            .collect();
        gauge(
            "waybill_orders",
            "Orders tracked in memory (in flight, and finished within the retention), by workflow and status",
            by_workflow,
        )?;
        gauge(
            "waybill_orders_waiting_on_infrastructure",
            "Orders in flight whose step waits on unavailable infrastructure (no attempt spent)",
            vec![(Vec::new(), summary.waiting)],
        )?;
        gauge(
            "waybill_orders_in_flight",
            "Orders not finished",
            vec![(Vec::new(), summary.in_flight)],
        )?;
        let waiting = summary
            .by_step
            .iter()
            .map(|(key, n)| {
                let (workflow, step) = key.split_once('/').unwrap_or(("", key));
                (vec![("workflow", workflow.to_owned()), ("step", step.to_owned())], *n)
            })
            .collect();
        gauge(
            "waybill_orders_waiting",
            "Orders in flight, by the step their latest hop is for",
            waiting,
        )?;
        gauge(
            "waybill_orders_stalled",
            "Orders in flight past their step's deadline and the grace",
            vec![(Vec::new(), summary.stalled)],
        )?;
        let mut counter = |name: &str, help: &str, pairs: Vec<(Vec<(&str, String)>, u64)>| {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (labels, value) in pairs {
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        let finished = summary
            .finished
            .iter()
            .map(|(s, n)| (vec![("status", s.to_string())], *n))
            .collect();
        counter(
            "waybill_orders_finished",
            "Orders that reached each end since this coordinator's view began",
            finished,
        )?;
        counter(
            "waybill_coordinator_hops_read",
            "Hops read from the stream",
            vec![(Vec::new(), feed.hops_read)],
        )?;
        counter(
            "waybill_coordinator_redriven",
            "Stalled hops republished",
            vec![(Vec::new(), feed.redriven)],
        )?;
        Ok(())
    }
}
