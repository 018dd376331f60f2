//! Shared pieces of Waybill's benchmarks. See `benches/README.md`.

pub mod counts;
pub mod cpu;

use waybill_workers::replay::PreparedOrder;
use waybill_workflows::samples;

/// `count` mixed orders (the generator's seed 7), validated and encoded as a
/// replay starts them.
pub fn mixed_orders(count: usize) -> anyhow::Result<Vec<PreparedOrder>> {
    let registry = waybill_workflows::registry()?;
    samples::mixed(count, 7)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let (workflow, payload) = registry.prepare(waybill_workflows::ORDER, &s.order)?;
            Ok(PreparedOrder {
                line: i + 1,
                expect: s.expect,
                workflow,
                payload,
            })
        })
        .collect()
}

/// A program built beside the running benchmark (`target/release/<name>`).
pub fn bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let dir = std::env::current_exe()?
        .parent()
        .context("no folder beside this binary")?
        .to_path_buf();
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: cargo build --release -p waybill-workers",
        path.display()
    );
    Ok(path)
}
