//! Traces across hosts: every step's span exported to an OpenTelemetry
//! collector over OTLP/HTTP (protobuf bodies), in its order's trace.
//!
//! No trace header travels with a hop: the engine's step span carries the
//! order id and the hop number ([`waybill::trace`]), and [`HopTracer`]
//! derives the span's place from them when it starts it: trace id = order
//! id, span id = hop + 1, parent = the span of the step that published the
//! hop (hop 0's step is the root). Every process serving any of an order's
//! steps, on any host, so writes the same trace, chained hop to hop.
//!
//! Off unless asked (`--otlp-endpoint`, or `OTEL_EXPORTER_OTLP_ENDPOINT`):
//! then the programs install exactly the subscriber they always did
//! ([`crate::cli::init_logging`]) and nothing here runs. On, spans are
//! queued for a background thread (the SDK's batch processor) and exported
//! from there; a collector that is away, slow or refusing costs the worker
//! nothing but the spans ([`Guarded`]), reported at `warn` at most once a
//! minute. [`Telemetry::shutdown`] flushes what is queued: a worker calls it
//! after draining, so that the last steps' spans are not lost.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;
use waybill::trace::{HopTrace, HOP_FIELD, STEP_SPAN, TRACE_ID_FIELD};

use crate::cli::LogFormat;

/// How long one export may take (unless `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`
/// or `OTEL_EXPORTER_OTLP_TIMEOUT` say otherwise, in milliseconds): short,
/// so that a collector that does not answer holds up a stopping process
/// for little more than this.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed export, batches are dropped unsent for this long rather
/// than each waiting out a collector that is away.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// At most one warning per this long while exports fail.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The option that turns tracing on.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OtlpArgs {
    /// Export every step's span to the OpenTelemetry collector at URL, over
    /// OTLP/HTTP with protobuf bodies (the collector's HTTP port, usually
    /// 4318; spans go to URL/v1/traces). One order is one trace, whatever
    /// hosts run its steps: its trace id is the order id. Plain `http://`
    /// only (run the collector, or an agent of it, where plain HTTP is
    /// safe). A collector that is away costs the process only the spans.
    #[arg(
        long = "otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL",
        value_parser = endpoint_or_unset
    )]
    otlp_endpoint: Option<OtlpEndpoint>,
}

impl OtlpArgs {
    /// Exports to `endpoint`.
    pub fn new(endpoint: Option<OtlpEndpoint>) -> Self {
        Self {
            otlp_endpoint: endpoint,
        }
    }

    /// The collector to export to, if any.
    pub fn endpoint(&self) -> Option<&OtlpEndpoint> {
        self.otlp_endpoint.as_ref().filter(|e| !e.base.is_empty())
    }
}

/// An endpoint, or (for an empty value, which OpenTelemetry's environment
/// variables take to mean "unset") none, marked by an empty URL.
fn endpoint_or_unset(s: &str) -> Result<OtlpEndpoint, EndpointError> {
    if s.trim().is_empty() {
        return Ok(OtlpEndpoint {
            base: String::new(),
            traces: String::new(),
        });
    }
    s.parse()
}

/// A collector's base URL, checked: `http://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    base: String,
    traces: String,
}

impl OtlpEndpoint {
    /// Where spans are sent: the base URL with `/v1/traces` appended (as
    /// OpenTelemetry's `OTEL_EXPORTER_OTLP_ENDPOINT` means it), unless it
    /// ends so already.
    pub fn traces_url(&self) -> &str {
        &self.traces
    }
}

impl fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// Why an `--otlp-endpoint` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("`{0}` is not an http:// URL (the collector's OTLP/HTTP endpoint, such as http://127.0.0.1:4318)")]
    NotHttp(String),
    #[error(
        "`{0}`: https is not supported by this build, which exports over plain HTTP; \
         send to a collector (or an agent of it) on the host or a trusted network"
    )]
    Https(String),
    #[error("`{0}` names no host")]
    NoHost(String),
    #[error("`{0}` has a port that is not a number from 1 to 65535")]
    BadPort(String),
    #[error("`{0}` has spaces, a query or a fragment")]
    BadCharacters(String),
}

