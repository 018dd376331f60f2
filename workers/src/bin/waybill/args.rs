//! The command line of `waybill`: every subcommand and its flags.

use super::*;

#[derive(Parser, Debug)]
#[command(
    name = "waybill",
    version,
    about = "Waybill: workflows whose documents carry their own route"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
    /// The dead letters: list, show, send back to their step (redrive), or
    /// delete (purge).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Cancel an order in flight, or every order a filter takes
    /// (`--where`): it stops at its next hop (before its step runs, or as
    /// it wakes from a retry's wait), its completed steps are undone newest
    /// first, and it ends `cancelled`. An order already ended is an error.
    /// Needs a coordinator unless `--force`.
    Cancel(CancelArgs),
    /// Deliver a signal to an order (`waybill.signal.<id>.<name>`): its
    /// JSON is kept in the order under the signal's name, and the step
    /// that waits for it runs. A signal sent before the order reaches that
    /// step is kept until it does; a second one of the same name is a
    /// duplicate and changes nothing. Needs a coordinator.
    Signal(SignalArgs),
    /// Draw a workflow's route: its steps, where each outcome leads, what
    /// fails the order and what undoes each step (Mermaid, Graphviz DOT, or
    /// the SVG picture the coordinator's web page shows).
    Graph(GraphArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "filter"])))]
pub(crate) struct CancelArgs {
    /// The order's id.
    pub(crate) id: Option<String>,
    /// Every order in flight this filter takes instead of one:
    /// `status=running|compensating|stalled`, `step=NAME` (or
    /// `workflow/step`), `workflow=NAME`, comma-separated. Without `--yes`
    /// it only says how many orders it takes.
    #[arg(long = "where", value_name = "FILTER", conflicts_with_all = ["force", "wait"])]
    pub(crate) filter: Option<String>,
    /// With `--where`: cancel them (otherwise a dry run).
    #[arg(long, requires = "filter")]
    pub(crate) yes: bool,
    /// With `--where`: cancel at most this many (the oldest first).
    #[arg(long, requires = "filter", default_value_t = 10_000)]
    pub(crate) limit: usize,
    /// Why, kept in the order's history.
    #[arg(long, default_value = waybill::coordinator::api::DEFAULT_CANCEL_REASON)]
    pub(crate) reason: String,
    /// Wait up to this many seconds for the order to end, and say how.
    #[arg(long, value_name = "SECS")]
    pub(crate) wait: Option<u64>,
    /// Record the cancel without asking the coordinator first.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    /// Seconds to wait for the coordinator's answer.
    #[arg(long, default_value_t = 5)]
    pub(crate) timeout: u64,
}

#[derive(Args, Debug)]
pub(crate) struct SignalArgs {
    /// The order's id.
    pub(crate) id: String,
    /// The signal's name, as the route waits for it (`approved`).
    pub(crate) name: String,
    /// Its JSON (default `{}`); `-` reads it from standard input.
    pub(crate) data: Option<String>,
    /// Print the coordinator's JSON answer.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    /// Seconds to wait for the coordinator's answer.
    #[arg(long, default_value_t = 5)]
    pub(crate) timeout: u64,
}

#[derive(Args, Debug)]
pub(crate) struct GraphArgs {
    /// The workflow, such as `order`.
    pub(crate) workflow: String,
    /// Its version (default: the current one).
    #[arg(long)]
    pub(crate) version: Option<u32>,
    #[arg(long, value_enum, default_value_t = GraphFormatArg::Mermaid)]
    pub(crate) format: GraphFormatArg,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub(crate) enum GraphFormatArg {
    /// A Mermaid `flowchart` (GitHub and most Markdown viewers draw it).
    Mermaid,
    /// Graphviz DOT (`| dot -Tsvg > order.svg`).
    Dot,
    /// An SVG picture: the drawing of the coordinator's web page.
    Svg,
}

#[derive(Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// The dead letters that match, oldest first.
    List(DlqListArgs),
    /// One dead letter: its reason, and where its order stood.
    Show(DlqShowArgs),
    /// Send dead letters back to the step they came from, their history
    /// intact (each step's effect is still applied once). Each is checked
    /// with the coordinator first: one whose order has moved on or ended is
    /// not sent. Exits 1 if any was not sent.
    Redrive(DlqPickArgs),
    /// Delete dead letters. Says how many it would delete unless `--yes`.
    Purge(DlqPickArgs),
}

