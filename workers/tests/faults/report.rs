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
    /// For each fault, the time until every order in flight when it struck
    /// had finished: the longest, the median and the 99th percentile.
    pub recover_seconds: Option<f64>,
    pub recover_p50_seconds: Option<f64>,
    pub recover_p99_seconds: Option<f64>,
    /// Orders whose history shows a wait on unavailable infrastructure
    /// (the outage was felt, and waited out).
    pub waited: usize,
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
        recover: &[Duration],
        seconds: Duration,
    ) -> Self {
        let mut sorted = recover.to_vec();
        sorted.sort();
        let pct = |q: f64| -> Option<f64> {
            let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
            sorted.get(i).map(Duration::as_secs_f64)
        };
        Self {
            scenario: scenario.to_owned(),
            orders: driven.report.orders,
            faults,
            faults_injected,
            lost: verdict.lost,
            duplicate_effects: verdict.duplicate_effects,
            missing_effects: verdict.missing_effects,
            dead_letters,
            recover_seconds: sorted.last().map(Duration::as_secs_f64),
            recover_p50_seconds: pct(0.5),
            recover_p99_seconds: pct(0.99),
            waited: crate::run::waited(driven),
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
            recover_p50_seconds: None,
            recover_p99_seconds: None,
            waited: 0,
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
pub fn write(rows: &[Row], repeat: usize) -> String {
    let mut t = String::from(
        "| Scenario | Orders | Faults injected | Lost | Duplicate / missing effects | Dead letters (expected) | Waited on infrastructure | Time to recover (p50 / p99 / max) | Order p99 | Run time | Result |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let secs = |s: Option<f64>| s.map_or_else(|| "–".to_owned(), |s| format!("{s:.1} s"));
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} | {} | {} | {} | {:.1} s | {:.1} s | {} |\n",
            r.scenario,
            r.orders,
            r.faults,
            r.lost,
            r.duplicate_effects,
            r.missing_effects,
            r.dead_letters,
            r.waited,
            match (r.recover_p50_seconds, r.recover_p99_seconds) {
                (Some(_), Some(_)) if r.faults_injected > 1 => format!(
                    "{} / {} / {}",
                    secs(r.recover_p50_seconds),
                    secs(r.recover_p99_seconds),
                    secs(r.recover_seconds)
                ),
                _ => secs(r.recover_seconds),
            },
            r.p99_ms / 1000.0,
            r.seconds,
            if r.passed() { "pass" } else { "FAIL" },
        ));
    }
    if repeat > 1 {
        t.push_str(&format!("\n{}", soak_summary(rows, repeat)));
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

/// Per scenario, over its repeated runs: runs, orders, wrong outcomes,
/// lost, duplicate effects, and the time to recover (p50 and p99 over the
/// runs' per-fault figures are not kept; the runs' own p50, p99 and max
/// are summarised by their median and worst).
fn soak_summary(rows: &[Row], repeat: usize) -> String {
    let mut t = format!(
        "Soak: each scenario {repeat} times\n\n\
         | Scenario | Runs passed | Orders | Wrong outcomes or lost | Duplicate / missing effects | Waited on infrastructure | Recovery p50 (median of runs) | Recovery p99 (worst run) | Recovery max (worst run) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    let secs = |s: Option<f64>| s.map_or_else(|| "–".to_owned(), |s| format!("{s:.1} s"));
    for name in names {
        let runs: Vec<&Row> = rows.iter().filter(|r| r.scenario == name).collect();
        let passed = runs.iter().filter(|r| r.passed()).count();
        let sum = |f: &dyn Fn(&Row) -> u64| runs.iter().map(|r| f(r)).sum::<u64>();
        let mut p50s: Vec<f64> = runs.iter().filter_map(|r| r.recover_p50_seconds).collect();
        p50s.sort_by(f64::total_cmp);
        let worst = |f: &dyn Fn(&Row) -> Option<f64>| runs.iter().filter_map(|r| f(r)).reduce(f64::max);
        t.push_str(&format!(
            "| {name} | {passed} of {} | {} | {} | {} / {} | {} | {} | {} | {} |\n",
            runs.len(),
            sum(&|r| r.orders as u64),
            sum(&|r| r.lost as u64),
            sum(&|r| r.duplicate_effects),
            sum(&|r| r.missing_effects),
            sum(&|r| r.waited as u64),
            secs(p50s.get(p50s.len() / 2).copied()),
            secs(worst(&|r| r.recover_p99_seconds)),
            secs(worst(&|r| r.recover_seconds)),
        ));
    }
    t
}
