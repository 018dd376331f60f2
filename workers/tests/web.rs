//! The coordinator's web page in a real browser (Debian's Chromium, headless,
//! driven over WebDriver by chromedriver; `scripts/install-chromium` puts
//! both in `.tools/` and `scripts/test` names them in `WAYBILL_CHROMIUM` and
//! `WAYBILL_CHROMEDRIVER`). A nats-server, the coordinator with `--http`,
//! the three worker binaries and a replay of the mixed example orders (some
//! fail, some are compensated), with three orders dead-lettered first; the
//! page's counts must agree with the coordinator's own, an order's link
//! must lead to its timeline, and the dead letters' buttons must work.
//! Screenshots go to `target/web-screenshots/`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use waybill::transport::nats::Nats;
use waybill::transport::NatsConfig;
use waybill::{Client, OrderId, Payload, StepContext, StepError, Worker};
use waybill_testkit::{workspace_root, NatsServer, Proc};
use waybill_workflows::samples::{self, Kind};

mod common;
use common::{text, waybill};

const DEADLINE: Duration = Duration::from_secs(30);

/// A path from the environment `scripts/test` sets, or a loud failure.
fn tool(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{var} is not set: the browser test needs Debian's Chromium and chromedriver; \
             run scripts/test, or `eval \"$(scripts/install-chromium)\"` and export {var}"
        ),
    }
}

fn port_after(line: &str, marker: &str) -> u16 {
    line.rsplit(marker)
        .next()
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port after {marker:?} in {line:?}"))
}

/// chromedriver on a port of its choosing, its temporary files in `tmp`.
fn chromedriver(tmp: &std::path::Path) -> (Proc, u16) {
    let driver = tool("WAYBILL_CHROMEDRIVER");
    let mut cmd = Command::new("sh");
    // It says where it listens on standard output: sent to standard error,
    // where the test reads.
    cmd.args(["-c", "exec \"$0\" --port=0 >&2"])
        .arg(&driver)
        .env("TMPDIR", tmp);
    let mut proc = Proc::spawn("chromedriver", cmd);
    let line = proc.expect_stderr("started successfully on port", DEADLINE);
    (proc, port_after(&line, "on port "))
}

async fn browser(driver_port: u16) -> Browser {
    let chromium = tool("WAYBILL_CHROMIUM");
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1000"],
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .unwrap()
}

/// `1548` as the page writes it: `1,548`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Waits until the tile `key` shows `n` (the page updates once a second).
async fn until_tile(b: &Browser, key: &str, n: u64) {
    let xpath = format!("//*[@data-count='{key}']/span[@class='n' and text()='{}']", grouped(n));
    if let Err(e) = b.wait().at_most(DEADLINE).for_element(Locator::XPath(&xpath)).await {
        let shown = tile(b, key).await;
        panic!("the tile {key} never showed {n} (it shows {shown:?}): {e}");
    }
}

async fn tile(b: &Browser, key: &str) -> String {
    let css = format!("[data-count='{key}'] .n");
    match b.find(Locator::Css(&css)).await {
        Ok(e) => e.text().await.unwrap(),
        Err(e) => format!("no tile: {e}"),
    }
}

/// Waits until the element with `id` says `needle` (the page's own
/// updates: an answer to an action, or the next live redraw).
async fn until_text(b: &Browser, id: &str, needle: &str) {
    let xpath = format!("//*[@id='{id}' and contains(., '{needle}')]");
    if let Err(e) = b.wait().at_most(DEADLINE).for_element(Locator::XPath(&xpath)).await {
        let now = match b.find(Locator::Id(id)).await {
            Ok(el) => el.text().await.unwrap_or_default(),
            Err(e) => format!("nothing: {e}"),
        };
        panic!("#{id} never said {needle:?}; it says {now:?}: {e}");
    }
}

