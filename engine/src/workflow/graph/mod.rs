//! A route as a picture: Mermaid (`flowchart`), Graphviz DOT text, or SVG,
//! for `waybill graph` and the operator's page (which draws the SVG and
//! marks the step an order is at).
//!
//! Every step is a box (its name, service, tries and timeout); `ok` leads to
//! the next step unless the route maps it elsewhere; each mapped outcome is
//! an edge labelled with it; an error that retries cannot fix (a permanent
//! failure, or the step's tries spent) fails the order, a dashed edge; a
//! step that can be undone has a dotted edge to the service that undoes it.
//! A failed order runs the owed compensations, newest first, and ends
//! `compensated` (or `failed` when nothing was owed).

use std::fmt::Write;

use super::{Next, Onward, Route, RouteStep};

mod svg;

/// The drawing languages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    Mermaid,
    Dot,
    /// A picture with no script, its styles inside: each step's box is
    /// `<g id="node-s<i>" class="node">`, what undoes it `node-u<i>`.
    Svg,
}

/// An edge of the drawing: from, to, label, style.
struct Edge {
    from: String,
    to: String,
    label: String,
    style: Style,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    Solid,
    /// Errors: the order fails.
    Dashed,
    /// A step and what undoes it.
    Dotted,
}

const START: &str = "start";
const COMPLETED: &str = "completed";
const FAILED: &str = "failed";

fn step_id(i: usize) -> String {
    format!("s{i}")
}

fn undo_id(i: usize) -> String {
    format!("u{i}")
}

/// Where `next` leads from step `i`, and what the way says besides its
/// label: into every branch of a fork (`fork holds`), or through a join
/// (`join holds: all`) to what follows it.
fn targets(route: &Route, i: usize, next: Next) -> (Vec<String>, String) {
    let at = u16::try_from(i).unwrap_or(u16::MAX);
    let starts = |f: usize| route.forks[f].starts.iter().map(|&s| step_id(usize::from(s))).collect();
    match route.onward(at, next) {
        Onward::Step(j) => (vec![step_id(usize::from(j))], String::new()),
        Onward::Complete => (vec![COMPLETED.to_owned()], String::new()),
        Onward::Fail => (vec![FAILED.to_owned()], String::new()),
        Onward::Fork(f) => (starts(f), format!("fork {}", route.forks[f].name)),
        Onward::Join(f) => {
            let fork = &route.forks[f];
            let how = match fork.join.first {
                None => "all".to_owned(),
                Some(n) => format!("first {n}"),
            };
            let to = match route.fork_at(fork.end) {
                Some(g) => starts(g),
                None if usize::from(fork.end) < route.steps.len() => vec![step_id(usize::from(fork.end))],
                None => vec![COMPLETED.to_owned()],
            };
            (to, format!("join {}: {how}", fork.name))
        }
    }
}

fn tries(step: &RouteStep) -> String {
    match step.retry.max_attempts {
        1 => "1 try".to_owned(),
        n => format!("{n} tries"),
    }
}

fn timeout(step: &RouteStep) -> String {
    let ms = step.timeout_ms;
    if ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

/// A step's wait before it runs: `waits 2 s, ` (or nothing).
fn wait(step: &RouteStep) -> String {
    let Some(w) = &step.wait else {
        return String::new();
    };
    let Some(d) = w.duration() else {
        return match w {
            crate::workflow::Wait::Until { field } => format!("waits until {field}, "),
            _ => String::new(),
        };
    };
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let span = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "min"), (1000, "s")]
        .into_iter()
        .find(|(unit, _)| ms % unit == 0)
        .map_or_else(|| format!("{ms} ms"), |(unit, name)| format!("{} {name}", ms / unit));
    match w.signal() {
        Some(name) => format!("waits for {name} (at most {span}), "),
        None => format!("waits {span}, "),
    }
}

