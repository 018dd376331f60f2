//! The processes of one scenario: nats-server (one, or a cluster), the
//! worker processes, a coordinator, all started here and stopped here.

use std::process::Command;
use std::time::Duration;

use waybill_testkit::{workspace_root, NatsCluster, NatsServer, Proc};

/// The worker binaries, by service: 0 payment, 1 inventory, 2 shipping,
/// 3 the trip's services (started only where a scenario asks:
/// [`Stack::start_trip_workers`]).
pub const WORKERS: [(&str, &str); 4] = [
    ("payment-worker", env!("CARGO_BIN_EXE_payment-worker")),
    ("inventory-worker", env!("CARGO_BIN_EXE_inventory-worker")),
    ("shipping-worker", env!("CARGO_BIN_EXE_shipping-worker")),
    ("trip-worker", env!("CARGO_BIN_EXE_trip-worker")),
];

/// The order workflows' services: what [`Stack::start_workers`] starts.
const ORDER_SERVICES: usize = 3;
/// The trip's services, in [`WORKERS`].
pub const TRIP: usize = 3;

const WAYBILL: &str = env!("CARGO_BIN_EXE_waybill");

/// A step a killed worker held comes back after this many seconds.
const ACK_WAIT: &str = "2";

#[derive(Debug)]
pub enum Servers {
    One(NatsServer),
    Cluster(NatsCluster),
}

/// A worker process and where it runs.
#[derive(Debug)]
pub struct WorkerProc {
    pub service: usize,
    pub node: usize,
    pub proc: Proc,
}

/// What a worker said as it drained (SIGTERM): its summary line.
#[derive(Debug, Clone, Default)]
pub struct Drained {
    pub steps: u64,
    pub dead_lettered: u64,
    pub redone: u64,
    /// The process's name and the last lines of its standard error, to
    /// show when a scenario fails.
    pub tail: String,
}

#[derive(Debug)]
pub struct Stack {
    pub servers: Servers,
    pub replicas: usize,
    pub workers: Vec<WorkerProc>,
    pub coordinator: Option<Proc>,
    pub coordinator_node: usize,
    /// Summaries of the workers drained so far.
    pub drained: Vec<Drained>,
    /// Extra options for every worker started from now on.
    pub worker_args: Vec<String>,
    /// How processes started from now on are told where NATS is.
    pub connect: Connect,
}

/// What a process is given as `--nats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// Only its own node's URL, as a process on its own host in its own
    /// zone would be (it may still learn the other nodes from the server).
    Own,
    /// The seed list of every node, the NATS convention.
    Seeds,
}

pub fn command(bin: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    // Warnings, and the line a worker prints once it serves.
    c.args(args)
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn,waybill_workers::cli=info");
    c
}

impl Stack {
    /// One nats-server.
    pub fn single() -> Self {
        Self::with(Servers::One(NatsServer::start()), 1)
    }

    /// A three-node cluster; streams and buckets with three replicas.
    pub fn cluster() -> Self {
        Self::with(Servers::Cluster(NatsCluster::start(3)), 3)
    }

    fn with(servers: Servers, replicas: usize) -> Self {
        let s = Self {
            servers,
            replicas,
            workers: Vec::new(),
            coordinator: None,
            coordinator_node: 0,
            drained: Vec::new(),
            worker_args: Vec::new(),
            connect: Connect::Own,
        };
        s.setup();
        s
    }

    pub fn url(&self, node: usize) -> String {
        match &self.servers {
            Servers::One(s) => s.url(),
            Servers::Cluster(c) => c.url(node % c.len()),
        }
    }

    /// Every node's URL, as a comma-separated seed list.
    pub fn seeds(&self) -> String {
        match &self.servers {
            Servers::One(s) => s.url(),
            Servers::Cluster(c) => (0..c.len()).map(|i| c.url(i)).collect::<Vec<_>>().join(","),
        }
    }

    /// What a process on `node` is given as `--nats` (see [`Connect`]).
    pub fn nats_for(&self, node: usize) -> String {
        match self.connect {
            Connect::Own => self.url(node),
            Connect::Seeds => self.seeds(),
        }
    }

    /// `waybill setup`: the streams, the buckets, the stock.
    fn setup(&self) {
        let replicas = self.replicas.to_string();
        let url = self.url(0);
        let args = [
            "setup",
            "--nats",
            &url,
            "--stock",
            "examples/stock.json",
            "--replicas",
            &replicas,
        ];
        let (status, stderr) = run_to_end("waybill setup", command(WAYBILL, &args));
        assert!(status.success(), "waybill setup failed: {stderr}");
    }

