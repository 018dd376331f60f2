//! The workflows a process can start, with the payload type each one takes.
//!
//! Only starting an order needs this: the payload is validated against its
//! Rust type and the route is stamped into the document. Everything after the
//! start follows the route in the document, so a registry keeps every version
//! it was given (for checks such as [`crate::WorkerBuilder::accept`]) while
//! new orders take the current one.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::document::{Payload, PayloadError};
use crate::id::{OrderId, WorkflowName};
use crate::workflow::Workflow;

/// A payload type a workflow can be started with.
pub trait WorkflowPayload: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Checks the business rules of a payload.
    fn validate(&self) -> Result<(), InvalidPayload>;
}

/// Why a payload breaks its workflow's business rules, naming the field:
/// `items[0].qty: must be at least 1, got 0`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidPayload {
    /// The field, as the payload's JSON form names it (`items[0].qty`).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl InvalidPayload {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Why an order could not be started. Nothing was started then, except
/// perhaps after [`StartError::NotStored`] (see there).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("unknown workflow `{0}`")]
    UnknownWorkflow(String),
    #[error("invalid {workflow} payload: {message}")]
    Invalid { workflow: String, message: String },
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("the order could not be published: {0}")]
    Transport(#[from] crate::transport::Error),
    #[error("the document could not be encoded: {0}")]
    Encode(#[from] crate::codec::EncodeError),
    /// Storing the order's first hop failed with retryable errors until the
    /// start's deadline ([`crate::Client::start_timeout`]). A try that got
    /// no answer may still have been stored: start the same `id` again
    /// (inside the stream's duplicate window) to be sure, never a new one.
    #[error(
        "order {id} was not confirmed stored after {tries} tries in {waited:?} (start it again with this id): {source}"
    )]
    NotStored {
        id: OrderId,
        tries: u32,
        waited: Duration,
        source: crate::transport::Error,
    },
}

impl StartError {
    /// Whether starting again may succeed: after [`StartError::NotStored`]
    /// (with the same id), or a retryable transport error.
    pub fn is_retryable(&self) -> bool {
        match self {
            StartError::NotStored { .. } => true,
            StartError::Transport(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The id to start again with, when it matters which.
    pub fn order_id(&self) -> Option<OrderId> {
        match self {
            StartError::NotStored { id, .. } => Some(*id),
            _ => None,
        }
    }
}

type Parse = dyn Fn(&[u8]) -> Result<Payload, String> + Send + Sync;
type Show = dyn Fn(&Payload) -> Result<serde_json::Value, String> + Send + Sync;

struct Entry {
    current: Workflow,
    versions: Vec<Workflow>,
    parse: Box<Parse>,
    show: Box<Show>,
}

/// Workflows by name; cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Registry {
    entries: HashMap<WorkflowName, Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, e)| (k, e.current.version())))
            .finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `workflow` with payload type `P`; it becomes the version new
    /// orders of that name start on. Earlier versions stay known.
    pub fn register<P: WorkflowPayload>(&mut self, workflow: Workflow) {
        let name = workflow.name().clone();
        let parse: Box<Parse> = Box::new(|json: &[u8]| {
            let value: P = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            value.validate().map_err(|e| e.to_string())?;
            Payload::postcard(&value).map_err(|e| e.to_string())
        });
        let show: Box<Show> = Box::new(|payload: &Payload| {
            let value: P = payload.decode().map_err(|e| e.to_string())?;
            serde_json::to_value(&value).map_err(|e| e.to_string())
        });
        match self.entries.get_mut(&name) {
            Some(e) => {
                e.versions.retain(|w| w.version() != workflow.version());
                e.versions.push(workflow.clone());
                e.current = workflow;
                e.parse = parse;
                e.show = show;
            }
            None => {
                self.entries.insert(
                    name,
                    Entry {
                        current: workflow.clone(),
                        versions: vec![workflow],
                        parse,
                        show,
                    },
                );
            }
        }
    }

    /// The version new orders of `name` start on.
    pub fn current(&self, name: &str) -> Result<&Workflow, StartError> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, e)| &e.current)
            .ok_or_else(|| StartError::UnknownWorkflow(name.to_owned()))
    }

    /// A specific version, if registered.
    pub fn version(&self, name: &str, version: u32) -> Option<&Workflow> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .and_then(|(_, e)| e.versions.iter().find(|w| w.version() == version))
    }

    /// Every (workflow, version) registered, by name then version.
    pub fn versions(&self) -> impl Iterator<Item = (WorkflowName, u32)> + '_ {
        let mut all: Vec<(WorkflowName, u32)> = self
            .entries
            .values()
            .flat_map(|e| e.versions.iter().map(|w| (w.name().clone(), w.version())))
            .collect();
        // By name, then version: the same answer every time.
        all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()).then(a.1.cmp(&b.1)));
        all.into_iter()
    }

    /// Parses and validates a JSON payload for workflow `name`.
    pub fn prepare_json(&self, name: &str, json: &[u8]) -> Result<(Workflow, Payload), StartError> {
        let entry = self
            .entries
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, e)| e)
            .ok_or_else(|| StartError::UnknownWorkflow(name.to_owned()))?;
        let payload = (entry.parse)(json).map_err(|message| StartError::Invalid {
            workflow: name.to_owned(),
            message,
        })?;
        Ok((entry.current.clone(), payload))
    }

    /// A payload of workflow `name` as JSON, read with the workflow's
    /// payload type (the current one: its versions share it); a JSON
    /// payload of a workflow not registered here is read as it is.
    pub fn payload_json(&self, name: &str, payload: &Payload) -> Result<serde_json::Value, String> {
        match self.entries.iter().find(|(k, _)| k.as_str() == name) {
            Some((_, e)) => (e.show)(payload),
            None if payload.content_type == crate::document::ContentType::Json => {
                serde_json::from_slice(&payload.bytes).map_err(|e| e.to_string())
            }
            None => Err(format!(
                "workflow `{name}` is not registered here: its {} payload cannot be read",
                payload.content_type.as_str()
            )),
        }
    }

    /// Validates a typed payload for workflow `name` and encodes it.
    pub fn prepare<P: WorkflowPayload>(&self, name: &str, value: &P) -> Result<(Workflow, Payload), StartError> {
        let workflow = self.current(name)?.clone();
        value.validate().map_err(|e| StartError::Invalid {
            workflow: name.to_owned(),
            message: e.to_string(),
        })?;
        Ok((workflow, Payload::postcard(value)?))
    }
}