fn edges(route: &Route) -> Vec<Edge> {
    let mut out = Vec::new();
    let edge = |from: String, to: String, label: &str, style| Edge {
        from,
        to,
        label: label.to_owned(),
        style,
    };
    if !route.steps.is_empty() {
        out.push(edge(START.to_owned(), step_id(0), "", Style::Solid));
    }
    let mut ways = |i: usize, next: Next, label: &str, style: Style| {
        let (to, via) = targets(route, i, next);
        let label = match (label.is_empty(), via.is_empty()) {
            (_, true) => label.to_owned(),
            (true, false) => via,
            (false, false) => format!("{label}, {via}"),
        };
        for t in to {
            out.push(edge(step_id(i), t, &label, style));
        }
    };
    for (i, step) in route.steps.iter().enumerate() {
        if !step.branches.iter().any(|b| b.outcome.is_ok()) {
            ways(i, Next::Continue, "ok", Style::Solid);
        }
        for b in &step.branches {
            ways(i, b.next, b.outcome.as_str(), Style::Solid);
        }
        if let Some(crate::workflow::Wait::Signal { name, on_timeout, .. }) = &step.wait {
            ways(i, *on_timeout, &format!("no {name} in time"), Style::Dashed);
        }
    }
    for (i, step) in route.steps.iter().enumerate() {
        out.push(edge(step_id(i), FAILED.to_owned(), "error", Style::Dashed));
        if step.compensate.is_some() {
            out.push(edge(step_id(i), undo_id(i), "undone by", Style::Dotted));
        }
    }
    out
}

/// A step's box, and the box of what undoes it.
struct Node<'a> {
    id: String,
    name: &'a str,
    service: &'a str,
    /// Its wait, tries and timeout.
    limits: String,
    undo: Option<(String, &'a str)>,
}

fn nodes(route: &Route) -> impl Iterator<Item = Node<'_>> {
    route.steps.iter().enumerate().map(|(i, step)| Node {
        id: step_id(i),
        name: step.name.as_str(),
        service: step.service.as_str(),
        limits: format!("{}{}, {}", wait(step), tries(step), timeout(step)),
        undo: step.compensate.as_ref().map(|u| (undo_id(i), u.as_str())),
    })
}

/// `route` drawn in `format`.
pub fn draw(route: &Route, format: GraphFormat) -> String {
    match format {
        GraphFormat::Mermaid => mermaid(route),
        GraphFormat::Dot => dot(route),
        GraphFormat::Svg => svg::svg(route),
    }
}

fn mermaid(route: &Route) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\ntitle: {} v{}\n---\nflowchart TD",
        route.workflow, route.version
    );
    let _ = writeln!(s, "    {START}((start))");
    for n in nodes(route) {
        let _ = writeln!(
            s,
            "    {}[\"<b>{}</b><br/>{}<br/>{}\"]",
            n.id, n.name, n.service, n.limits
        );
        if let Some((id, undo)) = n.undo {
            let _ = writeln!(s, "    {id}[/\"undo: {undo}\"/]");
        }
    }
    let _ = writeln!(s, "    {COMPLETED}(((completed)))");
    let _ = writeln!(s, "    {FAILED}(((\"failed: compensations run, newest first\")))");
    for e in edges(route) {
        let arrow = match (e.style, e.label.is_empty()) {
            (Style::Solid, true) => " --> ".to_owned(),
            (Style::Solid, false) => format!(" -- \"{}\" --> ", e.label),
            (Style::Dashed, _) => format!(" -. \"{}\" .-> ", e.label),
            (Style::Dotted, _) => format!(" -.- |\"{}\"| ", e.label),
        };
        let _ = writeln!(s, "    {}{arrow}{}", e.from, e.to);
    }
    s
}

