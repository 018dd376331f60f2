//! The operator's commands: run a coordinator, and start, look up, list and
//! watch orders through the coordinators' request interface
//! (`waybill::coordinator::api`), as any NATS client could.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use waybill::coordinator::api::{OrdersQuery, OrdersReply, StartReply, StatusReply};
use waybill::coordinator::{self, CoordinatorClient, CoordinatorConfig, RequestError};
use waybill::subject;
use waybill::transport::{Error as TransportError, Nats, Rpc};
use waybill::OrderId;
use waybill::{Registry, Status};

use crate::cli::{shutdown_signal, with_causes, ConnectError, NatsArgs, SignalError};
pub use crate::tables::{print_orders, print_status};

/// Why an operator's command failed. The messages are the command line's.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Coordinator(#[from] coordinator::CoordinatorError),
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("the cancel of order {id} was not recorded: {error}")]
    CancelNotRecorded { id: OrderId, error: TransportError },
    #[error("--where: {0}")]
    Where(#[from] crate::cancel::WhereError),
    #[error("cannot read standard input")]
    ReadStdin(#[source] std::io::Error),
    #[error("cannot read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} line {line}: not JSON", path.display())]
    NotJson {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: no order in it", path.display())]
    NoOrders { path: PathBuf },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("--id names one order, but {count} were given")]
    IdForMany { count: usize },
    #[error("order {order} is {size} bytes of JSON, over the coordinator's limit of {limit}; nothing was started")]
    TooLarge { order: usize, size: usize, limit: usize },
    #[error("order {order} (id {id}) was not started: {reason}")]
    NotStarted {
        order: usize,
        id: uuid::Uuid,
        reason: String,
    },
    #[error(
        "order {order} (id {id}) was not confirmed started after {tries} tries in {retry_for:?}: {reason}; \
         it may have been stored: run `waybill start --id {id}` with the same order to be sure"
    )]
    NotConfirmed {
        order: usize,
        id: uuid::Uuid,
        tries: u32,
        retry_for: Duration,
        reason: String,
    },
    #[error(transparent)]
    BadId(#[from] waybill::NameError),
    #[error("no coordinator answers on `{subject}`: start one with `waybill coordinator`")]
    NoCoordinator { subject: String },
    #[error("no answer on `{subject}` within {timeout:?}")]
    NoAnswer { subject: String, timeout: Duration },
    #[error("request on `{subject}` failed: {error}")]
    RequestFailed { subject: String, error: TransportError },
    /// The coordinator answered an error.
    #[error("{message}")]
    Answered { message: String, retryable: bool },
    /// An answer that is not what was asked for.
    #[error(transparent)]
    Request(RequestError),
}

impl OpsError {
    /// A failed request, as the command line says it.
    pub(crate) fn request(subject: &str, timeout: Duration, e: RequestError) -> Self {
        let subject = subject.to_owned();
        match e {
            RequestError::Transport(TransportError::NoResponders(_)) => OpsError::NoCoordinator { subject },
            RequestError::Transport(TransportError::TimedOut(_)) => OpsError::NoAnswer { subject, timeout },
            RequestError::Transport(error) => OpsError::RequestFailed { subject, error },
            RequestError::Refused { message, .. } => OpsError::Answered {
                message,
                retryable: false,
            },
            RequestError::Retry { message, .. } => OpsError::Answered {
                message,
                retryable: true,
            },
            e @ (RequestError::BadAnswer { .. } | RequestError::Encode { .. }) => OpsError::Request(e),
        }
    }
}

