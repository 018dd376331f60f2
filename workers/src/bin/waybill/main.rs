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
use waybill_workers::otel::Telemetry;
use waybill_workers::replay::{self, EmbeddedRuntime, FileReport, ReplayOptions};
use waybill_workers::services::kv;
use waybill_workflows::samples::{self, Kind};

mod args;
mod cancel_cmd;
mod dlq_cmd;
mod replay_cmd;

use args::*;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The coordinator is a service and logs what it does; the other
    // commands only say what went wrong.
    let mut telemetry = None;
    match &cli.command {
        Command::Coordinator(args) => init_logging(args.log_format, "info"),
        // The replay's in-process workers export their steps' spans when
        // asked; flushed once the replay is over.
        Command::Replay(args) if args.otlp.endpoint().is_some() => {
            match Telemetry::init("waybill-replay", LogFormat::Text, "warn", args.otlp.endpoint()) {
                Ok(t) => telemetry = Some(t),
                Err(e) => {
                    eprintln!("error: {}", waybill_workers::cli::with_causes(&e));
                    return ExitCode::from(2);
                }
            }
        }
        _ => init_logging(LogFormat::Text, "warn"),
    }
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    if let Some(t) = telemetry {
        t.shutdown();
    }
    code
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
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
        Command::Replay(args) => replay_cmd::replay(args),
        Command::Dlq(cmd) => dlq_cmd::dlq(cmd),
        Command::Graph(args) => graph(args),
        Command::Cancel(args) => cancel_cmd::cancel(args),
        Command::Signal(args) => signal(args),
    }
}

/// `waybill signal`.
fn signal(args: SignalArgs) -> anyhow::Result<ExitCode> {
    let SignalArgs {
        id,
        name,
        data,
        json,
        nats,
        timeout,
    } = args;
    let data = match data.as_deref() {
        Some("-") => std::io::read_to_string(std::io::stdin()).context("cannot read the signal from standard input")?,
        Some(d) => d.to_owned(),
        None => "{}".to_owned(),
    };
    let reply = runtime()?.block_on(async {
        let t = nats.connect("waybill-signal").await?;
        ops::signal(&t, &id, &name, &data, Duration::from_secs(timeout)).await
    })?;
    show(&reply, json, |r| {
        if r.duplicate {
            println!(
                "duplicate: order {} had signal {} already; this one changed nothing",
                r.id, r.signal
            );
        } else if r.awaited {
            println!(
                "signal {} delivered to order {}: its step {} runs now",
                r.signal, r.id, r.step
            );
        } else {
            println!(
                "signal {} kept for order {} (now {} at step {}): used when it reaches the step that waits for it",
                r.signal, r.id, r.status, r.step
            );
        }
    })
}

/// `waybill coordinator`.
fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let CoordinatorArgs {
        nats,
        partition,
        retention,
        stall_grace,
        no_redrive,
        http,
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
    runtime()?.block_on(ops::run_coordinator(&nats, registry, config, http.as_deref()))?;
    Ok(ExitCode::SUCCESS)
}

/// `waybill graph`.
fn graph(args: GraphArgs) -> anyhow::Result<ExitCode> {
    use waybill::graph::{draw, GraphFormat};
    let registry = waybill_workflows::registry().context("the built-in workflows do not build")?;
    let workflow = match args.version {
        Some(v) => registry.version(&args.workflow, v).with_context(|| {
            let known: Vec<String> = registry.versions().map(|(w, v)| format!("{w} v{v}")).collect();
            format!(
                "no workflow `{}` version {v} (known: {})",
                args.workflow,
                known.join(", ")
            )
        })?,
        None => registry.current(&args.workflow)?,
    };
    let format = match args.format {
        GraphFormatArg::Mermaid => GraphFormat::Mermaid,
        GraphFormatArg::Dot => GraphFormat::Dot,
        GraphFormatArg::Svg => GraphFormat::Svg,
    };
    print!("{}", draw(workflow.route(), format));
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
        ops::watch(&t, Duration::from_millis(every_ms.max(50)), Duration::from_secs(5)).await
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
            "streams {}, {} and buckets {}, {} are ready on {}",
            waybill::transport::nats::HOPS_STREAM,
            waybill::transport::nats::DLQ_STREAM,
            kv::PAYMENTS,
            kv::INVENTORY,
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

/// Prints an answer as pretty JSON, or as `table` draws it.
fn show<T: serde::Serialize>(value: &T, json: bool, table: impl Fn(&T)) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(ExitCode::SUCCESS)
}
