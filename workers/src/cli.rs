//! What the programs share: NATS connection options, logging, signals, and
//! the life of a worker process.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use waybill::transport::nats::{Nats, NatsConfig, ServerList};
use waybill::{Codec, Worker, WorkerBuilder};

/// Any error, boxed: what a worker binary's own set-up may fail with.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a program could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials file cannot be read.
    #[error("cannot read credentials file {}", path.display())]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The NKey seed file cannot be read.
    #[error("cannot read NKey seed file {}", path.display())]
    NkeySeed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No server of the list answered within `--connect-timeout`.
    #[error("could not reach NATS at {url} within {seconds} s: {last}")]
    Unreachable {
        url: ServerList,
        seconds: u64,
        /// The last attempt's error.
        last: async_nats::ConnectError,
    },
    /// Connected, but the server or its streams are not as Waybill needs.
    #[error(transparent)]
    Transport(#[from] waybill::transport::Error),
}

impl ConnectError {
    /// Whether trying again later may succeed: a server that did not answer
    /// may come back; a file that cannot be read will not appear by itself.
    pub fn retryable(&self) -> bool {
        match self {
            ConnectError::Credentials { .. } | ConnectError::NkeySeed { .. } => false,
            ConnectError::Unreachable { .. } => true,
            ConnectError::Transport(e) => e.is_retryable(),
        }
    }
}

/// Why the process cannot listen for its stop signals.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {signal}")]
pub struct SignalError {
    pub signal: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl SignalError {
    /// Never: a process that cannot install its signal handlers will not
    /// manage it on a second try.
    pub fn retryable(&self) -> bool {
        false
    }
}

/// How to reach NATS.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL, or a comma-separated list of the cluster's servers
    /// (`nats://n1:4222,nats://n2:4222`; `nats://` and port 4222 may be left
    /// out): the process connects to any live one and fails over to the
    /// others. nats-server 2.12 or later.
    #[arg(
        long = "nats",
        env = "NATS_URL",
        value_name = "URL[,URL…]",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: ServerList,
    #[command(flatten)]
    pub auth: AuthArgs,
}

impl NatsArgs {
    pub async fn connect(&self, name: &str) -> Result<Nats, ConnectError> {
        self.auth.connect(&self.url, name).await
    }
}

/// How to authenticate to NATS, and how long to try.
#[derive(clap::Args, Debug, Clone)]
pub struct AuthArgs {
    /// Credentials file (JWT and NKey seed) for authentication.
    #[arg(long, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// User name for user/password authentication.
    #[arg(long, requires = "password")]
    pub user: Option<String>,
    /// Password for user/password authentication.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, requires = "user")]
    pub password: Option<String>,
    /// File holding an NKey seed for NKey authentication.
    #[arg(long, value_name = "FILE")]
    pub nkey: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server's TLS certificate; turns TLS on.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds to keep trying to reach NATS before giving up.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
}

impl AuthArgs {
    async fn options(&self, name: &str) -> Result<async_nats::ConnectOptions, ConnectError> {
        let mut o = match &self.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.clone(),
                    source,
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            o = o.user_and_password(user.clone(), password.clone());
        }
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path).map_err(|source| ConnectError::NkeySeed {
                path: path.clone(),
                source,
            })?;
            o = o.nkey(seed.trim().to_owned());
        }
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            o = o.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
        }
        Ok(waybill::transport::nats::with_reconnect_delay(o).name(name))
    }

    /// Connects to any live server of `url` (every one of them gets the
    /// same credentials and TLS settings), retrying until
    /// `--connect-timeout` runs out, and checks the server's version.
    pub async fn connect(&self, url: &ServerList, name: &str) -> Result<Nats, ConnectError> {
        self.connect_with(url, name, NatsConfig::default()).await
    }

    /// [`connect`](Self::connect) with stream settings of one's own.
    pub async fn connect_with(&self, url: &ServerList, name: &str, config: NatsConfig) -> Result<Nats, ConnectError> {
        let deadline = Instant::now() + Duration::from_secs(self.connect_timeout);
        let mut wait = Duration::from_millis(100);
        let client = loop {
            // The client tries every server of the list in one attempt (a
            // dead one is refused at once, or after its connection
            // timeout), so one live server is enough.
            match self.options(name).await?.connect(url).await {
                Ok(c) => break c,
                Err(e) if Instant::now() + wait < deadline => {
                    tracing::warn!(%url, error = %e, retry_in = ?wait, "NATS is not reachable yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(last) => {
                    return Err(ConnectError::Unreachable {
                        url: url.clone(),
                        seconds: self.connect_timeout,
                        last,
                    })
                }
            }
        };
        Ok(Nats::with_client(client, config)?)
    }
}

