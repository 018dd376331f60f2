//! What the tests that run the `waybill` command over NATS share.

use std::process::{Command, Output};

use waybill_testkit::workspace_root;

/// `waybill <args> --nats <url>`, run to its end.
pub fn waybill(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(args)
        .args(["--nats", url])
        .current_dir(workspace_root())
        .output()
        .expect("the waybill binary runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
