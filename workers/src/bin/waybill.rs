//! The `waybill` command line.

use std::io::Write;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use waybill::coordinator::api::OrdersQuery;
use waybill::coordinator::{CoordinatorConfig, Partition};
use waybill::transport::nats::ServerList;
use waybill::transport::{NatsConfig, Rpc};
use waybill::Status;
use waybill_workers::cli::{init_logging, AuthArgs, LogFormat, NatsArgs};
use waybill_workers::ops;
use waybill_workers::replay::{self, EmbeddedRuntime, FileReport, ReplayOptions};
use waybill_workers::services::kv;
use waybill_workflows::samples::{self, Kind};

#[derive(Parser, Debug)]
#[command(
    name = "waybill",
    version,
    about = "Waybill: workflows whose documents carry their own route"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay order flows (JSON Lines files, or folders of them): on the
    /// embedded default (workers in this process, no server), or over NATS
    /// with `--nats URL`. Exits non-zero if any order ends other than its
    /// `expect` field says.
    Replay(ReplayArgs),
    /// Create the streams Waybill needs on a NATS server, or check the ones
    /// there (idempotent).
    Setup(SetupArgs),
    /// Track every order from the hop stream and answer the start, status
    /// and orders requests (`waybill.start.<workflow>`,
    /// `waybill.status.<id>`, `waybill.orders`), until SIGTERM or Ctrl-C.
    Coordinator(CoordinatorArgs),
    /// Start orders: one JSON order, or JSON Lines, from a file or `-`
    /// (standard input). Prints each new order's id. Needs a coordinator.
    Start(StartArgs),
    /// Where one order stands, and its history.
    Status(StatusArgs),
    /// Counts of the tracked orders, and the ids that match.
    Orders(OrdersArgs),
    /// A live view of the orders in flight by step, the throughput and the
    /// finished counts, until Ctrl-C.
    Watch(WatchArgs),
    /// Print generated example order flows (JSON Lines) to standard output.
    ExampleOrders(ExampleOrdersArgs),
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// Files or folders of `.jsonl` order flows.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Initial stock, a JSON object of SKU → units, for the embedded
    /// default. Default: the `stock.json` beside the first path (or its
    /// parent folder), else `examples/stock.json`.
    #[arg(long)]
    stock: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 2048)]
    in_flight: usize,
    /// Steps the in-process worker runs at once.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Seconds the replay may go without any order finishing before the
    /// orders still in flight count as not finished.
    #[arg(long, default_value_t = 60)]
    order_timeout: u64,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Show the coordinators' live view (as `waybill watch` does) instead of
    /// the progress bar: on the embedded default, the replay's own
    /// coordinator; over NATS, the deployment's.
    #[arg(long, conflicts_with = "json")]
    watch: bool,
    /// Replay over NATS at this URL (or comma-separated list of a
    /// cluster's servers: any live one is used) instead of the embedded
    /// default: the orders are started here, the worker processes run
    /// wherever they run (start them, and run `waybill setup`, first).
    #[arg(long, value_name = "URL[,URL…]")]
    nats: Option<ServerList>,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Args, Debug)]
struct SetupArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Seed stock levels from this JSON object of SKU → units (SKUs that
    /// already have a level keep it).
    #[arg(long, value_name = "FILE")]
    stock: Option<PathBuf>,
    /// Replicas of each stream and bucket (3 in a three-node cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

#[derive(Args, Debug)]
struct CoordinatorArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Which share of the orders to track, `index/count`: run one
    /// coordinator per index (`0/2` and `1/2`) to split the orders.
    #[arg(long, default_value = "0/1")]
    partition: Partition,
    /// Seconds finished orders stay queryable.
    #[arg(long, default_value_t = 600)]
    retention: u64,
    /// Seconds past its step's deadline before an order counts as stalled.
    #[arg(long, default_value_t = 10)]
    stall_grace: u64,
    /// Only report stalled hops; never republish them.
    #[arg(long)]
    no_redrive: bool,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Args, Debug)]
