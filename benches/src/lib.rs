//! Shared pieces of Waybill's benchmarks. See `benches/README.md`.

pub mod counts;
pub mod cpu;

use std::path::PathBuf;

use waybill_workers::replay::PreparedOrder;
use waybill_workflows::samples;

/// Why a shared piece of a benchmark could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The workflows do not build.
    #[error(transparent)]
    Workflow(#[from] waybill::DefinitionError),
    /// A generated order is refused.
    #[error(transparent)]
    Order(#[from] waybill::StartError),
    /// This program's own path is not known.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The server's stream list could not be read.
    #[error("cannot list the streams: {0}")]
    Streams(String),
    #[error("no folder beside this binary")]
    NoFolder,
    /// The program asked for is not built.
    #[error("{} is missing: cargo build --release -p waybill-workers", .0.display())]
    Missing(PathBuf),
}

/// `count` mixed orders (the generator's seed 7), validated and encoded as a
/// replay starts them.
pub fn mixed_orders(count: usize) -> Result<Vec<PreparedOrder>, BenchError> {
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
                actions: Vec::new(),
            })
        })
        .collect()
}

/// A program built beside the running benchmark (`target/release/<name>`).
pub fn bin(name: &str) -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().ok_or(BenchError::NoFolder)?.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(BenchError::Missing(path))
    }
}
