//! End to end over NATS, as a user deploys it: `waybill setup`, the three
//! worker binaries as separate processes, and `waybill replay --nats`, all
//! against a throwaway nats-server started by the test.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use waybill_testkit::NatsServer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn waybill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// A worker process, killed on drop if the test did not stop it.
struct Proc {
    name: &'static str,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &'static str, bin: &str, args: &[&str]) -> Self {
        let child = Command::new(bin)
            .args(args)
            .current_dir(root())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            name,
            child: Some(child),
        }
    }

    /// Sends SIGTERM and waits (with a deadline) for the process to exit.
    fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within 20 s of SIGTERM",
                self.name
            );
            // Polling the child's exit status, bounded by the deadline.
            std::thread::sleep(Duration::from_millis(20));
        }
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

fn workers(url: &str) -> Vec<Proc> {
    vec![
        Proc::spawn("payment-worker", env!("CARGO_BIN_EXE_payment-worker"), &["--nats", url]),
        Proc::spawn(
            "inventory-worker",
            env!("CARGO_BIN_EXE_inventory-worker"),
            &["--nats", url, "--stock", "examples/stock.json"],
        ),
        Proc::spawn(
            "shipping-worker",
            env!("CARGO_BIN_EXE_shipping-worker"),
            &["--nats", url],
        ),
    ]
}

#[test]
fn the_mixed_flows_replay_across_worker_processes() {
    let server = NatsServer::start();
    let url = server.url();
    let setup = waybill(&["setup", "--nats", &url]);
    assert!(setup.status.success(), "{}", String::from_utf8_lossy(&setup.stderr));
    // Idempotent: a second setup finds the streams as they should be.
    assert!(waybill(&["setup", "--nats", &url]).status.success());

    let procs = workers(&url);
    let out = waybill(&["replay", "--no-progress", "--nats", &url, "examples/orders"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("examples/orders/mixed.jsonl") && stdout.contains("all orders ended as expected"));

    // SIGTERM drains every worker, which then exits 0.
    for p in procs {
        let name = p.name;
        let (status, stderr) = p.terminate();
        assert!(status.success(), "{name} exited with {status}: {stderr}");
    }
}

#[test]
fn a_worker_refuses_to_start_without_the_streams() {
    let server = NatsServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_shipping-worker"))
        .args(["--nats", &server.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WAYBILL_HOPS") && stderr.contains("waybill setup"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_server_is_reported_after_the_connect_timeout() {
    let url = {
        let server = NatsServer::start();
        server.url()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_payment-worker"))
        .args(["--nats", &url, "--connect-timeout", "1"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not reach NATS") && stderr.contains("within 1 s"),
        "{stderr}"
    );
}