/// Which dead letters: the kind, the service they came from, how recent.
#[derive(Args, Debug, Clone)]
pub(crate) struct DlqFilterArgs {
    /// `invalid`, `exhausted` or `unavailable`.
    #[arg(long)]
    pub(crate) kind: Option<waybill::transport::DeadLetterKind>,
    /// The step's service subject, such as `payment.charge`.
    #[arg(long)]
    pub(crate) service: Option<String>,
    /// Stored at most this long ago: 90s, 15m, 2h, 1d.
    #[arg(long)]
    pub(crate) since: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct DlqListArgs {
    #[command(flatten)]
    pub(crate) filter: DlqFilterArgs,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct DlqShowArgs {
    /// The dead letter's sequence (from `waybill dlq list`).
    pub(crate) sequence: u64,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct DlqPickArgs {
    /// The dead letters' sequences (from `waybill dlq list`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) sequences: Vec<u64>,
    /// Every dead letter that matches the filters.
    #[arg(long)]
    pub(crate) all: bool,
    #[command(flatten)]
    pub(crate) filter: DlqFilterArgs,
    /// Redrive: send without asking the coordinator where each order
    /// stands.
    #[arg(long)]
    pub(crate) force: bool,
    /// Purge: delete (without it, only say how many would go).
    #[arg(long)]
    pub(crate) yes: bool,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Seconds to wait for the coordinator's answer, per order.
    #[arg(long, default_value_t = 5)]
    pub(crate) timeout: u64,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ReplayArgs {
    /// Files or folders of `.jsonl` order flows.
    #[arg(required = true)]
    pub(crate) paths: Vec<PathBuf>,
    /// Initial stock, a JSON object of SKU → units, for the embedded
    /// default. Default: the `stock.json` beside the first path (or its
    /// parent folder), else `examples/stock.json`.
    #[arg(long)]
    pub(crate) stock: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 2048)]
    pub(crate) in_flight: usize,
    /// Steps the in-process worker runs at once.
    #[arg(long, default_value_t = 512)]
    pub(crate) concurrency: usize,
    /// Seconds the replay may go without any order finishing before the
    /// orders still in flight count as not finished.
    #[arg(long, default_value_t = 60)]
    pub(crate) order_timeout: u64,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// Show the coordinators' live view (as `waybill watch` does) instead of
    /// the progress bar: on the embedded default, the replay's own
    /// coordinator; over NATS, the deployment's.
    #[arg(long, conflicts_with = "json")]
    pub(crate) watch: bool,
    /// Replay over NATS at this URL (or comma-separated list of a
    /// cluster's servers: any live one is used) instead of the embedded
    /// default: the orders are started here, the worker processes run
    /// wherever they run (start them, and run `waybill setup`, first).
    #[arg(long, value_name = "URL[,URL…]")]
    pub(crate) nats: Option<ServerList>,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
    // On the embedded default, the in-process workers' steps are exported
    // (service `waybill-replay`); over NATS the worker processes export
    // their own.
    #[command(flatten)]
    pub(crate) otlp: waybill_workers::otel::OtlpArgs,
}

#[derive(Args, Debug)]
pub(crate) struct SetupArgs {
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    /// Seed stock levels from this JSON object of SKU → units (SKUs that
    /// already have a level keep it).
    #[arg(long, value_name = "FILE")]
    pub(crate) stock: Option<PathBuf>,
    /// Replicas of each stream and bucket (3 in a three-node cluster).
    #[arg(long, default_value_t = 1)]
    pub(crate) replicas: usize,
}

#[derive(Args, Debug)]
pub(crate) struct CoordinatorArgs {
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    /// Which share of the orders to track, `index/count`: run one
    /// coordinator per index (`0/2` and `1/2`) to split the orders.
    #[arg(long, default_value = "0/1")]
    pub(crate) partition: Partition,
    /// Seconds finished orders stay queryable.
    #[arg(long, default_value_t = 600)]
    pub(crate) retention: u64,
    /// Seconds past its step's deadline before an order counts as stalled.
    #[arg(long, default_value_t = 10)]
    pub(crate) stall_grace: u64,
    /// Only report stalled hops; never republish them.
    #[arg(long)]
    pub(crate) no_redrive: bool,
    /// Serve HTTP on ADDR (such as `127.0.0.1:8080`; port 0 picks a free
    /// one, which the log says): Prometheus metrics at `/metrics`, the
    /// orders by status and by step, the finished counts, the stalled ones.
    #[arg(long, value_name = "ADDR")]
    pub(crate) http: Option<String>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
}

#[derive(Args, Debug)]
pub(crate) struct StartArgs {
    /// The workflow, e.g. `order`.
    pub(crate) workflow: String,
    /// The order file, or `-` for standard input.
    pub(crate) file: PathBuf,
    /// Start the (one) order under this id (default: a fresh one per
    /// order). Starting an id again inside the stream's duplicate window
    /// (2 minutes by default) does nothing new and says `duplicate`.
    #[arg(long)]
    pub(crate) id: Option<uuid::Uuid>,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    /// Seconds to wait for each answer (longer than the coordinator's
    /// own 4 s to store a hop).
    #[arg(long, default_value_t = 10)]
    pub(crate) timeout: u64,
    /// Seconds to keep sending an order again, under its same id, while
    /// no coordinator answers or one answers that it could not store it
    /// for now (an outage delays a start, it never loses or doubles
    /// it). At most 90: every retry stays inside the stream's 2-minute
    /// duplicate window.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=90))]
    pub(crate) retry_for: u64,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    pub(crate) id: String,
    /// Print the coordinator's JSON answer.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    #[arg(long, default_value_t = 5)]
    pub(crate) timeout: u64,
}

#[derive(Args, Debug)]
pub(crate) struct OrdersArgs {
    #[arg(long)]
    pub(crate) status: Option<Status>,
    /// A step name, or `workflow/step`.
    #[arg(long)]
    pub(crate) step: Option<String>,
    #[arg(long)]
    pub(crate) workflow: Option<String>,
    /// Only orders past their step's deadline.
    #[arg(long)]
    pub(crate) stalled: bool,
    /// How many ids to list (at most 10,000).
    #[arg(long, default_value_t = 20)]
    pub(crate) limit: usize,
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    #[arg(long, default_value_t = 5)]
    pub(crate) timeout: u64,
}

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    pub(crate) nats: NatsArgs,
    /// Milliseconds between updates.
    #[arg(long, default_value_t = 500)]
    pub(crate) every_ms: u64,
}

#[derive(Args, Debug)]
pub(crate) struct ExampleOrdersArgs {
    #[arg(long, default_value_t = 1000)]
    pub(crate) count: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    #[arg(long, value_enum, default_value_t = KindArg::Mixed)]
    pub(crate) kind: KindArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum KindArg {
    Mixed,
    Happy,
    Declined,
    OutOfStock,
    Unshippable,
    Transient,
}
