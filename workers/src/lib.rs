//! The programs people run, and what they are made of: the reference services
//! (payment, inventory, shipping) in [`services`], and the replay of example
//! order flows on the embedded default in [`replay`]. The `waybill` command
//! line is `src/bin/waybill.rs`.

pub mod replay;
pub mod services;
