//! The table the suite prints and writes to `target/reliability/`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::run::{Driven, Verdict};

/// One scenario's figures.
#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub orders: usize,
    /// What was done to the stack.
    pub faults: String,
    pub faults_injected: usize,
    /// Orders that did not end as expected, or that the coordinator sees
    /// otherwise (must be 0).
    pub lost: usize,
    /// Effects done twice or where none was due (must be 0).
    pub duplicate_effects: u64,
    /// Effects due and not done (must be 0).
    pub missing_effects: u64,
    /// Dead letters found, all of them expected (bad input only).
    pub dead_letters: u64,
    /// The longest time from a fault to the next order finishing.
    pub recover_seconds: Option<f64>,
    /// The whole scenario: start-up, orders, faults.
    pub seconds: f64,
    pub orders_per_sec: f64,
    /// The 99th percentile of the orders' start-to-end times.
    pub p99_ms: f64,
    pub problems: Vec<String>,
}

impl Row {
    pub fn new(
        scenario: &str,
        driven: &Driven,
        (faults, faults_injected): (String, usize),
        verdict: &Verdict,
        dead_letters: u64,
        recover: Option<Duration>,
        seconds: Duration,
    ) -> Self {
        Self {
            scenario: scenario.to_owned(),
            orders: driven.report.orders,
            faults,
            faults_injected,
            lost: verdict.lost,
            duplicate_effects: verdict.duplicate_effects,
            missing_effects: verdict.missing_effects,
            dead_letters,
            recover_seconds: recover.map(|d| d.as_secs_f64()),
            seconds: seconds.as_secs_f64(),
            orders_per_sec: driven.report.orders_per_sec,
            p99_ms: driven.report.p99_ms,
            problems: verdict.problems.clone(),
        }
    }

    /// A scenario that stopped on a failed check.
    pub fn crashed(scenario: &str, why: String, seconds: Duration) -> Self {
        Self {
            scenario: scenario.to_owned(),
            orders: 0,
            faults: String::new(),
            faults_injected: 0,
            lost: 0,
            duplicate_effects: 0,
            missing_effects: 0,
            dead_letters: 0,
            recover_seconds: None,
            seconds: seconds.as_secs_f64(),
            orders_per_sec: 0.0,
            p99_ms: 0.0,
            problems: vec![format!("stopped: {why}")],
        }
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.lost == 0 && self.duplicate_effects == 0 && self.missing_effects == 0
    }
}

fn directory() -> PathBuf {
    // `CARGO_TARGET_TMPDIR` is `<target>/tmp`.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .map_or(tmp.clone(), |t| t.to_path_buf())
        .join("reliability")
}

/// Renders the rows as a Markdown table, writes it and the JSON next to it,
/// and returns the table.
pub fn write(rows: &[Row]) -> String {
    let mut t = String::from(
        "| Scenario | Orders | Faults injected | Lost | Duplicate / missing effects | Dead letters (expected) | Time to recover | Order p99 | Run time | Result |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} | {} | {} | {:.1} s | {:.1} s | {} |\n",
            r.scenario,
            r.orders,
            r.faults,
            r.lost,
            r.duplicate_effects,
            r.missing_effects,
            r.dead_letters,
            r.recover_seconds
                .map_or_else(|| "–".to_owned(), |s| format!("{s:.1} s")),
            r.p99_ms / 1000.0,
            r.seconds,
            if r.passed() { "pass" } else { "FAIL" },
        ));
    }
    let dir = directory();
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("report.md"), &t))
        .and_then(|()| {
            std::fs::write(
                dir.join("report.json"),
                serde_json::to_vec_pretty(rows).unwrap_or_default(),
            )
        });
    match written {
        Ok(()) => t.push_str(&format!("\n(written to {})\n", dir.join("report.md").display())),
        Err(e) => t.push_str(&format!("\n(could not write {}: {e})\n", dir.display())),
    }
    t
}
