//! The embedded transport's stream read as a log ([`HopLog`]).

use std::sync::Arc;

use super::{lock, Embedded, Inner};
use crate::transport::{ConsumerPosition, Error, HopLog, LogInfo, LogReader, Stored};

/// A reader of the embedded log, from a sequence on.
#[derive(Debug)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
    next: u64,
    /// Whether it returned messages already: a reader that starts before
    /// the oldest message kept begins there (as a stream's consumer does);
    /// one that fell behind the log's capacity has lost messages, and says
    /// so.
    reading: bool,
}

impl Embedded {
    fn keeps_log(&self) -> Result<(), Error> {
        if self.inner.config.log_capacity == 0 {
            return Err(Error::BadConfig(
                "this embedded transport keeps no log (EmbeddedConfig::log_capacity is 0)".into(),
            ));
        }
        Ok(())
    }
}

impl HopLog for Embedded {
    type Reader = EmbeddedLog;

    async fn log_info(&self) -> Result<LogInfo, Error> {
        self.keeps_log()?;
        let log = lock(&self.inner.log);
        Ok(LogInfo {
            messages: log.len() as u64,
            first_sequence: log.front().map_or(0, |s| s.sequence),
            last_sequence: log.back().map_or(0, |s| s.sequence),
        })
    }

    async fn read_log(&self, from: u64) -> Result<EmbeddedLog, Error> {
        self.keeps_log()?;
        Ok(EmbeddedLog {
            inner: self.inner.clone(),
            next: from.max(1),
            reading: false,
        })
    }

    async fn get(&self, sequence: u64) -> Result<Option<Stored>, Error> {
        self.keeps_log()?;
        let log = lock(&self.inner.log);
        let at = log.partition_point(|s| s.sequence < sequence);
        Ok(log.get(at).filter(|s| s.sequence == sequence).map(|s| Stored::clone(s)))
    }

    async fn consumer_position(&self, durable: &str) -> Result<Option<ConsumerPosition>, Error> {
        let consumers = self.inner.consumers.load();
        Ok(consumers
            .iter()
            .find(|c| c.config.durable == durable)
            .map(|c| c.position()))
    }
}

impl LogReader for EmbeddedLog {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Stored>, Error> {
        let max = max.max(1);
        loop {
            // Registered before looking, so an append in between wakes it.
            let appended = self.inner.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            {
                let log = lock(&self.inner.log);
                if let Some(oldest) = log
                    .front()
                    .map(|s| s.sequence)
                    .filter(|&o| self.reading && o > self.next)
                {
                    let lost = oldest - self.next;
                    self.next = oldest;
                    return Err(Error::Other {
                        message: format!(
                            "the log's reader fell behind its capacity of {} messages: {lost} were dropped unread",
                            self.inner.config.log_capacity
                        ),
                        retryable: true,
                    });
                }
                let at = log.partition_point(|s| s.sequence < self.next);
                if at < log.len() {
                    let batch: Vec<Stored> = log.range(at..).take(max).map(|s| Stored::clone(s)).collect();
                    if let Some(last) = batch.last() {
                        self.next = last.sequence + 1;
                    }
                    self.reading = true;
                    return Ok(batch);
                }
            }
            appended.await;
        }
    }
}
