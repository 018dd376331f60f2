//! Shared pieces of Waybill's benchmarks. See `benches/README.md`.