impl FromStr for OtlpEndpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = match s.get(..8) {
            Some(scheme) if scheme.eq_ignore_ascii_case("https://") => return Err(EndpointError::Https(s.into())),
            _ => match s.get(..7) {
                Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &s[7..],
                _ => return Err(EndpointError::NotHttp(s.into())),
            },
        };
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return Err(EndpointError::BadCharacters(s.into()));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        // User information has no place here (credentials go in
        // OTEL_EXPORTER_OTLP_HEADERS).
        if authority.contains('@') {
            return Err(EndpointError::BadCharacters(s.into()));
        }
        let (host, port) = match authority.strip_prefix('[') {
            // An IPv6 address: `[::1]` or `[::1]:4318`.
            Some(v6) => match v6.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, rest)) => match rest.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(EndpointError::BadPort(s.into())),
                },
                None => return Err(EndpointError::NoHost(s.into())),
            },
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(EndpointError::NoHost(s.into()));
        }
        if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
            return Err(EndpointError::BadPort(s.into()));
        }
        let base = format!("http://{authority}{}", path.trim_end_matches('/'));
        let traces = if base.ends_with("/v1/traces") {
            base.clone()
        } else {
            format!("{base}/v1/traces")
        };
        Ok(Self { base, traces })
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// The exporter refused its configuration (such as a URL the HTTP
    /// library cannot use, or an `OTEL_EXPORTER_OTLP_*` setting).
    #[error("cannot export spans to {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// Another subscriber was installed first.
    #[error("cannot install the tracing subscriber")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
}

/// What [`Telemetry::init`] set up; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the process's subscriber: logs to standard error, filtered
    /// by `RUST_LOG` (default `default_filter`), as
    /// [`init_logging`](crate::cli::init_logging) does; with an endpoint,
    /// also every step's span (and what happens inside it, at `info` and
    /// above, whatever `RUST_LOG` says) exported to it as `service`.
    pub fn init(
        service: &str,
        format: LogFormat,
        default_filter: &str,
        endpoint: Option<&OtlpEndpoint>,
    ) -> Result<Self, OtelError> {
        let Some(endpoint) = endpoint else {
            crate::cli::init_logging(format, default_filter);
            return Ok(Self { provider: None });
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.traces_url())
            .with_timeout(export_timeout())
            .build()
            .map_err(|source| OtelError::Exporter {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let provider = tracer_provider(service, Guarded::new(exporter, endpoint.traces_url()));
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
        let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let logs = match format {
            LogFormat::Text => logs.boxed(),
            LogFormat::Json => logs.json().boxed(),
        };
        tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .with(layer(&provider))
            .try_init()
            .map_err(OtelError::Subscriber)?;
        tracing::info!(endpoint = %endpoint.traces_url(), service, "exporting the spans of steps over OTLP/HTTP");
        Ok(Self {
            provider: Some(provider),
        })
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter: call it once
    /// the work is done (a worker: after draining). Waits at most the
    /// export time-out and a little more; a collector that does not answer
    /// costs the spans, reported at `warn`.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(export_timeout() + Duration::from_secs(2)) {
                tracing::warn!(error = %e, "the last spans may not have reached the collector");
            }
        }
    }
}

impl Drop for Telemetry {
    /// A program that ends without [`shutdown`](Self::shutdown) (an error
    /// on the way out) still flushes.
    fn drop(&mut self) {
        self.stop();
    }
}

/// The export time-out: the environment's (milliseconds, as OpenTelemetry
/// defines it) or [`DEFAULT_EXPORT_TIMEOUT`].
fn export_timeout() -> Duration {
    ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<u64>().ok())
        .map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis)
}

/// A tracer provider for `service` that exports through `exporter` in
/// batches from a background thread, with the ids [`HopTracer`] asks for.
/// `service` names the resource (`service.name`) unless the environment
/// does (`OTEL_SERVICE_NAME`, or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`).
pub fn tracer_provider<E: SpanExporter + 'static>(service: &str, exporter: E) -> SdkTracerProvider {
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut resource = Resource::builder();
    if !named_by_env {
        resource = resource.with_service_name(service.to_owned());
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    SdkTracerProvider::builder()
        .with_id_generator(HopIds::default())
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build()
}

/// The layer that hands step spans, and the spans and events inside them
/// (at `info` and above), to `provider`'s tracer. Spans outside a step (a
/// worker's fetch loops, the client, the coordinator) are not exported:
/// they are not part of any order's trace.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    let scope = InstrumentationScope::builder("waybill")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let tracer = HopTracer {
        inner: provider.tracer_with_scope(scope),
    };
    tracing_opentelemetry::OpenTelemetryLayer::new(tracer)
        .with_threads(false)
        .with_filter(StepsOnly)
}