/// How logs are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logs to standard error, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() -> Result<&'static str, SignalError> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind, name| signal(kind).map_err(|source| SignalError { signal: name, source });
    let mut term = listen(SignalKind::terminate(), "SIGTERM")?;
    let mut int = listen(SignalKind::interrupt(), "SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// The options every worker binary takes.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Steps run at once per service subject.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Threads of the process's runtime, one fetch loop per service on
    /// each (default: one per core). With 1 the process runs on a single
    /// thread, with nothing handed between threads: the cheapest per step
    /// where several processes share few cores.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Deliveries each fetch loop takes ahead of free slots, and asks NATS
    /// for in one pull (default: its share of `--concurrency`, at most
    /// 256). Those waiting are kept alive, and handed back on SIGTERM.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,
    /// Seconds a step may stay unacknowledged before NATS redelivers it
    /// (after a crash, say). Every process of a service must use the same.
    #[arg(long, default_value_t = 30)]
    pub ack_wait: u64,
    /// Seconds a step may wait out unavailable infrastructure (NATS or a
    /// KV bucket with no responders, a leader election, a lost connection)
    /// before its hop goes to the dead letters with kind `unavailable`, to
    /// redrive later. Such a wait spends none of the step's attempts and
    /// never fails or compensates an order.
    #[arg(long, default_value_t = waybill::DEFAULT_UNAVAILABLE_LIMIT.as_secs())]
    pub unavailable_limit: u64,
    /// Documents larger than this (in bytes) are refused and dead-lettered
    /// unread.
    #[arg(long, default_value_t = waybill::codec::DEFAULT_MAX_SIZE, value_parser = clap::value_parser!(usize))]
    pub max_document_bytes: usize,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (such as
    /// `127.0.0.1:9464`; port 0 picks a free one, which the log says):
    /// steps by service and outcome, their durations, dead letters,
    /// unavailable retries, the process's CPU and memory.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Where the service keeps its state: `kv` (NATS KV buckets, shared by
    /// every process of the service) or `memory` (this process only: for
    /// trying and benchmarking with one process per service; a restart
    /// forgets it).
    #[arg(long, value_enum, default_value_t = StateArg::Kv)]
    pub state: StateArg,
    #[command(flatten)]
    pub otlp: crate::otel::OtlpArgs,
}

/// Where a service keeps its state.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StateArg {
    #[default]
    Kv,
    Memory,
}

