//! The coordinator's web page, `waybill coordinator --http ADDR`: one page
//! of plain HTML, CSS and JavaScript compiled into the binary (no build
//! step, nothing fetched at run time), over a small JSON interface:
//!
//! | route                          | what                                                   |
//! |--------------------------------|--------------------------------------------------------|
//! | `GET /`                        | the page                                               |
//! | `GET /api/live`                | the latest [`Live`] snapshot                           |
//! | `GET /api/events`              | server-sent events: a `live` snapshot every second     |
//! | `GET /api/workflows`           | the workflows registered, their steps in route order   |
//! | `GET /api/graph/<wf>/<v>`      | a workflow version's route as SVG                      |
//! | `GET /api/orders/<id>`         | where an order stands, its history and payload         |
//! | `POST /api/orders/<id>/cancel` | cancels it (`{"reason": …}`)                           |
//! | `GET /api/dead-letters`        | counts by reason and service, the newest letters       |
//! | `GET /api/dead-letters/<seq>`  | one letter, its document's history                     |
//! | `POST /api/dead-letters/<seq>/redrive` | sends it back to its step (checked as `waybill dlq redrive`) |
//!
//! Counts are this coordinator's (its partition); an order's page asks
//! whichever coordinator tracks it. Nothing lists every order: a page is
//! the same size with a million tracked. The actions (POST) need the header
//! `x-waybill-action: 1`, which a browser only sends cross-site after a
//! CORS preflight this server never grants: another site cannot make an
//! operator's browser cancel orders.

mod live;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::Stream;
use serde::Serialize;
use waybill::coordinator::api::HistoryEntry;
use waybill::coordinator::{CoordinatorClient, CoordinatorCounts, RequestError};
use waybill::graph::{draw, GraphFormat};
use waybill::headers::CONTENT_TYPE as DOC_CONTENT_TYPE;
use waybill::transport::nats::Nats;
use waybill::{Codec, OrderId, Registry};

pub use live::Live;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// The header every action must carry (see the module's documentation).
pub const ACTION_HEADER: &str = "x-waybill-action";
/// Dead letters listed on the page, newest first.
const LETTERS_LISTED: usize = 200;

/// What the page's handlers share.
#[derive(Clone)]
struct App {
    nats: Nats,
    registry: Arc<Registry>,
    codec: Codec,
    timeout: Duration,
    live: live::LiveFeed,
}

/// The page's routes, reading `counts` (sampled once a second whether or
/// not anyone looks, for the throughput chart; the dashboard only while
/// someone looks) and asking through `nats`.
pub fn router(counts: CoordinatorCounts<Nats>, nats: Nats, registry: Arc<Registry>, codec: Codec) -> Router {
    let live = live::start(counts, nats.clone());
    let app = App {
        nats,
        registry,
        codec,
        timeout: Duration::from_secs(5),
        live,
    };
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/api/live", get(live_now))
        .route("/api/events", get(events))
        .route("/api/workflows", get(workflows))
        .route("/api/graph/{workflow}/{version}", get(graph))
        .route("/api/orders/{id}", get(order))
        .route("/api/orders/{id}/cancel", post(cancel))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/dead-letters/{seq}", get(dead_letter))
        .route("/api/dead-letters/{seq}/redrive", post(redrive))
        .with_state(app)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body).into_response()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (status, [(CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the answer could not be written: {e}"),
        ),
    }
}