fn dot(route: &Route) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph \"{} v{}\" {{", route.workflow, route.version);
    let _ = writeln!(s, "    rankdir=TB;\n    node [shape=box, fontname=\"sans-serif\"];");
    let _ = writeln!(s, "    {START} [shape=circle, label=\"start\"];");
    for n in nodes(route) {
        let _ = writeln!(s, "    {} [label=\"{}\\n{}\\n{}\"];", n.id, n.name, n.service, n.limits);
        if let Some((id, undo)) = n.undo {
            let _ = writeln!(s, "    {id} [shape=parallelogram, label=\"undo: {undo}\"];");
        }
    }
    let _ = writeln!(s, "    {COMPLETED} [shape=doublecircle, label=\"completed\"];");
    let _ = writeln!(
        s,
        "    {FAILED} [shape=doublecircle, label=\"failed:\\ncompensations run,\\nnewest first\"];"
    );
    for e in edges(route) {
        let style = match e.style {
            Style::Solid => "solid",
            Style::Dashed => "dashed",
            Style::Dotted => "dotted",
        };
        let _ = writeln!(s, "    {} -> {} [label=\"{}\", style={style}];", e.from, e.to, e.label);
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::{Backoff, Then, Workflow};
    use std::time::Duration;

    pub(super) fn order() -> Workflow {
        Workflow::builder("order", 2)
            .step("charge", "payment.charge")
            .compensate("payment.refund")
            .retry(Backoff::exponential(8, Duration::from_millis(50)))
            .timeout(Duration::from_secs(10))
            .on("declined", Then::Fail)
            .step("reserve", "inventory.reserve")
            .compensate("inventory.release")
            .on("skip", Then::step("ship"))
            .step("ship", "shipping.dispatch")
            .retry(Backoff::none())
            .timeout(Duration::from_millis(1500))
            .build()
            .unwrap()
    }

    #[test]
    fn mermaid_has_every_step_outcome_error_and_undo() {
        let text = draw(order().route(), GraphFormat::Mermaid);
        let want = [
            "title: order v2",
            "flowchart TD",
            "s0[\"<b>charge</b><br/>payment.charge<br/>8 tries, 10 s\"]",
            "u0[/\"undo: payment.refund\"/]",
            "s2[\"<b>ship</b><br/>shipping.dispatch<br/>1 try, 1500 ms\"]",
            "start --> s0",
            "s0 -- \"ok\" --> s1",
            "s0 -- \"declined\" --> failed",
            "s0 -. \"error\" .-> failed",
            "s0 -.- |\"undone by\"| u0",
            "s1 -- \"skip\" --> s2",
            "s2 -- \"ok\" --> completed",
        ];
        for line in want {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("u2"), "ship has nothing to undo:\n{text}");
    }

    #[test]
    fn a_step_that_waits_says_how_long() {
        let wf = Workflow::builder("remind", 1)
            .step("hold", "booking.hold")
            .delay(Duration::from_secs(48 * 3600))
            .step("remind", "mail.remind")
            .delay(Duration::from_millis(1500))
            .step("ship", "shipping.dispatch")
            .not_before("delivery.at")
            .build()
            .unwrap();
        let text = draw(wf.route(), GraphFormat::Mermaid);
        assert!(
            text.contains("shipping.dispatch<br/>waits until delivery.at, 3 tries, 30 s"),
            "{text}"
        );
        assert!(text.contains("booking.hold<br/>waits 2 d, 3 tries, 30 s"), "{text}");
        assert!(text.contains("mail.remind<br/>waits 1500 ms, 3 tries, 30 s"), "{text}");
    }

    #[test]
    fn dot_is_one_digraph_with_the_same_edges() {
        let text = draw(order().route(), GraphFormat::Dot);
        assert!(
            text.starts_with("digraph \"order v2\" {") && text.ends_with("}\n"),
            "{text}"
        );
        for line in [
            "s0 -> s1 [label=\"ok\", style=solid];",
            "s0 -> failed [label=\"declined\", style=solid];",
            "s1 -> failed [label=\"error\", style=dashed];",
            "s1 -> u1 [label=\"undone by\", style=dotted];",
            "s2 -> completed [label=\"ok\", style=solid];",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
