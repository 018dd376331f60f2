//! `waybill dlq`: list, show, redrive and purge dead letters.

use super::*;
use waybill_workers::dlq::{self, Filter, LetterView, Redriven};

pub(crate) fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    let codec = waybill::Codec::default();
    match cmd {
        DlqCommand::List(args) => {
            let filter = filter(&args.filter)?;
            let letters = runtime()?.block_on(async {
                let nats = args.nats.connect("waybill-dlq").await?;
                anyhow::Ok(dlq::list(&nats, &filter).await?)
            })?;
            let views: Vec<LetterView> = letters.iter().map(|l| LetterView::of(l, &codec)).collect();
            show(&views, args.json, |v| dlq::print_list(v))
        }
        DlqCommand::Show(args) => {
            let letter = runtime()?.block_on(async {
                let nats = args.nats.connect("waybill-dlq").await?;
                anyhow::Ok(dlq::named(&nats, &[args.sequence]).await?)
            })?;
            let view = letter
                .first()
                .map(|l| LetterView::of(l, &codec))
                .context("no dead letter read")?;
            show(&view, args.json, dlq::print_one)
        }
        DlqCommand::Redrive(args) => {
            let results = runtime()?.block_on(async {
                let nats = args.nats.connect("waybill-dlq").await?;
                let letters = pick(&nats, &args).await?;
                let timeout = Duration::from_secs(args.timeout.max(1));
                anyhow::Ok(dlq::redrive(&nats, &letters, args.force, timeout, &codec).await?)
            })?;
            if results.is_empty() {
                println!("no dead letters to redrive");
            }
            show(&results, args.json, |r| dlq::print_redriven(r))?;
            let refused = results.iter().any(|r| matches!(r, Redriven::Refused { .. }));
            Ok(if refused { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        DlqCommand::Purge(args) => {
            let deleted = runtime()?.block_on(async {
                let nats = args.nats.connect("waybill-dlq").await?;
                let letters = pick(&nats, &args).await?;
                if !args.yes {
                    println!(
                        "would delete {} dead letter(s); nothing deleted: run again with --yes to delete them",
                        letters.len()
                    );
                    return anyhow::Ok(None);
                }
                let mut deleted = Vec::with_capacity(letters.len());
                for l in &letters {
                    if nats.delete_dead_letter(l.sequence).await? {
                        deleted.push(l.sequence);
                    }
                }
                anyhow::Ok(Some(deleted))
            })?;
            if let Some(deleted) = deleted {
                if args.json {
                    println!("{}", serde_json::to_string(&deleted)?);
                } else {
                    println!("deleted {} dead letter(s)", deleted.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn filter(args: &DlqFilterArgs) -> anyhow::Result<Filter> {
    Ok(Filter {
        kind: args.kind,
        service: args.service.clone(),
        since: args.since.as_deref().map(dlq::parse_duration).transpose()?,
    })
}

/// The letters a redrive or purge names: its sequences, or with `--all`
/// every one the filters take.
async fn pick(
    nats: &waybill::transport::nats::Nats,
    args: &DlqPickArgs,
) -> anyhow::Result<Vec<waybill::transport::nats::StoredLetter>> {
    let f = filter(&args.filter)?;
    if args.all {
        return Ok(dlq::list(nats, &f).await?);
    }
    anyhow::ensure!(
        f.kind.is_none() && f.service.is_none() && f.since.is_none(),
        "--kind, --service and --since choose among all dead letters: use them with --all"
    );
    Ok(dlq::named(nats, &args.sequences).await?)
}