fn fail(status: StatusCode, error: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": error.into() }).to_string();
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

/// How a failed request to the coordinators reads on the page.
fn request_failed(e: RequestError) -> Response {
    match e {
        RequestError::Refused { message, .. } => fail(StatusCode::NOT_FOUND, message),
        RequestError::Retry { message, .. } => fail(StatusCode::SERVICE_UNAVAILABLE, message),
        RequestError::Transport(t) => fail(StatusCode::BAD_GATEWAY, t.to_string()),
        other => fail(StatusCode::BAD_GATEWAY, other.to_string()),
    }
}

fn is_action(headers: &HeaderMap) -> bool {
    headers.get(ACTION_HEADER).is_some_and(|v| v == "1")
}

fn not_an_action() -> Response {
    fail(
        StatusCode::FORBIDDEN,
        format!("an action needs the header `{ACTION_HEADER}: 1`"),
    )
}

async fn live_now(State(app): State<App>) -> Response {
    let body = app.live.full().await;
    ([(CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn events(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    // The first event is the first snapshot with the dashboard (taken at
    // once, as this receiver asks for it); then one a second.
    let rx = app.live.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            if rx.changed().await.is_err() {
                return None;
            }
            let s = rx.borrow_and_update().clone();
            if s.full {
                return Some((Ok(Event::default().event("live").data(s.json.as_ref())), rx));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Serialize)]
struct WorkflowView {
    workflow: String,
    version: u32,
    steps: Vec<String>,
}

async fn workflows(State(app): State<App>) -> Response {
    let mut out: Vec<WorkflowView> = app
        .registry
        .versions()
        .filter_map(|(name, version)| {
            let w = app.registry.version(name.as_str(), version)?;
            Some(WorkflowView {
                workflow: name.to_string(),
                version,
                steps: w.route().steps.iter().map(|s| s.name.to_string()).collect(),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.workflow, a.version).cmp(&(&b.workflow, b.version)));
    json(StatusCode::OK, &out)
}

async fn graph(State(app): State<App>, Path((workflow, version)): Path<(String, String)>) -> Response {
    let Ok(version) = version.parse::<u32>() else {
        return fail(StatusCode::BAD_REQUEST, format!("`{version}` is not a version number"));
    };
    match app.registry.version(&workflow, version) {
        Some(w) => ([(CONTENT_TYPE, "image/svg+xml")], draw(w.route(), GraphFormat::Svg)).into_response(),
        None => fail(
            StatusCode::NOT_FOUND,
            format!("workflow {workflow} version {version} is not registered with this coordinator"),
        ),
    }
}

async fn order(State(app): State<App>, Path(id): Path<String>) -> Response {
    let id: OrderId = match id.parse() {
        Ok(id) => id,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("`{id}` is not an order id: {e}")),
    };
    match CoordinatorClient::new(app.nats.clone(), app.timeout).status(&id).await {
        Ok(reply) => json(StatusCode::OK, &reply),
        Err(e) => request_failed(e),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_action(&headers) {
        return not_an_action();
    }
    let id: OrderId = match id.parse() {
        Ok(id) => id,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("`{id}` is not an order id: {e}")),
    };
    let asked: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return fail(StatusCode::BAD_REQUEST, format!("bad cancel: {e}")),
        }
    };
    let client = CoordinatorClient::new(app.nats.clone(), app.timeout);
    match client.cancel(&id, asked.reason.as_deref()).await {
        Ok(reply) => json(StatusCode::OK, &reply),
        Err(RequestError::Refused { message, .. }) => fail(StatusCode::CONFLICT, message),
        Err(e) => request_failed(e),
    }
}

#[derive(Serialize)]
struct LettersView {
    total: usize,
    by_reason: std::collections::BTreeMap<String, usize>,
    by_service: std::collections::BTreeMap<String, usize>,
    /// The newest first, at most [`LETTERS_LISTED`].
    letters: Vec<crate::dlq::LetterView>,
}

async fn dead_letters(State(app): State<App>) -> Response {
    let all = match app.nats.dead_letters().await {
        Ok(l) => l,
        Err(e) => return fail(StatusCode::BAD_GATEWAY, format!("cannot read the dead letters: {e}")),
    };
    let mut view = LettersView {
        total: all.len(),
        by_reason: Default::default(),
        by_service: Default::default(),
        letters: Vec::new(),
    };
    for (i, letter) in all.iter().rev().enumerate() {
        let v = crate::dlq::LetterView::of(letter, &app.codec);
        *view.by_reason.entry(v.kind.clone()).or_default() += 1;
        *view.by_service.entry(v.service.clone()).or_default() += 1;
        if i < LETTERS_LISTED {
            view.letters.push(v);
        }
    }
    json(StatusCode::OK, &view)
}

#[derive(Serialize)]
struct LetterDetail {
    letter: crate::dlq::LetterView,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    history: Vec<HistoryEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_error: Option<String>,
}

fn bad_seq(text: &str) -> Response {
    fail(
        StatusCode::BAD_REQUEST,
        format!("`{text}` is not a dead letter's number"),
    )
}

async fn dead_letter(State(app): State<App>, Path(seq): Path<String>) -> Response {
    let Ok(seq) = seq.parse::<u64>() else {
        return bad_seq(&seq);
    };
    let letter = match app.nats.dead_letter_at(seq).await {
        Ok(Some(l)) => l,
        Ok(None) => return fail(StatusCode::NOT_FOUND, format!("no dead letter {seq}")),
        Err(e) => return fail(StatusCode::BAD_GATEWAY, format!("cannot read dead letter {seq}: {e}")),
    };
    let mut detail = LetterDetail {
        letter: crate::dlq::LetterView::of(&letter, &app.codec),
        failure: None,
        history: Vec::new(),
        payload: None,
        payload_error: None,
    };
    if let Ok(doc) = app
        .codec
        .decode_as(&letter.payload, letter.headers.get(DOC_CONTENT_TYPE))
    {
        detail.failure = doc.failure.clone();
        detail.history = doc.history.iter().map(HistoryEntry::of).collect();
        match app.registry.payload_json(doc.route.workflow.as_str(), &doc.payload) {
            Ok(v) => detail.payload = Some(v),
            Err(e) => detail.payload_error = Some(e),
        }
    }
    json(StatusCode::OK, &detail)
}

async fn redrive(State(app): State<App>, Path(seq): Path<String>, headers: HeaderMap) -> Response {
    if !is_action(&headers) {
        return not_an_action();
    }
    let Ok(seq) = seq.parse::<u64>() else {
        return bad_seq(&seq);
    };
    let letters = match crate::dlq::named(&app.nats, &[seq]).await {
        Ok(l) => l,
        Err(crate::dlq::DlqError::NotFound(_)) => return fail(StatusCode::NOT_FOUND, format!("no dead letter {seq}")),
        Err(e) => return fail(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    match crate::dlq::redrive(&app.nats, &letters, false, app.timeout, &app.codec).await {
        Ok(results) => match results.into_iter().next() {
            Some(r @ crate::dlq::Redriven::Sent { .. }) => json(StatusCode::OK, &r),
            Some(r @ crate::dlq::Redriven::Refused { .. }) => json(StatusCode::CONFLICT, &r),
            None => fail(StatusCode::NOT_FOUND, format!("no dead letter {seq}")),
        },
        Err(e) => fail(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
