//! Bad input, sent while the mixed orders run: broken hops straight onto a
//! service's subject, each of which must become one dead letter carrying
//! its reason; bad start requests, each answered with a clear error; a
//! start repeated under the same id, run once. The workers and the
//! coordinator stay up, and the other orders are unaffected.

use std::time::Duration;

use bytes::Bytes;
use waybill::coordinator::api::StartReply;
use waybill::transport::nats::DLQ_STREAM;
use waybill::{headers, Document, Format, OrderId, Payload, Status, Workflow};
use waybill_workflows::Order;

use crate::report::Row;
use crate::run::{self, Driver};
use crate::stack::{command, run_to_end, Stack};

/// A good order, as a customer would send it.
const GOOD: &str = r#"{"customer":"c-bad-input","items":[{"sku":"SKU-1","qty":1,"unit_price_cents":100}],"payment":{"card":"4242424242424242"},"ship_to":{"country":"NL","zip":"1011"}}"#;

/// The workers refuse documents over this size.
const MAX_DOCUMENT: usize = 64 * 1024;

/// The header each broken hop carries to name its case; a dead letter
/// keeps the original headers.
const CASE: &str = "Test-Case";

fn doc_of(workflow: &Workflow, order: &Order) -> Document {
    Document::new(
        OrderId::new(),
        workflow.shared_route(),
        Payload::postcard(order).unwrap(),
    )
}

