//! The JSON form of a document, for clients in other languages: one object,
//! `"envelope": 1` (2 when a step of the route waits: its steps then may
//! hold `"wait"`; 3 when it forks: the route then holds `"forks"`, and a
//! branch's document `"branch"`), the route under `"route"`, and the
//! body's fields.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::wire::{BranchAt, JsonRoute, JsonRouteRef, WireBody, WireBodyRef};
use super::{DecodeError, EncodeError, ENVELOPE_VERSION};
use crate::document::Document;
use crate::workflow::Route;

#[derive(Serialize)]
struct JsonOut<'a> {
    envelope: u8,
    route: JsonRouteRef<'a>,
    #[serde(flatten)]
    body: WireBodyRef<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    branch: Option<BranchAt>,
}

#[derive(Deserialize)]
struct JsonVersion {
    envelope: u64,
}

#[derive(Deserialize)]
struct JsonIn {
    #[allow(dead_code)]
    envelope: u64,
    route: JsonRoute,
    #[serde(flatten)]
    body: WireBody,
    #[serde(default)]
    branch: Option<BranchAt>,
}

pub(super) fn encode(doc: &Document) -> Result<Vec<u8>, EncodeError> {
    serde_json::to_vec(&JsonOut {
        // As the binary form: 2 only when a step waits.
        envelope: super::routes::version_of(&doc.route),
        route: JsonRouteRef::from(&*doc.route),
        body: WireBodyRef::from(doc),
        branch: doc.branch.as_ref().map(Into::into),
    })
    .map_err(|e| EncodeError::Failed(e.to_string()))
}

pub(super) fn decode(bytes: &[u8]) -> Result<Document, DecodeError> {
    let v: JsonVersion = serde_json::from_slice(bytes).map_err(json_err)?;
    if !(1..=u64::from(ENVELOPE_VERSION)).contains(&v.envelope) {
        return Err(DecodeError::UnknownVersion(v.envelope));
    }
    let doc: JsonIn = serde_json::from_slice(bytes).map_err(json_err)?;
    let route = Route::try_from(doc.route)?;
    let mut out = doc.body.with_route(Arc::new(route));
    out.branch = doc.branch.map(Into::into);
    Ok(out)
}

fn json_err(e: serde_json::Error) -> DecodeError {
    if e.is_eof() {
        DecodeError::Truncated
    } else {
        DecodeError::Malformed(e.to_string())
    }
}
