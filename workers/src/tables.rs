//! The coordinator's answers as tables for people (`waybill status`,
//! `waybill orders`).

use waybill::coordinator::api::{HistoryEntry, OrdersReply, StatusReply};

/// A status as a readable table.
pub fn print_status(s: &StatusReply) {
    println!("order     {}", s.id);
    println!("workflow  {} v{}", s.workflow, s.version);
    let stalled = if s.stalled { "  STALLED" } else { "" };
    println!("status    {}{stalled}", s.status);
    match &s.service {
        Some(service) => println!("step      {} ({service}), attempt {}", s.step, s.attempt),
        None => println!("step      {}", s.step),
    }
    println!(
        "hop       {} (stream sequence {}) at {}",
        s.hop, s.sequence, s.last_hop_at
    );
    if let Some(due) = &s.due {
        println!("due       {due}");
    }
    if let Some(f) = &s.failure {
        println!("failure   {f}");
    }
    if let Some(w) = &s.waiting {
        println!(
            "waiting   on unavailable infrastructure since {}, {} tries (no attempt spent): {}",
            w.since, w.tries, w.error
        );
    }
    if let Some(a) = &s.awaiting {
        println!(
            "awaiting  signal {} since {} (deadline {}; `waybill signal {} {} [JSON]`)",
            a.signal, a.since, a.deadline, s.id, a.signal
        );
    }
    if let Some(until) = &s.asleep_until {
        println!("asleep    until {until} (the step's wait or a retry's backoff; no worker holds it)");
    }
    println!("partition {}", s.partition);
    if let Some(e) = &s.history_error {
        println!("history   unavailable: {e}");
        return;
    }
    if s.history.is_empty() {
        println!("history   none yet");
        return;
    }
    let width = s
        .history
        .iter()
        .map(|h| h.step.as_str().len() + 5)
        .max()
        .unwrap_or(4)
        .max(4);
    println!();
    println!(
        "  {:<width$}  {:<20}  {:>7}  {:<28}  {:<27}  {:>9}",
        "step", "service", "attempt", "result", "started", "took ms"
    );
    for h in &s.history {
        println!(
            "  {:<width$}  {:<20}  {:>7}  {:<28}  {:<27}  {:>9}",
            match h.kind {
                waybill::StepKind::Forward => h.step.to_string(),
                waybill::StepKind::Compensation => format!("undo {}", h.step),
            },
            h.service.as_str(),
            h.attempt,
            result_of(h),
            h.started_at,
            took_ms(h)
        );
    }
}

fn result_of(h: &HistoryEntry) -> String {
    let mut r = match (&h.outcome, &h.error) {
        (Some(o), _) => o.clone(),
        (None, Some(e)) => {
            let kind = if let Some(w) = &h.unavailable {
                format!("waited, {} tries", w.tries)
            } else if h.transient == Some(true) {
                "transient".to_owned()
            } else {
                "error".to_owned()
            };
            format!("{kind}: {e}")
        }
        (None, None) => match (&h.cancelled, &h.signal) {
            (Some(reason), _) => format!("cancelled: {reason}"),
            (None, Some(sig)) => match &sig.data {
                Some(data) => format!("signal {}: {data}", sig.name),
                None => format!("no {} by deadline", sig.name),
            },
            (None, None) => "-".into(),
        },
    };
    if let Some(d) = &h.detail {
        r.push_str(&format!(" [{d}]"));
    }
    if r.chars().count() > 28 {
        r = r.chars().take(27).collect::<String>() + "…";
    }
    r
}

/// Milliseconds between two RFC 3339 times of one history entry (same
/// date format, so only the time of day and the date's day count differ).
fn took_ms(h: &HistoryEntry) -> String {
    fn micros(t: &str) -> Option<i128> {
        // YYYY-MM-DDTHH:MM:SS.ffffffZ
        let (date, time) = t.split_once('T')?;
        let day: i128 = date.get(8..10)?.parse().ok()?;
        let h: i128 = time.get(0..2)?.parse().ok()?;
        let m: i128 = time.get(3..5)?.parse().ok()?;
        let s: i128 = time.get(6..8)?.parse().ok()?;
        let f: i128 = time.get(9..15)?.parse().ok()?;
        Some((((day * 24 + h) * 60 + m) * 60 + s) * 1_000_000 + f)
    }
    match (micros(&h.started_at), micros(&h.ended_at)) {
        (Some(a), Some(b)) if b >= a => format!("{:.2}", (b - a) as f64 / 1000.0),
        _ => "-".into(),
    }
}

/// An orders summary as a readable report.
pub fn print_orders(r: &OrdersReply) {
    let s = &r.summary;
    println!(
        "{} orders tracked: {} in flight, {} stalled (partitions answering: {}/{})",
        s.tracked,
        s.in_flight,
        s.stalled,
        r.answered.len(),
        r.partitions
    );
    if !r.missing.is_empty() {
        println!("MISSING partitions (their orders are not counted): {:?}", r.missing);
    }
    for f in &r.feeds {
        if !f.caught_up {
            println!(
                "a coordinator is still replaying the stream ({} hops so far)",
                f.replayed_hops
            );
        }
    }
    if !s.by_status.is_empty() {
        let parts: Vec<String> = s.by_status.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("by status: {}", parts.join(", "));
    }
    if !s.by_step.is_empty() {
        let parts: Vec<String> = s.by_step.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("in flight by step: {}", parts.join(", "));
    }
    if !s.finished.is_empty() {
        let parts: Vec<String> = s.finished.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("finished since the coordinators started: {}", parts.join(", "));
    }
    println!("{} match", s.matched);
    for id in &s.ids {
        println!("{id}");
    }
    if !s.ids.is_empty() && (s.ids.len() as u64) < s.matched {
        println!("… {} more (raise --limit)", s.matched - s.ids.len() as u64);
    }
}
