//! The programs people run, and what they are made of: the reference services
//! (payment, inventory, shipping) in [`services`], the replay of example
//! order flows in [`replay`], the operator's commands (coordinator, start,
//! status, orders, watch) in [`ops`], and what the programs share in
//! [`cli`]. The programs are in `src/bin/`: `waybill` and the three worker
//! binaries. [`otel`] exports the spans of steps to an OpenTelemetry
//! collector, one trace per order across hosts.

pub mod cancel;
pub mod cli;
pub mod dlq;
pub mod metrics;
pub mod ops;
pub mod otel;
pub mod replay;
pub mod services;
pub mod tables;
pub mod web;