    /// Starts a worker of `service` connected to `node`.
    pub fn start_worker(&mut self, service: usize, node: usize) {
        let (name, bin) = WORKERS[service];
        let url = self.nats_for(node);
        let mut args = vec!["--nats", &url, "--ack-wait", ACK_WAIT];
        args.extend(self.worker_args.iter().map(String::as_str));
        let proc = Proc::spawn(format!("{name} on node {node}"), command(bin, &args));
        self.workers.push(WorkerProc { service, node, proc });
    }

    /// `per_service` workers of each service, spread over the nodes; waits
    /// until each is serving.
    pub fn start_workers(&mut self, per_service: usize) {
        let first = self.workers.len();
        for service in 0..ORDER_SERVICES {
            for k in 0..per_service {
                self.start_worker(service, service + k);
            }
        }
        self.await_serving(first);
    }

    /// `n` trip workers, spread over the nodes; waits until each serves.
    pub fn start_trip_workers(&mut self, n: usize) {
        let first = self.workers.len();
        for k in 0..n {
            self.start_worker(TRIP, k);
        }
        self.await_serving(first);
    }

    fn await_serving(&mut self, first: usize) {
        for w in &mut self.workers[first..] {
            w.proc.expect_stderr(" serving", Duration::from_secs(60));
        }
    }

    /// Starts the coordinator, connected to `node`.
    pub fn start_coordinator(&mut self, node: usize) {
        let url = self.nats_for(node);
        self.coordinator_node = node;
        self.coordinator = Some(Proc::spawn(
            "waybill coordinator",
            command(WAYBILL, &["coordinator", "--nats", &url]),
        ));
    }

    /// Stops the coordinator (SIGTERM) and returns the end of what it said.
    pub fn stop_coordinator(&mut self) -> String {
        match self.coordinator.take() {
            Some(c) => {
                let (_, stderr) = c.signal_and_wait("TERM", Duration::from_secs(30));
                tail("waybill coordinator", &stderr)
            }
            None => String::new(),
        }
    }

    /// SIGKILL of the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.kill9();
        }
    }

    /// SIGKILL of worker `i`, then the same worker started again.
    pub fn kill_and_restart_worker(&mut self, i: usize) {
        let w = self.workers.swap_remove(i);
        let (service, node) = (w.service, w.node);
        w.proc.kill9();
        self.start_worker(service, node);
    }

    /// Every worker and the coordinator are still running (none died on
    /// what it was given).
    pub fn assert_all_alive(&mut self) {
        if let Some(i) = self.workers.iter_mut().position(|w| !w.proc.alive()) {
            let dead = self.workers.swap_remove(i).proc;
            let name = dead.name.clone();
            let (status, stderr) = dead.wait_with_stderr(Duration::from_secs(5));
            panic!("{name} died during the run ({status}); it said:\n{stderr}");
        }
        if let Some(c) = &mut self.coordinator {
            if !c.alive() {
                let (status, stderr) = self
                    .coordinator
                    .take()
                    .unwrap()
                    .wait_with_stderr(Duration::from_secs(5));
                panic!("the coordinator died during the run ({status}); it said:\n{stderr}");
            }
        }
    }

    /// SIGTERM to every worker at once; each must finish what it holds and
    /// exit 0 with its summary line. Their summaries are kept.
    pub fn drain_workers(&mut self) {
        let workers = std::mem::take(&mut self.workers);
        for w in &workers {
            w.proc.signal("TERM");
        }
        for w in workers {
            let name = w.proc.name.clone();
            let (status, stderr) = w.proc.wait_with_stderr(Duration::from_secs(60));
            assert!(status.success(), "{name} did not drain cleanly: {status}\n{stderr}");
            let line = stderr
                .lines()
                .find(|l| l.contains("drained after "))
                .unwrap_or_else(|| panic!("{name} printed no summary:\n{stderr}"));
            let mut drained = parse_drained(line);
            drained.tail = tail(&name, &stderr);
            self.drained.push(drained);
        }
    }
}

/// `name` and the last lines of `stderr`.
fn tail(name: &str, stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let last = &lines[lines.len().saturating_sub(8)..];
    format!("{name} said, last:\n    {}", last.join("\n    "))
}

/// Runs a command to its end, within a minute; its status and standard
/// error.
pub fn run_to_end(name: &str, cmd: Command) -> (std::process::ExitStatus, String) {
    Proc::spawn(name, cmd).wait_with_stderr(Duration::from_secs(60))
}

/// `<name>: drained after N steps (D dead-lettered, R redone)`.
pub fn parse_drained(line: &str) -> Drained {
    let number_before = |word: &str| -> u64 {
        let head = line.split(word).next().unwrap_or("");
        head.trim_end()
            .rsplit([' ', '('])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count before `{word}` in `{line}`"))
    };
    Drained {
        steps: number_before(" steps"),
        dead_lettered: number_before(" dead-lettered"),
        redone: number_before(" redone"),
        tail: String::new(),
    }
}
