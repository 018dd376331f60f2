//! What a run stored and asked of the server, per order: the messages each
//! stream took (the hop stream, dead letters, each KV bucket's `KV_<bucket>`
//! stream) and the KV operations each worker reports at exit.

use std::collections::BTreeMap;
use std::fmt;

use async_nats::jetstream;
use futures::StreamExt;

/// Each stream's last sequence: every message it stored, whatever its
/// limits removed since (a KV bucket keeps one revision per key, so its
/// message count says nothing of how many writes it took).
#[derive(Debug, Clone, Default)]
pub struct StreamSeqs(BTreeMap<String, u64>);

impl StreamSeqs {
    /// Reads every stream on the server.
    pub async fn read(js: &jetstream::Context) -> Result<Self, crate::BenchError> {
        let mut seqs = BTreeMap::new();
        let mut streams = js.streams();
        while let Some(info) = streams.next().await {
            let info = info.map_err(|e| crate::BenchError::Streams(e.to_string()))?;
            seqs.insert(info.config.name, info.state.last_sequence);
        }
        Ok(Self(seqs))
    }

    /// Messages stored per order since `before`, per stream (streams that
    /// took none left out; KV buckets' streams last).
    pub fn per_order_since(&self, before: &Self, orders: usize) -> PerOrder {
        let mut per: Vec<(String, f64)> = self
            .0
            .iter()
            .filter_map(|(name, &last)| {
                let stored = last.saturating_sub(before.0.get(name).copied().unwrap_or(0));
                (stored > 0).then(|| (name.clone(), stored as f64 / orders.max(1) as f64))
            })
            .collect();
        // The hops first, then the buckets.
        per.sort_by_key(|(name, _)| (name.starts_with("KV_"), name.clone()));
        PerOrder(per)
    }
}

/// Stored messages per order, by stream.
#[derive(Debug, Clone, Default)]
pub struct PerOrder(pub Vec<(String, f64)>);

impl fmt::Display for PerOrder {
    /// `stored messages per order: WAYBILL_HOPS 5.02, KV_inventory 12.41`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stored messages per order:")?;
        if self.0.is_empty() {
            return write!(f, " none");
        }
        for (i, (name, n)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep} {name} {n:.2}")?;
        }
        Ok(())
    }
}

/// A worker's KV operations, as it reports them at exit:
/// `kv ops: reads=R writes=W conflicts=C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvOps {
    pub reads: u64,
    pub writes: u64,
    pub conflicts: u64,
}

impl KvOps {
    /// The last `kv ops:` line of a worker's standard error, if any (a
    /// worker without KV state prints none).
    pub fn parse(stderr: &str) -> Option<Self> {
        stderr.lines().rev().find_map(|line| {
            let (_, rest) = line.split_once("kv ops:")?;
            let (mut reads, mut writes, mut conflicts) = (None, None, None);
            for field in rest.split_whitespace() {
                let Some((key, value)) = field.split_once('=') else {
                    continue;
                };
                let value = value.trim_end_matches([',', ';']).parse::<u64>().ok();
                match key {
                    "reads" => reads = value,
                    "writes" => writes = value,
                    "conflicts" => conflicts = value,
                    _ => {}
                }
            }
            Some(Self {
                reads: reads?,
                writes: writes?,
                conflicts: conflicts?,
            })
        })
    }
}

/// The KV operations per order of each worker (`None`: it printed none).
#[derive(Debug, Clone, Default)]
pub struct KvOpsPerOrder {
    pub orders: usize,
    pub workers: Vec<(String, Option<KvOps>)>,
}

impl fmt::Display for KvOpsPerOrder {
    /// `kv ops per order: payment-worker reads 1.00 writes 2.00 conflicts 0.00; inventory-worker n/a; …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.orders.max(1) as f64;
        write!(f, "kv ops per order:")?;
        for (i, (name, ops)) in self.workers.iter().enumerate() {
            let sep = if i == 0 { "" } else { ";" };
            match ops {
                Some(o) => write!(
                    f,
                    "{sep} {name} reads {:.2} writes {:.2} conflicts {:.2}",
                    o.reads as f64 / n,
                    o.writes as f64 / n,
                    o.conflicts as f64 / n
                )?,
                None => write!(f, "{sep} {name} n/a")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_ops_line_is_found_among_others() {
        let stderr = "WARN something\nkv ops: reads=40 writes=20 conflicts=3\n";
        assert_eq!(
            KvOps::parse(stderr),
            Some(KvOps {
                reads: 40,
                writes: 20,
                conflicts: 3
            })
        );
        assert_eq!(
            KvOps::parse("2026-12-05 INFO kv ops: reads=1 writes=2 conflicts=0").map(|o| o.writes),
            Some(2)
        );
    }

    #[test]
    fn no_or_partial_kv_ops_line_is_none() {
        assert_eq!(KvOps::parse(""), None);
        assert_eq!(KvOps::parse("WARN draining\n"), None);
        assert_eq!(KvOps::parse("kv ops: reads=1 writes=x conflicts=0"), None);
    }

    #[test]
    fn per_order_counts_writes_since_before() {
        let before = StreamSeqs([("KV_a".to_owned(), 40), ("H".to_owned(), 0)].into());
        let after = StreamSeqs([("KV_a".to_owned(), 240), ("H".to_owned(), 500), ("DLQ".to_owned(), 0)].into());
        let per = after.per_order_since(&before, 100);
        assert_eq!(per.to_string(), "stored messages per order: H 5.00, KV_a 2.00");
        let raw = StreamSeqs([("KV_b".to_owned(), 9), ("RAW".to_owned(), 400)].into());
        assert_eq!(
            raw.per_order_since(&StreamSeqs::default(), 100).to_string(),
            "stored messages per order: RAW 4.00, KV_b 0.09"
        );
        let ops = KvOpsPerOrder {
            orders: 100,
            workers: vec![
                (
                    "payment-worker".into(),
                    Some(KvOps {
                        reads: 100,
                        writes: 250,
                        conflicts: 1,
                    }),
                ),
                ("shipping-worker".into(), None),
            ],
        };
        assert_eq!(
            ops.to_string(),
            "kv ops per order: payment-worker reads 1.00 writes 2.50 conflicts 0.01; shipping-worker n/a"
        );
    }
}
