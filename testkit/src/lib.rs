//! Test support: throwaway nats-server processes, alone or as a cluster.
//!
//! [`NatsServer::start`] runs a nats-server of a supported version on a free
//! loopback port with JetStream and a store directory of its own; dropping
//! the guard kills the process and deletes the directory. The binary is
//! `$WAYBILL_NATS_SERVER` if set (`scripts/test` sets it to the pinned one),
//! else the one `scripts/install-nats-server` put in the checkout's `.tools/`,
//! else `nats-server` on `PATH`. A missing or too old binary fails the test
//! loudly: these tests never skip, and never use a server they did not start.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure here is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The oldest server these tests accept.
const MIN_VERSION: (u64, u64) = (2, 10);

/// A running nats-server, killed and cleaned up on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: PathBuf,
    store: PathBuf,
    port: u16,
}

/// The nats-server binary the tests use, after checking its version.
pub fn nats_server_binary() -> PathBuf {
    // Else the one scripts/install-nats-server put in the checkout's
    // .tools/, so `cargo test` works on its own after one scripts/test.
    let installed = || -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(workspace_root().join(".tools"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin/nats-server")))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop()
    };
    let bin = std::env::var_os("WAYBILL_NATS_SERVER")
        .map(PathBuf::from)
        .or_else(installed)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let out = Command::new(&bin).arg("--version").output().unwrap_or_else(|e| {
        panic!(
            "cannot run nats-server ({}): {e}. The NATS tests need nats-server {}.{} or later: run them \
             through scripts/test, or set WAYBILL_NATS_SERVER=$(scripts/install-nats-server)",
            bin.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        )
    });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text
        .trim()
        .trim_start_matches("nats-server: ")
        .trim_start_matches('v')
        .to_owned();
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= MIN_VERSION,
        "{} is nats-server {version}; the NATS tests need {}.{} or later (scripts/test installs one)",
        bin.display(),
        MIN_VERSION.0,
        MIN_VERSION.1
    );
    bin
}

fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "waybill-{tag}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl NatsServer {
    /// Starts a server with JetStream on a free port.
    pub fn start() -> Self {
        let dir = scratch_dir("nats");
        let store = dir.join("store");
        let mut s = Self {
            child: None,
            dir,
            store,
            port: 0,
        };
        s.launch(None);
        s
    }

    fn launch(&mut self, port: Option<u16>) {
        let bin = nats_server_binary();
        let ports = self.dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports);
        std::fs::create_dir_all(&ports).unwrap();
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
            .arg(&self.store)
            .arg("--ports_file_dir")
            .arg(&ports)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.child = Some(child);
        self.port = wait_for_port(&ports, pid, &self.dir);
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (0 while it is killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the server (SIGKILL) and waits until it is gone; the store stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.launch(Some(port));
    }
}

