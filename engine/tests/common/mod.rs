//! What the runtime tests share: a three-step workflow, a payload that
//! scripts what its handlers do, and handlers that log every call; the
//! waits' two-step workflow and its handlers.

#![allow(dead_code)] // each test file uses its own part of this
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use std::sync::Arc;
use waybill::transport::{
    ConsumerConfig, DeadLetter, Embedded, Error as TransportError, Outgoing, PublishAck, Transport,
};
use waybill::{
    Backoff, OrderId, Payload, SignalName, StepContext, StepError, StepOutput, Then, WorkerBuilder, Workflow,
    WorkflowPayload,
};

/// The payload of these tests: what the handlers should do.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Script {
    pub name: String,
    /// Transient failures of step `b` before it succeeds.
    pub b_flaky: u32,
    /// Step `c` fails permanently.
    pub c_fails: bool,
    /// Step `b` panics (on every attempt).
    pub b_panics: bool,
    /// Step `b` hangs past its timeout.
    pub b_hangs: bool,
    /// Step `a` reports this outcome instead of `ok`.
    pub a_outcome: Option<String>,
}

impl WorkflowPayload for Script {
    fn validate(&self) -> Result<(), waybill::InvalidPayload> {
        if self.name.is_empty() {
            return Err(waybill::InvalidPayload::new("name", "must not be empty"));
        }
        Ok(())
    }
}

pub fn script(name: &str) -> Script {
    Script {
        name: name.into(),
        ..Script::default()
    }
}

pub fn three_steps() -> Workflow {
    Workflow::builder("trip", 1)
        .step("a", "t.a")
        .compensate("t.undo_a")
        .on("skip", Then::step("c"))
        .on("refused", Then::Fail)
        .step("b", "t.b")
        .compensate("t.undo_b")
        .retry(Backoff::fixed(3, Duration::from_millis(5)))
        .timeout(Duration::from_millis(100))
        .step("c", "t.c")
        .retry(Backoff::fixed(2, Duration::from_millis(5)))
        .build()
        .unwrap()
}

/// Calls per idempotency key: how often each handler ran, and (below) how
/// often its effect was applied.
#[derive(Default)]
pub struct Log {
    pub calls: Mutex<Vec<(String, u32, String)>>,
    pub effects: Mutex<HashMap<String, u32>>,
}

impl Log {
    pub fn call(&self, ctx: &StepContext) {
        self.calls
            .lock()
            .unwrap()
            .push((ctx.step.to_string(), ctx.attempt, ctx.idempotency_key().to_string()));
    }
    /// The handler reached its effect: counted per idempotency key, so a
    /// step run twice shows up as 2.
    pub fn effect(&self, ctx: &StepContext) {
        *self
            .effects
            .lock()
            .unwrap()
            .entry(ctx.idempotency_key().to_string())
            .or_insert(0) += 1;
    }
    pub fn calls_of(&self, step: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| c.0 == step).count()
    }
}

/// The waits' tests' workflow: `hold` (undone by `t.release`), then
/// `remind` once `wait` has passed after it.
pub fn reminder(wait: Duration) -> Workflow {
    Workflow::builder("reminder", 1)
        .step("hold", "t.hold")
        .compensate("t.release")
        .step("remind", "t.remind")
        .delay(wait)
        .build()
        .unwrap()
}

/// The signals' tests' workflow: `hold` (undone by `t.release`), then
/// `book` once the signal `approved` came, at most `deadline` after the
/// hold; without it the route goes `on_timeout`, to `nudge` say.
pub fn approval(deadline: Duration, on_timeout: waybill::Then) -> Workflow {
    let nudges = on_timeout == waybill::Then::step("nudge");
    let b = Workflow::builder("approval", 1)
        .step("hold", "t.hold")
        .compensate("t.release")
        .step("book", "t.book")
        .await_signal("approved", deadline)
        .on_timeout(on_timeout)
        .on("ok", waybill::Then::Complete);
    if nudges { b.step("nudge", "t.nudge") } else { b }.build().unwrap()
}

