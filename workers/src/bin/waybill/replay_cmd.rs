//! `waybill replay`: the example order flows on the embedded default (with
//! its own coordinator) or over NATS, and the report.

use super::*;

/// `waybill replay`: loads the flows, runs them on the embedded default or
/// over NATS ([`replay_files`]), and reports.
pub(crate) fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let ReplayArgs {
        paths,
        stock,
        json,
        in_flight,
        concurrency,
        order_timeout,
        no_progress,
        watch,
        nats,
        auth,
        otlp: _,
    } = args;
    let opts = ReplayOptions {
        in_flight,
        concurrency,
        order_timeout: Duration::from_secs(order_timeout),
        coordinator: true,
    };
    let registry = waybill_workflows::registry().context("the built-in workflows do not build")?;
    // Stock seeds the in-process inventory of the embedded default; over
    // NATS the inventory worker keeps its own.
    let stock = match (&nats, stock) {
        (Some(_), _) => Default::default(),
        (None, Some(p)) => replay::load_stock(&p)?,
        (None, None) => replay::load_stock(&find_stock(&paths).context(
            "no stock.json beside the order flows nor in examples/; pass --stock FILE (a JSON object of SKU → units)",
        )?)?,
    };
    let files = replay::expand(&paths)?
        .iter()
        .map(|p| replay::load(p, &registry))
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = files.iter().map(|f| f.orders.len()).sum();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let bar = if no_progress || json || watch {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:30!} [{bar:40}] {pos}/{len} orders ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    // The replay runs as a task on the runtime's workers rather than on
    // this thread: waking another thread for every finished order
    // would cost more than the order.
    let task = replay_files(files, stock, opts, nats, auth, bar, watch);
    let (reports, dead, check) = rt.block_on(async { tokio::spawn(task).await })??;
    let agrees = check.as_ref().is_none_or(|c| c.disagreements.is_empty());
    let ok = reports.iter().all(FileReport::ok) && dead.is_empty() && agrees;
    if json {
        let out = serde_json::json!({"ok": ok, "files": reports, "dead_letters": dead, "coordinator": check});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&reports);
        for d in &dead {
            println!("{d}");
        }
        if let Some(c) = &check {
            for d in &c.disagreements {
                println!("coordinator: {d}");
            }
            for s in &c.statuses {
                println!();
                ops::print_status(s);
            }
        }
        println!(
            "{}",
            if ok {
                "all orders ended as expected"
            } else {
                "MISMATCHES: see above"
            }
        );
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs every file's orders, in-process (`nats` is `None`) or over NATS;
/// returns the reports and what went to the dead letters meanwhile.
async fn replay_files(
    files: Vec<replay::FlowFile>,
    stock: std::collections::HashMap<String, i64>,
    opts: ReplayOptions,
    nats: Option<ServerList>,
    auth: AuthArgs,
    bar: ProgressBar,
    watch: bool,
) -> anyhow::Result<(Vec<FileReport>, Vec<String>, Option<replay::CoordinatorCheck>)> {
    let mut reports = Vec::new();
    let mut check = None;
    let dead = match nats {
        None => {
            let engine = EmbeddedRuntime::start(stock, &opts).await?;
            let run = async {
                for f in &files {
                    let label = f.path.display().to_string();
                    bar.set_message(label.clone());
                    reports.push(engine.run(&label, &f.orders, &opts, |_, _| bar.inc(1)).await);
                }
            };
            watching(&engine.transport, watch, run).await?;
            check = Some(engine.check(&reports).await);
            let dead: Vec<String> = engine
                .transport
                .dead_letters()
                .iter()
                .map(|d| format!("dead letter on {}: {}", d.message.subject, d.reason))
                .collect();
            engine.shutdown().await;
            dead
        }
        Some(url) => {
            let transport = auth.connect(&url, "waybill-replay").await?;
            transport.verify().await?;
            let before = transport.dead_letter_count().await?;
            let client = waybill::Client::connect(transport.clone()).await?;
            let run = async {
                for f in &files {
                    let label = f.path.display().to_string();
                    bar.set_message(label.clone());
                    reports.push(replay::run_orders(&client, &label, &f.orders, &opts, |_, _| bar.inc(1)).await);
                }
            };
            watching(&transport, watch, run).await?;
            client.close().await;
            let added = transport.dead_letter_count().await?.saturating_sub(before);
            if added > 0 {
                vec![format!(
                    "{added} dead letters were stored in WAYBILL_DLQ during the replay (see waybill.dlq.>)"
                )]
            } else {
                Vec::new()
            }
        }
    };
    bar.finish_and_clear();
    Ok((reports, dead, check))
}

/// Runs `run`, with the coordinators' live view beside it if asked.
async fn watching<T: Rpc>(
    transport: &T,
    watch: bool,
    run: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if !watch {
        run.await;
        return Ok(());
    }
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let view = ops::watch_until(transport, Duration::from_millis(500), Duration::from_secs(5), async {
        // Ends with the run (its sender dropped or sent).
        let _ = finished.await;
        Ok(())
    });
    let run = async move {
        run.await;
        let _ = done.send(());
    };
    let (watched, ()) = tokio::join!(view, run);
    watched?;
    Ok(())
}

/// The `stock.json` that goes with the order flows at `paths`.
fn find_stock(paths: &[PathBuf]) -> Option<PathBuf> {
    let first = paths.first()?;
    let dir = if first.is_dir() {
        Some(first.as_path())
    } else {
        first.parent()
    };
    let mut candidates: Vec<PathBuf> = dir
        .into_iter()
        .flat_map(|d| [d.join("stock.json"), d.join("..").join("stock.json")])
        .collect();
    candidates.push(PathBuf::from("examples/stock.json"));
    candidates.into_iter().find(|p| p.is_file())
}

fn print_table(reports: &[FileReport]) {
    let width = reports.iter().map(|r| r.file.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:>7}  {:>9}  {:>6}  {:>11}  {:>9}  {:>10}  {:>9}  {:>7}  {:>7}",
        "file",
        "orders",
        "completed",
        "failed",
        "compensated",
        "cancelled",
        "mismatches",
        "orders/s",
        "p50 ms",
        "p99 ms"
    );
    for r in reports {
        println!(
            "{:<width$}  {:>7}  {:>9}  {:>6}  {:>11}  {:>9}  {:>10}  {:>9.0}  {:>7.2}  {:>7.2}",
            r.file,
            r.orders,
            r.completed,
            r.failed,
            r.compensated,
            r.cancelled,
            r.mismatches.len(),
            r.orders_per_sec,
            r.p50_ms,
            r.p99_ms
        );
    }
    for r in reports {
        for m in &r.mismatches {
            let actual = m.actual.map_or("unfinished".to_owned(), |s| s.to_string());
            println!(
                "mismatch: {} line {} (order {}): expected {}, got {}: {}",
                r.file,
                m.line,
                m.order_id.as_deref().unwrap_or("-"),
                m.expected,
                actual,
                m.detail
            );
        }
    }
}