/// Whether `meta` is the engine's step span.
fn is_step(meta: &Metadata<'_>) -> bool {
    meta.is_span()
        && meta.name() == STEP_SPAN
        && meta.fields().field(TRACE_ID_FIELD).is_some()
        && meta.fields().field(HOP_FIELD).is_some()
}

/// Lets through step spans and, inside them, spans and events at `info`
/// and above.
#[derive(Debug, Clone, Copy)]
struct StepsOnly;

impl<S> Filter<S> for StepsOnly
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn enabled(&self, meta: &Metadata<'_>, cx: &LayerContext<'_, S>) -> bool {
        // The current span, as this filter sees it, is the innermost one
        // it let through: a step or something inside one.
        *meta.level() <= Level::INFO && (is_step(meta) || cx.lookup_current().is_some())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if *meta.level() > Level::INFO {
            Interest::never()
        } else if is_step(meta) {
            Interest::always()
        } else {
            Interest::sometimes()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }
}

thread_local! {
    /// The ids [`HopTracer`] wants for the span it is starting on this
    /// thread, for [`HopIds`] to hand the SDK, which asks for them while
    /// it starts the span (a span builder cannot carry ids).
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// The SDK's tracer, starting each step span in its order's trace: parent
/// and ids from [`HopTrace`], kind `consumer` (a step processes a message),
/// named after the step. Other spans start as the SDK starts them.
#[derive(Debug, Clone)]
pub struct HopTracer {
    inner: SdkTracer,
}

impl Tracer for HopTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(&self, mut builder: SpanBuilder, parent_cx: &Context) -> Self::Span {
        let Some(hop) = step_trace(&builder) else {
            return self.inner.build_with_context(builder, parent_cx);
        };
        builder.span_kind = Some(SpanKind::Consumer);
        if let Some(name) = step_name(&builder) {
            builder.name = name.into();
        }
        let trace_id = TraceId::from(hop.trace_id);
        // The step that published this hop, on whatever host it ran.
        let parent = match hop.parent_span_id {
            Some(id) => Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                SpanId::from(id),
                TraceFlags::SAMPLED,
                true,
                TraceState::NONE,
            )),
            None => Context::new(),
        };
        NEXT_IDS.set(Some((trace_id, SpanId::from(hop.span_id))));
        let span = self.inner.build_with_context(builder, &parent);
        NEXT_IDS.set(None);
        span
    }
}

/// The place of a step span in its order's trace, from its fields; `None`
/// for any other span.
fn step_trace(builder: &SpanBuilder) -> Option<HopTrace> {
    if builder.name != STEP_SPAN {
        return None;
    }
    let attrs = builder.attributes.as_deref()?;
    let field = |name: &str| attrs.iter().find(|kv| kv.key.as_str() == name).map(|kv| &kv.value);
    let trace_id = match field(TRACE_ID_FIELD)? {
        Value::String(s) => s.as_str(),
        _ => return None,
    };
    // tracing-opentelemetry records unsigned integers as their text.
    let hop = match field(HOP_FIELD)? {
        Value::I64(n) => *n,
        Value::String(s) => s.as_str().parse().ok()?,
        _ => return None,
    };
    HopTrace::from_fields(trace_id, hop)
}

/// `charge`, or `charge (compensation)`: what a trace view lists.
fn step_name(builder: &SpanBuilder) -> Option<String> {
    let attrs = builder.attributes.as_deref()?;
    let text = |name: &str| {
        attrs
            .iter()
            .find(|kv| kv.key.as_str() == name)
            .and_then(|kv| match &kv.value {
                Value::String(s) => Some(s.as_str().to_owned()),
                _ => None,
            })
    };
    let step = text("step")?;
    Some(match text("kind").as_deref() {
        Some("Compensation") => format!("{step} (compensation)"),
        _ => step,
    })
}

/// The SDK's random ids, except while [`HopTracer`] starts a step span.
#[derive(Debug, Default)]
struct HopIds(RandomIdGenerator);

impl IdGenerator for HopIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_IDS.get().map_or_else(|| self.0.new_trace_id(), |(trace, _)| trace)
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_IDS.get().map_or_else(|| self.0.new_span_id(), |(_, span)| span)
    }
}

