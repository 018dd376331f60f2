//! Any bytes as the body of a start request for the `order` workflow:
//! an error or a valid payload, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use waybill::Registry;

static REGISTRY: OnceLock<Registry> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let registry = REGISTRY.get_or_init(|| waybill_workflows::registry().expect("the built-in workflows build"));
    if let Ok((_, payload)) = registry.prepare_json("order", data) {
        let order: waybill_workflows::Order = payload.decode().expect("an accepted order decodes");
        assert!(order.check().is_ok(), "an accepted order is valid");
    }
});
