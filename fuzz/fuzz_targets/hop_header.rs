//! Any text as a hop's `Waybill-Hop` header: parsed or refused, and checked
//! against a document without panicking; only the header the document's
//! own hop would carry passes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use waybill::transport::Headers;
use waybill::{headers, Document, Format, OrderId, Payload, Workflow};

static DOC: OnceLock<Document> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let doc = DOC.get_or_init(|| {
        let wf = Workflow::builder("order", 1)
            .step("charge", "payment.charge")
            .build()
            .expect("the workflow builds");
        Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&1u8).expect("encodes"))
    });
    let _ = headers::HopHeader::parse(text);
    let mut h = Headers::new();
    h.insert(headers::HOP, text);
    h.insert(headers::CONTENT_TYPE, Format::Postcard.content_type());
    if headers::verify(&h, doc).is_ok() {
        let real = headers::for_hop(doc, Format::Postcard);
        let want = real.get(headers::HOP).expect("the hop header");
        let (got, want) = (headers::HopHeader::parse(text), headers::HopHeader::parse(want));
        assert_eq!(got.map(|g| (g.hop, g.status, g.service)), want.map(|w| (w.hop, w.status, w.service)));
    }
});