/// The life of a worker process: connect, check the streams, serve (the
/// workflows of [`waybill_workflows::registry`] only) until
/// SIGTERM or SIGINT, then drain (no new work; steps in flight finish and
/// are acknowledged) and exit 0. Errors are reported and exit non-zero.
pub fn worker_main<F, Fut>(name: &'static str, args: WorkerArgs, serve: F) -> ExitCode
where
    F: FnOnce(Nats, WorkerBuilder<Nats>) -> Fut,
    Fut: std::future::Future<Output = Result<WorkerBuilder<Nats>, BoxError>>,
{
    // Logs, and with --otlp-endpoint the spans of steps, flushed after the
    // drain below.
    let endpoint = args.otlp.endpoint();
    let telemetry = match crate::otel::Telemetry::init(name, args.log_format, "info", endpoint) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: error: {}", with_causes(&e));
            return ExitCode::FAILURE;
        }
    };
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let run = async {
        let nats = args.nats.connect(name).await?;
        // A server or a stream leader away (a failover under way) is waited
        // out, as long as reaching NATS is; a missing stream is not.
        let deadline = Instant::now() + Duration::from_secs(args.nats.auth.connect_timeout);
        let mut wait = Duration::from_millis(100);
        loop {
            match nats.verify().await {
                Ok(()) => break,
                Err(e) if e.is_retryable() && Instant::now() + wait < deadline => {
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot check the streams yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Documents of a workflow or version this build does not define are
        // refused (dead-lettered with the reason), never run on a guess.
        let registry = std::sync::Arc::new(waybill_workflows::registry()?);
        let mut builder = Worker::builder(nats.clone())
            .registry(registry)
            .concurrency(args.concurrency)
            .pumps(threads)
            .ack_wait(Duration::from_secs(args.ack_wait.max(1)))
            .unavailable_limit(Duration::from_secs(args.unavailable_limit))
            .codec(Codec::with_max_size(args.max_document_bytes));
        if let Some(n) = args.prefetch {
            builder = builder.prefetch(usize::from(n));
        }
        if let Some(addr) = &args.metrics {
            let metrics = waybill::WorkerMetrics::default();
            let mut registry = crate::metrics::registry(name);
            metrics.register(&mut registry);
            let bound = crate::metrics::serve(addr, registry).await?;
            tracing::info!("metrics on http://{bound}/metrics");
            builder = builder.metrics(metrics);
        }
        let worker = serve(nats, builder).await?.start().await?;
        tracing::info!(url = %args.nats.url, "{name} serving");
        let signal = shutdown_signal().await?;
        tracing::info!(%signal, "draining: finishing the steps in flight");
        let stats = worker.stats();
        worker.shutdown().await;
        let steps = stats.steps.load(std::sync::atomic::Ordering::Relaxed);
        let dead = stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed);
        let redone = stats.duplicates.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(steps, dead_lettered = dead, redone, "drained; exiting");
        // One summary line whatever the log level, for people and scripts.
        // `redone`: steps run again whose next hop was already stored (a
        // redelivery after a crash; after a clean drain it stays 0).
        eprintln!("{name}: drained after {steps} steps ({dead} dead-lettered, {redone} redone)");
        // What the services asked of their buckets, for benchmarks.
        let kv = crate::services::kv::stats::snapshot();
        if !kv.is_empty() {
            eprintln!("{kv}");
        }
        Ok::<(), BoxError>(())
    };
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {}", with_causes(e.as_ref()));
            ExitCode::FAILURE
        }
    };
    // Drained: the spans of the last steps go out before the process ends.
    telemetry.shutdown();
    code
}

/// An error and its causes, outermost first, joined by `: ` (as `anyhow`
/// prints them with `{:#}`).
pub fn with_causes(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(creds: Option<&str>, nkey: Option<&str>) -> AuthArgs {
        AuthArgs {
            creds: creds.map(PathBuf::from),
            user: None,
            password: None,
            nkey: nkey.map(PathBuf::from),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            connect_timeout: 0,
        }
    }

    #[tokio::test]
    async fn a_missing_file_is_named_and_not_retryable() {
        let url: ServerList = "nats://127.0.0.1:1".parse().unwrap();
        let e = auth(Some("/nonexistent/creds"), None)
            .connect(&url, "t")
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Credentials { .. }), "{e:?}");
        assert!(!e.retryable());
        let text = with_causes(&e);
        assert!(
            text.starts_with("cannot read credentials file /nonexistent/creds: "),
            "{text}"
        );
        let e = auth(None, Some("/nonexistent/seed"))
            .connect(&url, "t")
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::NkeySeed { .. }), "{e:?}");
        assert!(!e.retryable());
    }
}