/// Waits for nats-server to write its ports file, and returns the client port.
fn wait_for_port(dir: &Path, pid: u32, log_dir: &Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let file = dir.join(format!("nats-server_{pid}.ports"));
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(url) = v["nats"][0].as_str() {
                    if let Some(port) = url.rsplit(':').next().and_then(|p| p.parse().ok()) {
                        return port;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "nats-server did not start within 20 s; its log: {}",
            std::fs::read_to_string(log_dir.join("server.log")).unwrap_or_default()
        );
        // Polling a file the server writes once it listens; bounded by the
        // deadline above.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cluster of nats-server processes on loopback ports, each with
/// JetStream and a store of its own, formed through routes to one another:
/// the real thing, for replicated streams and for killing a node.
#[derive(Debug)]
pub struct NatsCluster {
    dir: PathBuf,
    nodes: Vec<ClusterNode>,
}

#[derive(Debug)]
struct ClusterNode {
    name: String,
    config: PathBuf,
    client: u16,
    http: u16,
    child: Option<Child>,
}

/// Free loopback ports, found by binding port 0 and letting go (another
/// process could take one in between; on a test machine that is rare, and
/// the server then fails loudly).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

impl NatsCluster {
    /// Starts `n` nodes (`n1`…) and waits until they have formed: every
    /// node sees a JetStream meta leader and every peer current.
    pub fn start(n: usize) -> Self {
        let dir = scratch_dir("cluster");
        let ports = free_ports(3 * n);
        let routes: Vec<String> = (0..n)
            .map(|i| format!("nats-route://127.0.0.1:{}", ports[3 * i + 1]))
            .collect();
        let nodes = (0..n)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let (client, cluster, http) = (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
                let config = dir.join(format!("{name}.conf"));
                let text = format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\n\
                     jetstream {{ store_dir: \"{}\", max_mem_store: 256MB, max_file_store: 64GB }}\n\
                     cluster {{ name: waybill-test, listen: 127.0.0.1:{cluster}, routes: [{}] }}\n",
                    dir.join(&name).display(),
                    routes.join(", ")
                );
                std::fs::write(&config, text).unwrap();
                ClusterNode {
                    name,
                    config,
                    client,
                    http,
                    child: None,
                }
            })
            .collect();
        let mut c = Self { dir, nodes };
        for i in 0..n {
            c.launch(i);
        }
        c.wait_formed(Duration::from_secs(60));
        c
    }

    fn launch(&mut self, i: usize) {
        let bin = nats_server_binary();
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", node.name)))
            .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client)
    }

    /// Node `i`'s server name (`n1`…), as stream and meta info name it.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Kills node `i` (SIGKILL) and waits until it is gone; its store stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its ports and store, and waits until the
    /// cluster has formed again with it.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
        self.wait_formed(Duration::from_secs(60));
    }

    /// Waits until the cluster has formed: every node answers on its
    /// monitoring port naming the same JetStream meta leader, and the
    /// leader (only it tracks the others) sees every peer current.
    pub fn wait_formed(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let metas: Vec<Result<serde_json::Value, String>> = self
                .nodes
                .iter()
                .map(|node| {
                    let body = http_get(node.http, "/jsz").map_err(|e| format!("{}: {e}", node.name))?;
                    let v: serde_json::Value =
                        serde_json::from_str(&body).map_err(|e| format!("{}: {e}: {body}", node.name))?;
                    Ok(v["meta_cluster"].clone())
                })
                .collect();
            let formed = || -> Result<(), String> {
                let metas = metas.iter().cloned().collect::<Result<Vec<_>, _>>()?;
                let leader = metas[0]["leader"].as_str().unwrap_or_default();
                if leader.is_empty() || metas.iter().any(|m| m["leader"].as_str() != Some(leader)) {
                    return Err(format!("no agreed leader: {metas:?}"));
                }
                let i = self
                    .index_of(leader)
                    .ok_or_else(|| format!("unknown leader {leader}"))?;
                let peers = metas[i]["replicas"].as_array().cloned().unwrap_or_default();
                if peers.len() + 1 != self.nodes.len() || !peers.iter().all(|p| p["current"] == true) {
                    return Err(format!(
                        "the leader {leader} does not see every peer current: {}",
                        metas[i]
                    ));
                }
                Ok(())
            };
            match formed() {
                Ok(()) => return,
                Err(last) => assert!(
                    Instant::now() < deadline,
                    "the cluster did not form within {within:?}; last seen: {last}; logs in {}",
                    self.dir.display()
                ),
            }
            // Polling the monitoring endpoint, bounded by the deadline.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A plain HTTP/1.0 GET on a loopback port (a monitoring or metrics
/// endpoint), body only.
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process, killed on drop if the test did not stop it. Its
/// standard error is read line by line as it comes (so a chatty process
/// never blocks on a full pipe), for [`Proc::expect_stderr`] and the
/// accounts of [`Proc::signal_and_wait`].
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(err).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Self {
            name: name.into(),
            child: Some(child),
            lines,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits, with a deadline, for a line of standard error that contains
    /// `needle`, and returns it.
    pub fn expect_stderr(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    panic!(
                        "{} ended ({status:?}) without printing `{needle}`; its standard error:\n{}",
                        self.name,
                        self.seen.join("\n")
                    )
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{} did not print `{needle}` within {within:?}; its standard error so far:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Whether the process is still running (it has not exited or crashed).
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: the process dies with whatever it held in flight.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`TERM`, `INT`, `STOP`…) without waiting.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        assert!(Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .unwrap()
            .success());
    }

    /// Sends `signal` (`TERM`, `INT`) and waits, with a deadline, for the
    /// process to exit; returns its status and standard error.
    pub fn signal_and_wait(self, signal: &str, within: Duration) -> (std::process::ExitStatus, String) {
        self.signal(signal);
        self.wait_with_stderr(within)
    }

    /// Waits, with a deadline, for the process to exit; returns its status
    /// and standard error.
    pub fn wait_with_stderr(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = wait_child(&mut child, within, &self.name);
        // The reader thread ends with the pipe; collect what it read.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        (status, self.seen.join("\n"))
    }

    /// Waits, with a deadline, for the process to exit by itself.
    pub fn wait(mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_child(&mut child, within, &self.name)
    }
}

fn wait_child(child: &mut Child, within: Duration, name: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{name} did not exit within {within:?}");
        // Polling the child's exit status, bounded by the deadline.
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The workspace's root folder (where `examples/` is), for tests that run
/// the programs as a user would.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}