/// `hold`, then `first` once the signal `first_ok` came, then `second`
/// once `second_ok` came (each within an hour): the signals' tests of a
/// signal kept for a later step.
pub fn two_approvals() -> Workflow {
    let hour = Duration::from_secs(3600);
    Workflow::builder("two_approvals", 1)
        .step("hold", "t.hold")
        .step("first", "t.first")
        .await_signal("first_ok", hour)
        .step("second", "t.second")
        .await_signal("second_ok", hour)
        .build()
        .unwrap()
}

/// Serves [`two_approvals`]' services, each answering `ok`.
pub fn serve_two_approvals<T: Transport>(b: WorkerBuilder<T>) -> WorkerBuilder<T> {
    b.serve("t.hold", ok).serve("t.first", ok).serve("t.second", ok)
}

/// A step that answers `ok`.
pub async fn ok(_ctx: StepContext, _p: Payload) -> Result<StepOutput, StepError> {
    Ok(StepOutput::ok())
}

/// Serves the reminder's services: `hold` and `release` answer `ok`,
/// `remind` is `remind`.
pub fn serve_reminder<T: Transport>(b: WorkerBuilder<T>, remind: impl waybill::Handler) -> WorkerBuilder<T> {
    b.serve("t.hold", ok).serve("t.release", ok).serve("t.remind", remind)
}

/// A step that says it was called (in `calls`) and answers `ok`.
pub fn counted(calls: &Arc<std::sync::atomic::AtomicUsize>) -> impl waybill::Handler {
    let calls = calls.clone();
    move |_ctx: StepContext, _p: Payload| {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok(StepOutput::ok()) }
    }
}

/// A `remind` that must not run: the order was cancelled.
pub async fn must_not_remind(_ctx: StepContext, _p: Payload) -> Result<StepOutput, StepError> {
    Err(StepError::permanent("a cancelled order must not be reminded"))
}

/// A step that says it was entered, then waits at `gate` for a permit
/// before it answers `ok` (a step held while the test does something).
pub fn gated(gate: &Arc<tokio::sync::Semaphore>, entered: &Arc<tokio::sync::Notify>) -> impl waybill::Handler {
    let (gate, entered) = (gate.clone(), entered.clone());
    move |_ctx: StepContext, _p: Payload| {
        let (gate, entered) = (gate.clone(), entered.clone());
        async move {
            entered.notify_one();
            let _permit = gate.acquire().await.map_err(|_| StepError::transient("closed"))?;
            Ok(StepOutput::ok())
        }
    }
}

pub fn serve<T: Transport>(b: WorkerBuilder<T>, log: &Arc<Log>) -> WorkerBuilder<T> {
    let (l1, l2, l3, l4, l5) = (log.clone(), log.clone(), log.clone(), log.clone(), log.clone());
    b.serve("t.a", move |ctx: StepContext, p: Payload| {
        let log = l1.clone();
        async move {
            log.call(&ctx);
            let s: Script = p.decode()?;
            log.effect(&ctx);
            Ok(match s.a_outcome {
                Some(o) => StepOutput::outcome(o),
                None => StepOutput::ok().with_detail(format!("a for {}", s.name)),
            })
        }
    })
    .serve("t.b", move |ctx: StepContext, p: Payload| {
        let log = l2.clone();
        async move {
            log.call(&ctx);
            let s: Script = p.decode()?;
            if s.b_panics {
                panic!("b exploded for {}", s.name);
            }
            if s.b_hangs {
                // A step that never ends, the behaviour under test: only the
                // step timeout can end it (no timer here that could).
                std::future::pending::<()>().await;
            }
            if ctx.attempt <= s.b_flaky {
                return Err(StepError::transient(format!("b flaked on attempt {}", ctx.attempt)));
            }
            log.effect(&ctx);
            Ok(StepOutput::ok())
        }
    })
    .serve("t.c", move |ctx: StepContext, p: Payload| {
        let log = l3.clone();
        async move {
            log.call(&ctx);
            let s: Script = p.decode()?;
            if s.c_fails {
                return Err(StepError::permanent("c cannot be done"));
            }
            log.effect(&ctx);
            Ok(StepOutput::ok())
        }
    })
    .serve("t.undo_a", move |ctx: StepContext, _p: Payload| {
        let log = l4.clone();
        async move {
            log.call(&ctx);
            log.effect(&ctx);
            Ok(StepOutput::ok())
        }
    })
    .serve("t.undo_b", move |ctx: StepContext, _p: Payload| {
        let log = l5.clone();
        async move {
            log.call(&ctx);
            log.effect(&ctx);
            Ok(StepOutput::ok())
        }
    })
}