async fn screenshot(b: &Browser, name: &str) {
    let dir = workspace_root().join("target/web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(dir.join(name), png).unwrap();
}

fn binary(name: &str, path: &str, url: &str) -> Proc {
    let mut cmd = Command::new(path);
    cmd.args(["--nats", url]).current_dir(workspace_root());
    Proc::spawn(name, cmd)
}

/// Orders whose charge can never run: each becomes a dead letter once its
/// deliveries run out (the consumer's settings are the worker binary's).
async fn dead_letter_three(url: &str) -> Vec<OrderId> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures::StreamExt;
    let nats = Nats::connect(url, NatsConfig::default()).await.unwrap();
    let registry = Arc::new(waybill_workflows::registry().unwrap());
    let client = Client::connect(nats.clone()).await.unwrap();
    let broken = Worker::builder(nats.clone())
        .serve(
            waybill_workflows::services::PAYMENT_CHARGE,
            |_ctx: StepContext, _p: Payload| async { Err(StepError::defer("gateway away", Duration::from_millis(20))) },
        )
        .start()
        .await
        .unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = js.get_stream(waybill::transport::nats::DLQ_STREAM).await.unwrap();
    let mut stored = stream
        .create_consumer(OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for s in samples::of_kind(Kind::Happy, 3, 11) {
        let (wf, p) = registry.prepare(waybill_workflows::ORDER, &s.order).unwrap();
        ids.push(client.start(&wf, p).await.unwrap());
    }
    for i in 0..3 {
        let next = tokio::time::timeout(DEADLINE, stored.next()).await;
        assert!(matches!(next, Ok(Some(Ok(_)))), "dead letter {i} of 3 not stored");
    }
    broken.shutdown().await;
    client.close().await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_coordinators_counts_an_orders_timeline_and_the_dead_letters() {
    let tmp = tempfile_dir();
    let (driver, driver_port) = chromedriver(&tmp);
    let server = NatsServer::start();
    let url = server.url();
    let setup = waybill(&url, &["setup", "--stock", "examples/stock.json"]);
    assert!(setup.status.success(), "{}", text(&setup.stderr));

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_waybill"));
    cmd.args(["coordinator", "--nats", &url, "--http", "127.0.0.1:0"])
        .current_dir(workspace_root());
    let mut coordinator = Proc::spawn("coordinator", cmd);
    let line = coordinator.expect_stderr("the operator's page on http://", DEADLINE);
    let page = port_after(&line, "127.0.0.1:");
    let base = format!("http://127.0.0.1:{page}");

    let stuck = dead_letter_three(&url).await;
    let workers = vec![
        binary("payment-worker", env!("CARGO_BIN_EXE_payment-worker"), &url),
        binary("inventory-worker", env!("CARGO_BIN_EXE_inventory-worker"), &url),
        binary("shipping-worker", env!("CARGO_BIN_EXE_shipping-worker"), &url),
    ];
    let out = waybill(&url, &["replay", "--json", "examples/orders/mixed.jsonl"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = &report["files"][0];
    let n = |k: &str| file[k].as_u64().unwrap();

    // The overview, kept live: it comes to show every order's end.
    let b = browser(driver_port).await;
    b.goto(&format!("{base}/")).await.unwrap();
    for status in ["completed", "failed", "compensated"] {
        until_tile(&b, status, n(status)).await;
    }
    until_tile(&b, "in_flight", 3).await;
    until_tile(&b, "dead_letters", 3).await;
    // … and agrees with the coordinator's own counts.
    let orders = waybill(&url, &["orders", "--json"]);
    let counts: serde_json::Value = serde_json::from_slice(&orders.stdout).unwrap();
    for status in ["completed", "failed", "compensated"] {
        assert_eq!(counts["finished"][status].as_u64(), Some(n(status)), "{counts}");
    }
    assert_eq!(tile(&b, "tracked").await, grouped(counts["tracked"].as_u64().unwrap()));
    assert_eq!(
        tile(&b, "running").await,
        grouped(counts["by_status"]["running"].as_u64().unwrap())
    );
    let at_charge = b
        .find(Locator::Css("#funnel tr[data-step='order/charge'] .waiting-count"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(at_charge, counts["by_step"]["order/charge"].to_string(), "{counts}");
    let times = b
        .find(Locator::Css("#funnel tr[data-step='order/reserve']"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        times.contains(" ms") || times.contains(" s"),
        "no p50/p99 at reserve: {times}"
    );
    b.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("#throughput path[data-status='completed']"))
        .await
        .unwrap();
    screenshot(&b, "overview.png").await;

    // A recent failure's link leads to its page: its route with where it
    // ended marked, and its timeline, one row per record of its history.
    let link = b.find(Locator::Css("#failures a.order-link")).await.unwrap();
    let failed_id = link.text().await.unwrap();
    link.click().await.unwrap();
    b.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("#timeline tr.entry"))
        .await
        .unwrap();
    let status = waybill(&url, &["status", &failed_id, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let rows = b.find_all(Locator::Css("#timeline tr.entry")).await.unwrap();
    assert_eq!(rows.len(), status["history"].as_array().unwrap().len(), "{status}");
    let marked = b.find(Locator::Css(".route .current")).await.unwrap();
    assert_eq!(marked.attr("id").await.unwrap().as_deref(), Some("node-failed"));
    let shown = b
        .find(Locator::Css("#order-status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(shown, status["status"].as_str().unwrap());
    b.find(Locator::Css("#payload")).await.unwrap();
    screenshot(&b, "order.png").await;

    // The dead letters: counted by reason, listed with their orders.
    b.goto(&format!("{base}/#/dead-letters")).await.unwrap();
    let letters = b
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("#letters"))
        .await
        .unwrap();
    assert_eq!(letters.find_all(Locator::Css("tr[data-seq]")).await.unwrap().len(), 3);
    let by_reason = b.find(Locator::Css("#by-reason")).await.unwrap().text().await.unwrap();
    assert!(by_reason.contains("exhausted 3"), "{by_reason}");
    screenshot(&b, "dead-letters.png").await;

    // Cancel one stuck order from its page (it waits in the dead letters, so
    // it stops when it comes back), then send both back from the list.
    b.goto(&format!("{base}/#/order/{}", stuck[1])).await.unwrap();
    let cancel = b
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("#cancel"))
        .await
        .unwrap();
    cancel.click().await.unwrap();
    b.send_alert_text("cancelled in the browser test").await.unwrap();
    b.accept_alert().await.unwrap();
    until_text(&b, "cancel-result", "Cancel asked").await;

    let list = waybill(&url, &["dlq", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let seq_of = |id: &OrderId| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|l| l["order"] == id.to_string())
            .and_then(|l| l["sequence"].as_u64())
            .unwrap()
    };
    for id in [stuck[0], stuck[1]] {
        b.goto(&format!("{base}/#/dead-letters")).await.unwrap();
        let button = format!("button.redrive[data-seq='{}']", seq_of(&id));
        let button = b
            .wait()
            .at_most(DEADLINE)
            .for_element(Locator::Css(&button))
            .await
            .unwrap();
        button.click().await.unwrap();
        b.accept_alert().await.unwrap();
        until_text(&b, "redrive-result", "went back to its step").await;
    }
    // Both go on from where they stopped: one completes, one is cancelled.
    for (id, end) in [(stuck[0], "completed"), (stuck[1], "cancelled")] {
        b.goto(&format!("{base}/#/order/{id}")).await.unwrap();
        until_text(&b, "order-status", end).await;
    }
    // An action without the header the page sends is refused.
    let refused = post_without_header(page, &format!("/api/orders/{}/cancel", stuck[2]));
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    // An order awaiting a signal says which and since when; a signal from
    // the command line wakes it, and its timeline shows the signal.
    let nats = waybill::transport::Nats::connect(&url, waybill::transport::NatsConfig::default())
        .await
        .unwrap();
    let approval = waybill::Workflow::builder("approval", 1)
        .step("hold", "t.hold")
        .step("book", "t.book")
        .await_signal("approved", Duration::from_secs(3600))
        .build()
        .unwrap();
    let ok = |_c: waybill::StepContext, _p: waybill::Payload| async { Ok(waybill::StepOutput::ok()) };
    let approver = waybill::Worker::builder(nats.clone())
        .serve("t.hold", ok)
        .serve("t.book", ok)
        .start()
        .await
        .unwrap();
    let client = waybill::Client::connect(nats.clone()).await.unwrap();
    let id = client
        .start(&approval, waybill::Payload::json(&serde_json::json!({})).unwrap())
        .await
        .unwrap();
    b.goto(&format!("{base}/#/order/{id}")).await.unwrap();
    until_text(&b, "order-awaiting", "signal approved since").await;
    let out = waybill(
        &url,
        &["signal", &id.to_string(), "approved", r#"{"by": "the browser test"}"#],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    until_text(&b, "order-status", "completed").await;
    until_text(&b, "timeline", r#"signal approved {"by":"the browser test"}"#).await;
    approver.shutdown().await;
    client.close().await;

    b.close().await.unwrap();
    let (status, stderr) = coordinator.signal_and_wait("TERM", DEADLINE);
    assert!(status.success(), "{stderr}");
    for w in workers {
        let (status, stderr) = w.signal_and_wait("TERM", DEADLINE);
        assert!(status.success(), "{stderr}");
    }
    driver.signal("TERM");
    let _ = std::fs::remove_dir_all(&tmp);
}

fn post_without_header(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// A fresh directory for chromedriver's and Chromium's temporary files.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("waybill-web-{}", OrderId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