struct Hop {
    case: &'static str,
    /// What the dead letter's reason must say.
    reason: &'static str,
    service: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

/// The header values of a document's hop.
fn routing(doc: &Document) -> Vec<(&'static str, String)> {
    let h = headers::for_hop(doc, Format::Postcard);
    [headers::HOP, headers::CONTENT_TYPE]
        .into_iter()
        .filter_map(|n| h.get(n).map(|v| (n, v.to_owned())))
        .collect()
}

fn broken_hops() -> Vec<Hop> {
    let codec = waybill::Codec::default();
    let order_v1 = waybill_workflows::order_v1().unwrap();
    let order: Order = serde_json::from_str(GOOD).unwrap();
    let good = doc_of(&order_v1, &order);
    let good_bytes = codec.encode(&good, Format::Postcard).unwrap();
    let same_steps = |name: &str, version: u32| {
        Workflow::builder(name, version)
            .step("charge", "payment.charge")
            .build()
            .unwrap()
    };
    let other = |workflow: &Workflow| {
        let d = doc_of(workflow, &order);
        (routing(&d), codec.encode(&d, Format::Postcard).unwrap())
    };
    let mut rng = fastrand::Rng::with_seed(11);
    let mut random = vec![0u8; 512];
    rng.fill(&mut random);
    let without = |name: &str| -> Vec<(&'static str, String)> {
        routing(&good).into_iter().filter(|(n, _)| *n != name).collect()
    };
    let (unknown_wf_headers, unknown_wf) = other(&same_steps("refund", 1));
    let (unknown_ver_headers, unknown_ver) = other(&same_steps("order", 9));
    let mut big_order = order.clone();
    big_order.customer = "x".repeat(MAX_DOCUMENT + 1000);
    let big = doc_of(&order_v1, &big_order);
    let mut shipping = doc_of(&order_v1, &order);
    shipping.step = 2;
    let mut finished = doc_of(&order_v1, &order);
    finished.status = Status::Completed;
    let another = doc_of(&order_v1, &order);
    let charge = "payment.charge";
    vec![
        Hop {
            case: "random bytes",
            reason: "undecodable",
            service: charge,
            headers: routing(&good),
            body: random,
        },
        Hop {
            case: "a truncated document",
            reason: "undecodable",
            service: charge,
            headers: routing(&good),
            body: good_bytes[..good_bytes.len() / 2].to_vec(),
        },
        Hop {
            case: "an unknown workflow",
            reason: "unknown workflow `refund` version 1",
            service: charge,
            headers: unknown_wf_headers,
            body: unknown_wf,
        },
        Hop {
            case: "an unknown version",
            reason: "unknown workflow `order` version 9",
            service: charge,
            headers: unknown_ver_headers,
            body: unknown_ver,
        },
        Hop {
            case: "a wrong content type",
            reason: "unknown document content type `application/xml`",
            service: charge,
            headers: without(headers::CONTENT_TYPE)
                .into_iter()
                .chain([(headers::CONTENT_TYPE, "application/xml".to_owned())])
                .collect(),
            body: good_bytes.clone(),
        },
        Hop {
            case: "no content type",
            reason: "no content type",
            service: charge,
            headers: without(headers::CONTENT_TYPE),
            body: good_bytes.clone(),
        },
        Hop {
            case: "a document over the size limit",
            reason: "over the limit of 65536",
            service: charge,
            headers: routing(&big),
            body: codec.encode(&big, Format::Postcard).unwrap(),
        },
        Hop {
            case: "headers of another order",
            reason: "headers disagree with the body",
            service: charge,
            headers: routing(&another),
            body: good_bytes.clone(),
        },
        Hop {
            case: "no routing header",
            reason: "headers disagree with the body",
            service: charge,
            headers: without(headers::HOP),
            body: good_bytes,
        },
        Hop {
            case: "a hop for another service",
            reason: "hop addressed to `shipping.dispatch` arrived on `payment.charge`",
            service: charge,
            headers: routing(&shipping),
            body: codec.encode(&shipping, Format::Postcard).unwrap(),
        },
        Hop {
            case: "a finished order",
            reason: "a terminal document is no work",
            service: charge,
            headers: routing(&finished),
            body: codec.encode(&finished, Format::Postcard).unwrap(),
        },
    ]
}

/// Publishes the broken hops into the hop stream, as a faulty client
/// would; returns them.
async fn send_broken_hops(js: &async_nats::jetstream::Context) -> Vec<Hop> {
    let hops = broken_hops();
    for (i, hop) in hops.iter().enumerate() {
        let mut h = async_nats::HeaderMap::new();
        for (name, value) in &hop.headers {
            h.insert(*name, value.as_str());
        }
        h.insert(CASE, hop.case);
        h.insert("Nats-Msg-Id", format!("bad-input-{i}").as_str());
        js.publish_with_headers(format!("waybill.hop.{}", hop.service), h, Bytes::from(hop.body.clone()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    hops
}

/// Each dead letter's case and reason.
async fn dead_letters(js: &async_nats::jetstream::Context) -> Vec<(String, String)> {
    let stream = js.get_stream(DLQ_STREAM).await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let get = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
            out.push((get(CASE), get(headers::DLQ_REASON)));
        }
    }
    out
}

async fn ask(
    client: &async_nats::Client,
    subject: &str,
    headers: async_nats::HeaderMap,
    body: Bytes,
) -> serde_json::Value {
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(body)
        .timeout(Some(Duration::from_secs(10)));
    let reply = client.send_request(subject.to_owned(), request).await.unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Bad start requests to the coordinator: each gets an error naming the
/// problem. Returns the problems found.
async fn bad_starts(url: &str) -> Vec<String> {
    let client = async_nats::connect(url).await.unwrap();
    let mut problems = Vec::new();
    let empty_items =
        r#"{"customer":"c-1","items":[],"payment":{"card":"4242424242424242"},"ship_to":{"country":"NL","zip":"1"}}"#;
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "missing fields",
            "order",
            br#"{"customer":"c-1"}"#.to_vec(),
            "missing field `items`",
        ),
        (
            "a wrong type",
            "order",
            GOOD.replace(r#""qty":1"#, r#""qty":"one""#).into_bytes(),
            "invalid type",
        ),
        (
            "a negative quantity",
            "order",
            GOOD.replace(r#""qty":1"#, r#""qty":-3"#).into_bytes(),
            "items[0].qty: must be at least 1, got -3",
        ),
        (
            "an empty item list",
            "order",
            empty_items.as_bytes().to_vec(),
            "at least one item",
        ),
        (
            "an unknown workflow",
            "refund",
            GOOD.as_bytes().to_vec(),
            "unknown workflow `refund`",
        ),
        (
            "not JSON",
            "order",
            b"\x00\xffnot json".to_vec(),
            "invalid order payload",
        ),
        // Just under NATS's own 1 MB limit, well over the coordinator's.
        ("a 1000 KB body", "order", vec![b' '; 1000 * 1024], "over the limit"),
    ];
    for (case, workflow, body, want) in cases {
        let v = ask(
            &client,
            &format!("waybill.start.{workflow}"),
            async_nats::HeaderMap::new(),
            body.into(),
        )
        .await;
        match v["error"].as_str() {
            Some(e) if e.contains(want) => {}
            _ => problems.push(format!("start with {case}: expected an error with `{want}`, got {v}")),
        }
    }
    // A 10 MB body is over NATS's limit: the client refuses to send it.
    let huge = Bytes::from(vec![b'x'; 10 * 1024 * 1024]);
    if client.request("waybill.start.order", huge).await.is_ok() {
        problems.push("a 10 MB start request was sent and answered".into());
    }
    // And `waybill start` says why before sending anything.
    let file = std::env::temp_dir().join(format!("waybill-huge-{}.json", OrderId::new()));
    let huge_order = GOOD.replace("c-bad-input", &"x".repeat(10 * 1024 * 1024));
    std::fs::write(&file, huge_order).unwrap();
    let (status, stderr) = run_to_end(
        "waybill start",
        command(
            env!("CARGO_BIN_EXE_waybill"),
            &["start", "order", &file.display().to_string(), "--nats", url],
        ),
    );
    let _ = std::fs::remove_file(&file);
    if status.success() || !stderr.contains("over the coordinator's limit") {
        problems.push(format!("`waybill start` of a 10 MB order: {status}: {stderr}"));
    }
    problems
}

/// Starts one order through the coordinator twice under the same id: the
/// second answer says `duplicate`. Returns its final document (it must run
/// once: the ledger check sees a second charge).
async fn duplicate_start(url: &str, driver: &Driver, problems: &mut Vec<String>) -> Option<Document> {
    let client = async_nats::connect(url).await.unwrap();
    let id = OrderId::new();
    // Follow it before it can finish.
    let mut wait = Box::pin(driver.client.wait(id));
    assert!(futures::poll!(&mut wait).is_pending());
    let mut answers = Vec::new();
    for _ in 0..2 {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::ORDER, id.to_string().as_str());
        let v = ask(&client, "waybill.start.order", h, Bytes::from(GOOD)).await;
        match serde_json::from_value::<StartReply>(v.clone()) {
            Ok(r) => answers.push(r.duplicate),
            Err(_) => problems.push(format!("start of {id}: {v}")),
        }
    }
    if answers != [false, true] {
        problems.push(format!("starting {id} twice answered duplicate = {answers:?}"));
    }
    match tokio::time::timeout(Duration::from_secs(60), wait).await {
        Ok(Ok(doc)) => Some((*doc).clone()),
        other => {
            problems.push(format!("the order started twice did not finish: {other:?}"));
            None
        }
    }
}

pub async fn scenario() -> Row {
    let mut stack = Stack::single();
    stack.worker_args = vec!["--max-document-bytes".into(), MAX_DOCUMENT.to_string()];
    let orders = run::mixed();
    let mut sc = crate::Scene::new(stack, 0, 1, orders.len()).await;
    let url = sc.stack.url(0);
    let js = sc.driver.js.clone();
    let run = sc.driver.start(orders);
    sc.trigger.at(0.25).await;
    sc.trigger.fault();
    let hops = send_broken_hops(&js).await;
    let mut problems = bad_starts(&url).await;
    let twice = duplicate_start(&url, &sc.driver, &mut problems).await;
    let mut driven = run.done().await;
    if let Some(doc) = twice {
        if doc.status != Status::Completed {
            problems.push(format!("the order started twice ended {}", doc.status));
        }
        driven.finals.insert(doc.id, doc);
    }
    let letters = dead_letters(&js).await;
    for hop in &hops {
        let found: Vec<&(String, String)> = letters.iter().filter(|(case, _)| case == hop.case).collect();
        match found.as_slice() {
            [(_, reason)] if reason.contains(hop.reason) => {}
            _ => problems.push(format!(
                "{}: expected one dead letter saying `{}`, found {found:?}",
                hop.case, hop.reason
            )),
        }
    }
    let faults = format!("{} broken hops, 9 bad start requests, 1 repeated start", hops.len());
    let expected = hops.len() as u64;
    let (mut row, _) = sc.end("bad input", faults, driven, expected).await;
    row.faults_injected = hops.len() + 9 + 1;
    row.problems.extend(problems);
    row
}