/// What a [`Faulty`] transport does with one publish.
#[derive(Debug, Clone)]
pub enum PublishFault {
    /// Stores it, as the embedded transport would.
    Pass,
    /// Does not store it; the publish fails with this error.
    Refuse(TransportError),
    /// Stores it, but the answer is lost: the publish fails with this error.
    StoreThenFail(TransportError),
}

/// The embedded transport, with each publish first shown to a function of
/// the test's, which says what happens to it (a server restarting, a
/// leader election, an output lost with its worker). Everything else
/// passes through.
#[derive(Clone)]
pub struct Faulty {
    pub inner: Embedded,
    decide: Arc<dyn Fn(&Outgoing) -> PublishFault + Send + Sync>,
    /// Reads of a signal to fail as unavailable, from now on.
    pub unreadable_signals: Arc<std::sync::atomic::AtomicUsize>,
    /// How many joins' records were written so far.
    pub join_writes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Faulty {
    pub fn new(inner: Embedded, decide: impl Fn(&Outgoing) -> PublishFault + Send + Sync + 'static) -> Self {
        Self {
            inner,
            decide: Arc::new(decide),
            unreadable_signals: Arc::default(),
            join_writes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl Transport for Faulty {
    type Consumer = <Embedded as Transport>::Consumer;

    async fn publish(&self, msg: Outgoing) -> Result<PublishAck, TransportError> {
        match (self.decide)(&msg) {
            PublishFault::Pass => self.inner.publish(msg).await,
            PublishFault::Refuse(e) => Err(e),
            PublishFault::StoreThenFail(e) => {
                self.inner.publish(msg).await?;
                Err(e)
            }
        }
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<Self::Consumer, TransportError> {
        self.inner.consumer(config).await
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), TransportError> {
        self.inner.dead_letter(letter).await
    }

    async fn delete_consumer(&self, durable: &str) -> Result<(), TransportError> {
        self.inner.delete_consumer(durable).await
    }

    async fn send_signal(&self, order: OrderId, name: &SignalName, data: &str) -> Result<bool, TransportError> {
        self.inner.send_signal(order, name, data).await
    }

    async fn signal(
        &self,
        order: &OrderId,
        name: &SignalName,
    ) -> Result<Option<waybill::transport::KeptSignal>, TransportError> {
        let failing = self
            .unreadable_signals
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if failing {
            return Err(TransportError::Unavailable(
                "the signals' store is electing its leader".into(),
            ));
        }
        self.inner.signal(order, name).await
    }

    async fn wake(&self, order: OrderId, signal: Option<&SignalName>) -> Result<(), TransportError> {
        self.inner.wake(order, signal).await
    }

    async fn join_state(&self, order: &OrderId, fork: u8) -> Result<Option<(bytes::Bytes, u64)>, TransportError> {
        self.inner.join_state(order, fork).await
    }

    async fn put_join_state(
        &self,
        order: OrderId,
        fork: u8,
        state: bytes::Bytes,
        expected: u64,
    ) -> Result<bool, TransportError> {
        let written = self.inner.put_join_state(order, fork, state, expected).await?;
        if written {
            self.join_writes.send_modify(|n| *n += 1);
        }
        Ok(written)
    }
}