struct StartArgs {
    /// The workflow, e.g. `order`.
    workflow: String,
    /// The order file, or `-` for standard input.
    file: PathBuf,
    /// Start the (one) order under this id (default: a fresh one per
    /// order). Starting an id again inside the stream's duplicate window
    /// (2 minutes by default) does nothing new and says `duplicate`.
    #[arg(long)]
    id: Option<uuid::Uuid>,
    #[command(flatten)]
    nats: NatsArgs,
    /// Seconds to wait for each answer (longer than the coordinator's
    /// own 4 s to store a hop).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Seconds to keep sending an order again, under its same id, while
    /// no coordinator answers or one answers that it could not store it
    /// for now (an outage delays a start, it never loses or doubles
    /// it). At most 90: every retry stays inside the stream's 2-minute
    /// duplicate window.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=90))]
    retry_for: u64,
}

#[derive(Args, Debug)]
struct StatusArgs {
    id: String,
    /// Print the coordinator's JSON answer.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

#[derive(Args, Debug)]
struct OrdersArgs {
    #[arg(long)]
    status: Option<Status>,
    /// A step name, or `workflow/step`.
    #[arg(long)]
    step: Option<String>,
    #[arg(long)]
    workflow: Option<String>,
    /// Only orders past their step's deadline.
    #[arg(long)]
    stalled: bool,
    /// How many ids to list (at most 10,000).
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

#[derive(Args, Debug)]
struct WatchArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Milliseconds between updates.
    #[arg(long, default_value_t = 500)]
    every_ms: u64,
}

#[derive(Args, Debug)]
struct ExampleOrdersArgs {
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = KindArg::Mixed)]
    kind: KindArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KindArg {
    Mixed,
    Happy,
    Declined,
    OutOfStock,
    Unshippable,
    Transient,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The coordinator is a service and logs what it does; the other
    // commands only say what went wrong.
    match &cli.command {
        Command::Coordinator(args) => init_logging(args.log_format, "info"),
        _ => init_logging(LogFormat::Text, "warn"),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Coordinator(args) => coordinator(args),
        Command::Start(args) => start(args),
        Command::Status(args) => status(args),
        Command::Orders(args) => orders(args),
        Command::Watch(args) => watch(args),
        Command::Setup(args) => setup(args),
        Command::ExampleOrders(args) => example_orders(args),
        Command::Replay(args) => replay(args),
    }
}

/// `waybill coordinator`.
fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let CoordinatorArgs {
        nats,
        partition,
        retention,
        stall_grace,
        no_redrive,
        log_format: _,
    } = args;
    let registry = waybill_workflows::registry().context("the built-in workflows do not build")?;
    let config = CoordinatorConfig {
        partition,
        retention: Duration::from_secs(retention),
        stall_grace: Duration::from_secs(stall_grace),
        redrive: !no_redrive,
        ..CoordinatorConfig::default()
    };
    runtime()?.block_on(ops::run_coordinator(&nats, registry, config))?;
    Ok(ExitCode::SUCCESS)
}