/// `waybill coordinator`: runs until SIGTERM or SIGINT.
/// With `http`, also serves its metrics there.
pub async fn run_coordinator(
    nats: &NatsArgs,
    registry: Registry,
    config: CoordinatorConfig,
    http: Option<&str>,
) -> Result<(), OpsError> {
    let transport = nats.connect("waybill-coordinator").await?;
    let partition = config.partition;
    let registry = std::sync::Arc::new(registry);
    // A server or a stream leader away (a cluster still forming, a
    // failover under way) is waited out, as long as reaching NATS is; a
    // missing stream is not. The fault suite saw a coordinator started
    // beside a fresh cluster exit on its first request's time-out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(nats.auth.connect_timeout);
    let mut wait = Duration::from_millis(100);
    let handle = loop {
        match coordinator::start(transport.clone(), Some(registry.clone()), config.clone()).await {
            Ok(handle) => break handle,
            Err(e) if e.is_retryable() && tokio::time::Instant::now() + wait < deadline => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot start the coordinator yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(addr) = http {
        let mut metrics = crate::metrics::registry("waybill-coordinator");
        metrics.register_collector(Box::new(crate::metrics::CoordinatorCollector(handle.counts())));
        let app = crate::web::router(
            handle.counts(),
            transport.clone(),
            registry.clone(),
            config.codec.clone(),
        )
        .merge(crate::metrics::router(metrics));
        let bound = crate::metrics::serve_router(addr, app).await?;
        tracing::info!("the operator's page on http://{bound}/ and metrics on http://{bound}/metrics");
    }
    tracing::info!(url = %nats.url, %partition, "coordinator running; replaying the hop stream");
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let signal = {
        let caught_up = handle.caught_up();
        tokio::pin!(caught_up);
        let mut reported = false;
        loop {
            tokio::select! {
                s = &mut stop => break s?,
                _ = &mut caught_up, if !reported => {
                    reported = true;
                    let f = handle.feed_stats();
                    let tracked = handle.orders(&OrdersQuery { limit: Some(0), ..OrdersQuery::default() }).summary.tracked;
                    eprintln!(
                        "coordinator {partition}: replayed {} hops in {:.2} s ({:.0} hops/s); tracking {tracked} orders",
                        f.replayed_hops, f.replay_seconds, f.replay_hops_per_sec
                    );
                }
            }
        }
    };
    tracing::info!(%signal, "stopping");
    handle.shutdown().await;
    Ok(())
}

/// The orders in a file (or standard input for `-`): one JSON object, or
/// JSON Lines. The `expect` field of replay files is dropped.
pub fn read_orders(path: &Path) -> Result<Vec<Bytes>, OpsError> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(OpsError::ReadStdin)?;
    } else {
        text = std::fs::read_to_string(path).map_err(|source| OpsError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
    }
    let values: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => vec![v],
        Err(_) => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|source| OpsError::NotJson {
                    path: path.to_owned(),
                    line: i + 1,
                    source,
                })
            })
            .collect::<Result<_, OpsError>>()?,
    };
    if values.is_empty() {
        return Err(OpsError::NoOrders { path: path.to_owned() });
    }
    values
        .into_iter()
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("expect");
            }
            Ok(Bytes::from(serde_json::to_vec(&v)?))
        })
        .collect()
}

/// What came of one start request.
#[derive(Debug)]
enum StartTry {
    Started(StartReply),
    /// Nothing is known to be stored: no coordinator answered, no answer in
    /// time, or the coordinator answered `"retryable": true`.
    Retry(String),
    /// Refused for cause: the same request again will not succeed.
    Refused(String),
}

async fn start_once(client: &CoordinatorClient<Nats>, workflow: &str, body: Bytes, id: OrderId) -> StartTry {
    let subject = subject::start(workflow);
    let timeout = client.timeout();
    match client.start(workflow, Some(id), body).await {
        Ok(r) => StartTry::Started(r),
        Err(RequestError::Transport(TransportError::NoResponders(_))) => StartTry::Retry(format!(
            "no coordinator answers on `{subject}` (start one with `waybill coordinator`)"
        )),
        Err(RequestError::Transport(TransportError::TimedOut(_))) => {
            StartTry::Retry(format!("no answer on `{subject}` within {timeout:?}"))
        }
        Err(RequestError::Transport(e)) => StartTry::Retry(format!("request on `{subject}` failed: {e}")),
        Err(RequestError::Retry { message, .. }) => StartTry::Retry(message),
        Err(RequestError::Refused { message, .. }) => StartTry::Refused(message),
        Err(e @ (RequestError::BadAnswer { .. } | RequestError::Encode { .. })) => StartTry::Refused(e.to_string()),
    }
}

