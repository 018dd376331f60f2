//! `waybill cancel`: one order, or the orders a filter takes.

use std::process::ExitCode;
use std::time::Duration;

use waybill::Status;
use waybill_workers::cancel::{cancel_many, cancel_one, matching, parse_where};
use waybill_workers::ops;

use crate::args::CancelArgs;
use crate::runtime;

pub(crate) fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    runtime()?.block_on(async {
        let t = args.nats.connect("waybill-cancel").await?;
        match (&args.id, &args.filter) {
            (_, Some(filter)) => bulk(&t, filter, &args, timeout).await,
            (Some(id), None) => one(&t, id, &args, timeout).await,
            (None, None) => anyhow::bail!("name an order, or say --where"),
        }
    })
}

async fn one(t: &waybill::transport::Nats, id: &str, args: &CancelArgs, timeout: Duration) -> anyhow::Result<ExitCode> {
    let new = cancel_one(t, id, &args.reason, args.force, timeout).await?;
    if new {
        println!("cancel of order {id} asked: it stops at its next hop, its completed steps are undone, and it ends cancelled");
    } else {
        println!("a cancel of order {id} was asked already");
    }
    let Some(secs) = args.wait else {
        return Ok(ExitCode::SUCCESS);
    };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = ops::status(t, id, timeout).await?;
        if s.status.is_terminal() {
            println!("order {id} ended {}", s.status);
            return Ok(if s.status == Status::Cancelled {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "order {id} had not ended after {secs} s (it is {} at step {})",
            s.status,
            s.step
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bulk(
    t: &waybill::transport::Nats,
    text: &str,
    args: &CancelArgs,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let filter = parse_where(text).map_err(ops::OpsError::from)?;
    let limit = args.limit.min(waybill::coordinator::api::MAX_LIST);
    let found = matching(t, &filter, limit, timeout).await?;
    let matched = found.summary.matched;
    if !found.missing.is_empty() {
        eprintln!(
            "warning: partitions {:?} of {} did not answer: their orders are not counted",
            found.missing, found.partitions
        );
    }
    let ids = found.summary.ids;
    if !args.yes {
        println!(
            "{matched} orders in flight match `{text}`; {} would be cancelled (dry run: add --yes to cancel them)",
            ids.len()
        );
        for id in ids.iter().take(10) {
            println!("  {id}");
        }
        if ids.len() > 10 {
            println!("  … and {} more", ids.len() - 10);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let done = cancel_many(t, &ids, &args.reason, timeout).await;
    println!(
        "{matched} orders matched `{text}`: {} cancels asked, {} asked already, {} refused",
        done.cancelled,
        done.already_asked,
        done.failed.len()
    );
    for (id, why) in &done.failed {
        println!("  {id}: {why}");
    }
    let left = matched.saturating_sub(ids.len() as u64);
    if left > 0 {
        println!("{left} more match: run the command again to cancel them");
    }
    Ok(if done.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