/// `waybill start`.
fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    let StartArgs {
        workflow,
        file,
        id,
        nats,
        timeout,
        retry_for,
    } = args;
    let orders = ops::read_orders(&file)?;
    runtime()?.block_on(async {
        let t = nats.connect("waybill-start").await?;
        let (timeout, retry_for) = (Duration::from_secs(timeout), Duration::from_secs(retry_for));
        ops::start(&t, &workflow, orders, id, timeout, retry_for, |r| {
            if r.duplicate {
                println!("{} (already started)", r.id);
            } else {
                println!("{}", r.id);
            }
        })
        .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `waybill status`.
fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let StatusArgs {
        id,
        json,
        nats,
        timeout,
    } = args;
    let s = runtime()?.block_on(async {
        let t = nats.connect("waybill-status").await?;
        ops::status(&t, &id, Duration::from_secs(timeout)).await
    })?;
    show(&s, json, ops::print_status)
}

/// `waybill orders`.
fn orders(args: OrdersArgs) -> anyhow::Result<ExitCode> {
    let OrdersArgs {
        status,
        step,
        workflow,
        stalled,
        limit,
        json,
        nats,
        timeout,
    } = args;
    let query = OrdersQuery {
        status,
        step,
        workflow,
        stalled,
        limit: Some(limit),
        after: None,
    };
    let r = runtime()?.block_on(async {
        let t = nats.connect("waybill-orders").await?;
        ops::orders(&t, &query, Duration::from_secs(timeout)).await
    })?;
    show(&r, json, ops::print_orders)
}

/// `waybill watch`.
fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let WatchArgs { nats, every_ms } = args;
    runtime()?.block_on(async {
        let t = nats.connect("waybill-watch").await?;
        ops::watch(
            &t,
            Duration::from_millis(every_ms.max(50)),
            Duration::from_secs(5),
        )
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `waybill setup`.
fn setup(args: SetupArgs) -> anyhow::Result<ExitCode> {
    let SetupArgs { nats, stock, replicas } = args;
    let stock = stock.map(|p| replay::load_stock(&p)).transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let transport = nats
            .auth
            .connect_with(
                &nats.url,
                "waybill-setup",
                NatsConfig {
                    replicas,
                    ..NatsConfig::default()
                },
            )
            .await?;
        transport.setup().await?;
        kv::setup_buckets(&transport, replicas).await?;
        println!(
            "streams {}, {} and buckets {}, {}, {} are ready on {}",
            waybill::transport::nats::HOPS_STREAM,
            waybill::transport::nats::DLQ_STREAM,
            kv::PAYMENTS,
            kv::INVENTORY,
            kv::RESERVATIONS,
            nats.url
        );
        if let Some(stock) = stock {
            let stock: std::collections::BTreeMap<String, i64> = stock.into_iter().collect();
            let created = kv::seed_stock(&transport, &stock).await?;
            println!(
                "stock: {created} SKUs seeded, {} kept their level",
                stock.len() - created
            );
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `waybill example-orders`.
fn example_orders(args: ExampleOrdersArgs) -> anyhow::Result<ExitCode> {
    let ExampleOrdersArgs { count, seed, kind } = args;
    let orders = match kind {
        KindArg::Mixed => samples::mixed(count, seed),
        KindArg::Happy => samples::of_kind(Kind::Happy, count, seed),
        KindArg::Declined => samples::of_kind(Kind::Declined, count, seed),
        KindArg::OutOfStock => samples::of_kind(Kind::OutOfStock, count, seed),
        KindArg::Unshippable => samples::of_kind(Kind::Unshippable, count, seed),
        KindArg::Transient => samples::of_kind(Kind::Transient, count, seed),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in orders {
        writeln!(out, "{}", s.to_line())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `waybill replay`: loads the flows, runs them on the embedded default or
/// over NATS ([`replay_files`]), and reports.
fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let ReplayArgs {
        paths,
        stock,
        json,
        in_flight,
        concurrency,
        order_timeout,
        no_progress,
        watch,
        nats,
        auth,
    } = args;
    let opts = ReplayOptions {
        in_flight,
        concurrency,
        order_timeout: Duration::from_secs(order_timeout),
        coordinator: true,
    };
    let registry = waybill_workflows::registry().context("the built-in workflows do not build")?;
    // Stock seeds the in-process inventory of the embedded default; over
    // NATS the inventory worker keeps its own.
    let stock = match (&nats, stock) {
        (Some(_), _) => Default::default(),
        (None, Some(p)) => replay::load_stock(&p)?,
        (None, None) => replay::load_stock(&find_stock(&paths).context(
            "no stock.json beside the order flows nor in examples/; pass --stock FILE (a JSON object of SKU → units)",
        )?)?,
    };
    let files = replay::expand(&paths)?
        .iter()
        .map(|p| replay::load(p, &registry))
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = files.iter().map(|f| f.orders.len()).sum();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let bar = if no_progress || json || watch {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:30!} [{bar:40}] {pos}/{len} orders ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    // The replay runs as a task on the runtime's workers rather than on
    // this thread: waking another thread for every finished order
    // would cost more than the order.
    let task = replay_files(files, stock, opts, nats, auth, bar, watch);
    let (reports, dead, check) = rt.block_on(async { tokio::spawn(task).await })??;
    let agrees = check.as_ref().is_none_or(|c| c.disagreements.is_empty());
    let ok = reports.iter().all(FileReport::ok) && dead.is_empty() && agrees;
    if json {
        let out = serde_json::json!({"ok": ok, "files": reports, "dead_letters": dead, "coordinator": check});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&reports);
        for d in &dead {
            println!("{d}");
        }
        if let Some(c) = &check {
            for d in &c.disagreements {
                println!("coordinator: {d}");
            }
            for s in &c.statuses {
                println!();
                ops::print_status(s);
            }
        }
        println!(
            "{}",
            if ok {
                "all orders ended as expected"
            } else {
                "MISMATCHES: see above"
            }
        );
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs every file's orders, in-process (`nats` is `None`) or over NATS;
/// returns the reports and what went to the dead letters meanwhile.
async fn replay_files(
    files: Vec<replay::FlowFile>,
    stock: std::collections::HashMap<String, i64>,
    opts: ReplayOptions,
    nats: Option<ServerList>,
    auth: AuthArgs,
    bar: ProgressBar,
    watch: bool,
) -> anyhow::Result<(Vec<FileReport>, Vec<String>, Option<replay::CoordinatorCheck>)> {
    let mut reports = Vec::new();
    let mut check = None;
    let dead = match nats {
        None => {
            let engine = EmbeddedRuntime::start(stock, &opts).await?;
            let run = async {
                for f in &files {
                    let label = f.path.display().to_string();
                    bar.set_message(label.clone());
                    reports.push(engine.run(&label, &f.orders, &opts, |_, _| bar.inc(1)).await);
                }
            };
            watching(&engine.transport, watch, run).await?;
            check = Some(engine.check(&reports).await);
            let dead: Vec<String> = engine
                .transport
                .dead_letters()
                .iter()
                .map(|d| format!("dead letter on {}: {}", d.message.subject, d.reason))
                .collect();
            engine.shutdown().await;
            dead
        }
        Some(url) => {
            let transport = auth.connect(&url, "waybill-replay").await?;
            transport.verify().await?;
            let before = transport.dead_letter_count().await?;
            let client = waybill::Client::connect(transport.clone()).await?;
            let run = async {
                for f in &files {
                    let label = f.path.display().to_string();
                    bar.set_message(label.clone());
                    reports.push(replay::run_orders(&client, &label, &f.orders, &opts, |_, _| bar.inc(1)).await);
                }
            };
            watching(&transport, watch, run).await?;
            client.close().await;
            let added = transport.dead_letter_count().await?.saturating_sub(before);
            if added > 0 {
                vec![format!(
                    "{added} dead letters were stored in WAYBILL_DLQ during the replay (see waybill.dlq.>)"
                )]
            } else {
                Vec::new()
            }
        }
    };
    bar.finish_and_clear();
    Ok((reports, dead, check))
}

/// Runs `run`, with the coordinators' live view beside it if asked.
async fn watching<T: Rpc>(transport: &T, watch: bool, run: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    if !watch {
        run.await;
        return Ok(());
    }
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let view = ops::watch_until(transport, Duration::from_millis(500), Duration::from_secs(5), async {
        // Ends with the run (its sender dropped or sent).
        let _ = finished.await;
        Ok(())
    });
    let run = async move {
        run.await;
        let _ = done.send(());
    };
    let (watched, ()) = tokio::join!(view, run);
    watched?;
    Ok(())
}

/// Prints an answer as pretty JSON, or as `table` draws it.
fn show<T: serde::Serialize>(value: &T, json: bool, table: impl Fn(&T)) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(ExitCode::SUCCESS)
}

/// The `stock.json` that goes with the order flows at `paths`.
fn find_stock(paths: &[PathBuf]) -> Option<PathBuf> {
    let first = paths.first()?;
    let dir = if first.is_dir() {
        Some(first.as_path())
    } else {
        first.parent()
    };
    let mut candidates: Vec<PathBuf> = dir
        .into_iter()
        .flat_map(|d| [d.join("stock.json"), d.join("..").join("stock.json")])
        .collect();
    candidates.push(PathBuf::from("examples/stock.json"));
    candidates.into_iter().find(|p| p.is_file())
}

fn print_table(reports: &[FileReport]) {
    let width = reports.iter().map(|r| r.file.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:>7}  {:>9}  {:>6}  {:>11}  {:>10}  {:>9}  {:>7}  {:>7}",
        "file", "orders", "completed", "failed", "compensated", "mismatches", "orders/s", "p50 ms", "p99 ms"
    );
    for r in reports {
        println!(
            "{:<width$}  {:>7}  {:>9}  {:>6}  {:>11}  {:>10}  {:>9.0}  {:>7.2}  {:>7.2}",
            r.file,
            r.orders,
            r.completed,
            r.failed,
            r.compensated,
            r.mismatches.len(),
            r.orders_per_sec,
            r.p50_ms,
            r.p99_ms
        );
    }
    for r in reports {
        for m in &r.mismatches {
            let actual = m.actual.map_or("unfinished".to_owned(), |s| s.to_string());
            println!(
                "mismatch: {} line {} (order {}): expected {}, got {}: {}",
                r.file,
                m.line,
                m.order_id.as_deref().unwrap_or("-"),
                m.expected,
                actual,
                m.detail
            );
        }
    }
}