/// An exporter that never troubles the process with a collector's
/// failures: a failed export drops its batch, batches are dropped unsent
/// for [`RETRY_AFTER`] after a failure (so a stopping process does not wait
/// out a collector that is away, batch after batch), and failures are
/// reported at `warn` at most once per [`WARN_EVERY`], with the spans lost
/// since; the SDK sees every export succeed.
#[derive(Debug)]
pub struct Guarded<E> {
    inner: E,
    endpoint: String,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    /// Until when batches are dropped unsent.
    resting_until: Option<Instant>,
    last_warned: Option<Instant>,
    /// Spans dropped since the last warning.
    dropped: u64,
    failing: bool,
}

impl<E: SpanExporter> Guarded<E> {
    pub fn new(inner: E, endpoint: &str) -> Self {
        Self {
            inner,
            endpoint: endpoint.to_owned(),
            health: Mutex::new(Health::default()),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failed(&self, spans: usize, error: Option<&dyn std::error::Error>) {
        let now = Instant::now();
        let mut h = self.health();
        h.dropped += spans as u64;
        if error.is_some() {
            h.resting_until = Some(now + RETRY_AFTER);
            h.failing = true;
        }
        if h.last_warned.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            let dropped = std::mem::take(&mut h.dropped);
            h.last_warned = Some(now);
            drop(h);
            match error {
                Some(e) => tracing::warn!(
                    endpoint = %self.endpoint, error = %e, dropped_spans = dropped,
                    "cannot export spans to the collector; dropping them while it does not answer"
                ),
                None => tracing::warn!(
                    endpoint = %self.endpoint, dropped_spans = dropped,
                    "the collector is still not answering; spans dropped meanwhile"
                ),
            }
        }
    }

    fn succeeded(&self) {
        let mut h = self.health();
        if std::mem::take(&mut h.failing) {
            let dropped = std::mem::take(&mut h.dropped);
            h.resting_until = None;
            h.last_warned = None;
            drop(h);
            tracing::info!(endpoint = %self.endpoint, dropped_spans = dropped, "exporting spans to the collector again");
        }
    }
}

impl<E: SpanExporter> SpanExporter for Guarded<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let resting = self.health().resting_until.is_some_and(|t| Instant::now() < t);
        if resting {
            self.failed(spans, None);
            return Ok(());
        }
        match self.inner.export(batch).await {
            Ok(()) => self.succeeded(),
            Err(e) => self.failed(spans, Some(&e)),
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn an_endpoint_is_a_base_url_and_spans_go_to_v1_traces() {
        let e: OtlpEndpoint = "http://127.0.0.1:4318".parse().unwrap();
        assert_eq!(e.traces_url(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(e.to_string(), "http://127.0.0.1:4318");
        let e: OtlpEndpoint = "HTTP://collector/otlp/".parse().unwrap();
        assert_eq!(e.traces_url(), "http://collector/otlp/v1/traces");
        let e: OtlpEndpoint = "http://[::1]:4318/v1/traces".parse().unwrap();
        assert_eq!(e.traces_url(), "http://[::1]:4318/v1/traces");
    }

    #[test]
    fn a_bad_endpoint_says_why() {
        let bad = |s: &str| s.parse::<OtlpEndpoint>().unwrap_err();
        assert!(matches!(bad("collector:4318"), EndpointError::NotHttp(_)));
        assert!(matches!(bad("grpc://collector:4317"), EndpointError::NotHttp(_)));
        assert!(matches!(bad("https://collector:4318"), EndpointError::Https(_)));
        assert!(matches!(bad("http://"), EndpointError::NoHost(_)));
        assert!(matches!(bad("http://:4318"), EndpointError::NoHost(_)));
        assert!(matches!(bad("http://[::1:4318"), EndpointError::NoHost(_)));
        assert!(matches!(bad("http://collector:port"), EndpointError::BadPort(_)));
        assert!(matches!(bad("http://collector:0"), EndpointError::BadPort(_)));
        assert!(matches!(bad("http://collector:70000"), EndpointError::BadPort(_)));
        assert!(matches!(bad("http://[::1]x"), EndpointError::BadPort(_)));
        assert!(matches!(bad("http://col lector"), EndpointError::BadCharacters(_)));
        assert!(matches!(bad("http://c/?a=b"), EndpointError::BadCharacters(_)));
        assert!(matches!(bad("http://user:pw@c"), EndpointError::BadCharacters(_)));
        assert!(bad("https://c").to_string().contains("https is not supported"));
    }
}