/// `waybill start`: starts each order under an id chosen here and hands
/// each answer to `started` as it comes, so a failure part-way loses no id
/// already started. A start with no answer, no coordinator, or an answer
/// `"retryable": true` is sent again under the same id (50 ms doubling to
/// 2 s, with jitter) for up to `retry_for` (keep it inside the stream's
/// 2-minute duplicate window): the coordinator stores the id once, so an
/// outage delays a start but neither loses nor doubles it. A refusal for
/// cause ends it at once.
pub async fn start(
    transport: &Nats,
    workflow: &str,
    orders: Vec<Bytes>,
    id: Option<uuid::Uuid>,
    timeout: Duration,
    retry_for: Duration,
    mut started: impl FnMut(&StartReply),
) -> Result<usize, OpsError> {
    if id.is_some() && orders.len() > 1 {
        return Err(OpsError::IdForMany { count: orders.len() });
    }
    let limit = waybill::coordinator::api::MAX_START_BYTES;
    if let Some((i, big)) = orders.iter().enumerate().find(|(_, b)| b.len() > limit) {
        return Err(OpsError::TooLarge {
            order: i + 1,
            size: big.len(),
            limit,
        });
    }
    let client = CoordinatorClient::new(transport.clone(), timeout);
    let mut n = 0;
    for body in orders {
        let chosen_here = id.is_none();
        let id = id.unwrap_or_else(uuid::Uuid::now_v7);
        let order_id = OrderId::from_uuid(id);
        let deadline = Instant::now() + retry_for;
        let mut pause = Duration::from_millis(50);
        let mut tries = 0u32;
        let mut reply = loop {
            tries += 1;
            match start_once(&client, workflow, body.clone(), order_id).await {
                StartTry::Started(r) => break r,
                StartTry::Refused(reason) => {
                    return Err(OpsError::NotStarted {
                        order: n + 1,
                        id,
                        reason,
                    })
                }
                StartTry::Retry(why) => {
                    let wait = pause / 2 + pause.mul_f64(fastrand::f64() / 2.0);
                    if Instant::now() + wait >= deadline {
                        return Err(OpsError::NotConfirmed {
                            order: n + 1,
                            id,
                            tries,
                            retry_for,
                            reason: why,
                        });
                    }
                    tracing::warn!(order = n + 1, %id, tries, retry_in = ?wait, "{why}; trying again with the same id");
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        // A fresh id answered `duplicate` on a retry: an earlier try of
        // this very call was stored, so this call started it.
        if chosen_here && tries > 1 {
            reply.duplicate = false;
        }
        started(&reply);
        n += 1;
    }
    Ok(n)
}

pub async fn status<T: Rpc>(transport: &T, id: &str, timeout: Duration) -> Result<StatusReply, OpsError> {
    let id = id.parse::<OrderId>()?;
    CoordinatorClient::new(transport.clone(), timeout)
        .status(&id)
        .await
        .map_err(|e| OpsError::request(&subject::status(&id), timeout, e))
}

/// Delivers the signal `name` with its JSON `data` to an order, through
/// the coordinator.
pub async fn signal<T: Rpc>(
    transport: &T,
    id: &str,
    name: &str,
    data: &str,
    timeout: Duration,
) -> Result<waybill::coordinator::api::SignalReply, OpsError> {
    let id = id.parse::<OrderId>()?;
    let name = waybill::SignalName::new(name)?;
    CoordinatorClient::new(transport.clone(), timeout)
        .signal(&id, &name, data)
        .await
        .map_err(|e| OpsError::request(&subject::signal(&id, &name), timeout, e))
}

pub async fn orders<T: Rpc>(transport: &T, query: &OrdersQuery, timeout: Duration) -> Result<OrdersReply, OpsError> {
    CoordinatorClient::new(transport.clone(), timeout)
        .orders(query)
        .await
        .map_err(|e| OpsError::request(subject::ORDERS, timeout, e))
}

/// `waybill watch`: a live view until Ctrl-C.
pub async fn watch<T: Rpc>(transport: &T, every: Duration, timeout: Duration) -> Result<(), OpsError> {
    watch_until(transport, every, timeout, async {
        shutdown_signal().await?;
        Ok(())
    })
    .await
}

/// The live view of [`watch`], until `stop` ends (over any transport the
/// coordinators answer on: NATS, or the embedded default of a replay).
pub async fn watch_until<T: Rpc>(
    transport: &T,
    every: Duration,
    timeout: Duration,
    stop: impl std::future::Future<Output = Result<(), OpsError>>,
) -> Result<(), OpsError> {
    let query = OrdersQuery {
        limit: Some(0),
        ..OrdersQuery::default()
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let header = multi.add(ProgressBar::new_spinner());
    header.set_style(ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    let bar_style = ProgressStyle::with_template("{prefix:>28} [{bar:40}] {pos:>7} in flight")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("█▉ ");
    let mut bars: std::collections::BTreeMap<String, ProgressBar> = std::collections::BTreeMap::new();
    let mut last: Option<(Instant, u64)> = None;
    let mut tick = tokio::time::interval(every);
    tokio::pin!(stop);
    let mut last_round = false;
    loop {
        if last_round {
            break;
        }
        tokio::select! {
            // One last look when told to stop: the view ends on what is.
            s = &mut stop => { s?; last_round = true; }
            _ = tick.tick() => {}
        }
        // A stop is not kept waiting long by a coordinator that is away.
        let wait = if last_round {
            timeout.min(Duration::from_secs(1))
        } else {
            timeout
        };
        let reply = match orders(transport, &query, wait).await {
            Ok(r) => r,
            Err(e) => {
                let e = with_causes(&e);
                header.set_message(format!("waiting for a coordinator: {e}"));
                if !tty {
                    eprintln!("waiting for a coordinator: {e}");
                }
                continue;
            }
        };
        let s = &reply.summary;
        let finished: u64 = s.finished.values().sum();
        let now = Instant::now();
        let rate = match last {
            Some((t, n)) => finished.saturating_sub(n) as f64 / now.duration_since(t).as_secs_f64().max(1e-3),
            None => 0.0,
        };
        last = Some((now, finished));
        let by: Vec<String> = Status::ALL
            .iter()
            .filter(|st| st.is_terminal())
            .map(|st| format!("{st} {}", s.finished.get(st).copied().unwrap_or(0)))
            .collect();
        let line = format!(
            "{} in flight, {} stalled · {:.0} orders/s finishing · {} · partitions {}/{}",
            s.in_flight,
            s.stalled,
            rate,
            by.join(", "),
            reply.answered.len(),
            reply.partitions
        );
        header.set_message(line.clone());
        if !tty {
            println!("{line}");
        }
        let max = s.by_step.values().copied().max().unwrap_or(0).max(1);
        for (step, n) in &s.by_step {
            let bar = bars.entry(step.clone()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(max));
                b.set_style(bar_style.clone());
                b.set_prefix(step.clone());
                b
            });
            bar.set_length(max);
            bar.set_position(*n);
        }
        for (step, bar) in &bars {
            if !s.by_step.contains_key(step) {
                bar.set_length(max);
                bar.set_position(0);
            }
        }
    }
    for b in bars.values() {
        b.finish_and_clear();
    }
    header.finish_and_clear();
    Ok(())
}
