//! Micro-benchmarks of the hot path of one hop: encoding and decoding a
//! typical order document, and one transition.

// Inputs known to be good: a failure is a broken benchmark, and it stops.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use waybill::transition::{self, Attempt, StepResult};
use waybill::{Codec, Document, Format, OrderId, Payload, Timestamp, WorkerId};
use waybill_workflows::samples::{self, Kind};

/// An order document as it looks on its last hop: three steps in its history.
fn typical() -> Document {
    let wf = waybill_workflows::order_v1().expect("order workflow builds");
    let order = samples::of_kind(Kind::Happy, 1, 42).remove(0).order;
    let mut doc = Document::new(
        OrderId::new(),
        wf.shared_route(),
        Payload::postcard(&order).expect("order encodes"),
    );
    for _ in 0..2 {
        transition::apply(&mut doc, attempt(StepResult::ok())).expect("running");
    }
    doc
}

fn attempt(result: StepResult) -> Attempt {
    Attempt {
        result,
        worker: WorkerId::new("bench-1"),
        started_at: Timestamp(1),
        ended_at: Timestamp(2),
        jitter: 0.5,
    }
}

fn codec(c: &mut Criterion) {
    let codec = Codec::default();
    let doc = typical();
    for format in [Format::Postcard, Format::Json] {
        let bytes = codec.encode(&doc, format).expect("encodes");
        let name = format!("{format:?}").to_lowercase();
        println!("{name}: a typical order document is {} bytes", bytes.len());
        c.bench_function(&format!("encode/{name}"), |b| {
            b.iter(|| codec.encode(black_box(&doc), format).expect("encodes"))
        });
        c.bench_function(&format!("decode/{name}"), |b| {
            b.iter(|| codec.decode(black_box(&bytes), format).expect("decodes"))
        });
    }
    c.bench_function("transition/ok", |b| {
        b.iter_batched(
            typical,
            |mut d| transition::apply(&mut d, attempt(StepResult::ok())).expect("running"),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("transition/permanent_failure", |b| {
        b.iter_batched(
            typical,
            |mut d| transition::apply(&mut d, attempt(StepResult::Permanent("no".into()))).expect("running"),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
