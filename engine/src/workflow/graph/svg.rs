//! The route as an SVG picture: steps in a column from `start` to
//! `completed`, what undoes each step beside it (dotted), every way to
//! `failed` along a lane on the left (dashed for errors), and jumps (an
//! outcome sent to another step, or straight to the end) along lanes on the
//! right. Edges between the same two boxes in the same style share one line
//! and their labels.

use std::collections::HashMap;
use std::fmt::Write;

use super::{edges, nodes, Edge, Style, COMPLETED, FAILED, START};
use crate::workflow::Route;

const CX: i32 = 290;
const BOX_W: i32 = 210;
const BOX_H: i32 = 60;
const ROW: i32 = 115;
const TOP: i32 = 70;
const UNDO_X: i32 = 530;
const UNDO_W: i32 = 180;
const UNDO_H: i32 = 36;
const FAIL_LANE: i32 = 60;
const END_R: i32 = 22;

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn step_top(i: usize) -> i32 {
    TOP + i32::try_from(i).unwrap_or(i32::MAX / ROW - 1) * ROW
}

/// The index of a step box's id (`s3` → 3).
fn index_of(id: &str, prefix: char) -> Option<usize> {
    id.strip_prefix(prefix)?.parse().ok()
}

/// Edges between the same boxes in the same style, their labels joined.
fn merged(route: &Route) -> Vec<Edge> {
    let mut out: Vec<Edge> = Vec::new();
    let mut at: HashMap<(String, String, bool, bool), usize> = HashMap::new();
    for e in edges(route) {
        let key = (
            e.from.clone(),
            e.to.clone(),
            e.style == Style::Dashed,
            e.style == Style::Dotted,
        );
        match at.get(&key) {
            Some(&i) => {
                let l = &mut out[i].label;
                if !e.label.is_empty() {
                    if !l.is_empty() {
                        l.push_str(", ");
                    }
                    l.push_str(&e.label);
                }
            }
            None => {
                at.insert(key, out.len());
                out.push(e);
            }
        }
    }
    out
}

pub(super) fn svg(route: &Route) -> String {
    let n = route.steps.len();
    let end_y = step_top(n) + END_R;
    let height = end_y + END_R + 50;
    let width = UNDO_X + UNDO_W + 20;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="route" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<title>{} v{}</title>
<style>
.node rect, .end circle {{ fill: #fff; stroke: #445; stroke-width: 1.2; }}
.node.undo rect {{ fill: #f6f6f9; }}
.node.current rect {{ fill: #ffe28a; stroke: #b07d00; stroke-width: 2.5; }}
.end.failed circle {{ fill: #fde8e8; }}
.end.completed circle {{ fill: #e6f6e6; }}
.end.current circle {{ stroke: #b07d00; stroke-width: 3; }}
.edge {{ fill: none; stroke: #445; stroke-width: 1.2; }}
.edge.dashed {{ stroke: #b33; stroke-dasharray: 5 3; }}
.edge.dotted {{ stroke: #778; stroke-dasharray: 2 3; }}
.label {{ fill: #334; font-size: 11px; }}
.name {{ font-weight: bold; font-size: 13px; }}
.small {{ fill: #556; font-size: 11px; }}
</style>
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#445"/></marker></defs>
"##,
        esc(route.workflow.as_str()),
        route.version
    );
    // Boxes.
    let _ = writeln!(
        s,
        r#"<g id="node-{START}" class="end start"><circle cx="{CX}" cy="26" r="14"/><text x="{CX}" y="30" text-anchor="middle" class="small">start</text></g>"#
    );
    for (i, node) in nodes(route).enumerate() {
        let (x, y) = (CX - BOX_W / 2, step_top(i));
        let _ = writeln!(
            s,
            r#"<g id="node-{id}" class="node step" data-step="{name}"><title>{name}: {service}, {limits}</title><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6"/><text x="{CX}" y="{}" text-anchor="middle" class="name">{name}</text><text x="{CX}" y="{}" text-anchor="middle" class="small">{service}</text><text x="{CX}" y="{}" text-anchor="middle" class="small">{limits}</text></g>"#,
            y + 18,
            y + 35,
            y + 51,
            id = node.id,
            name = esc(node.name),
            service = esc(node.service),
            limits = esc(&node.limits),
        );
        if let Some((id, undo)) = node.undo {
            let step = esc(node.name);
            let uy = y + (BOX_H - UNDO_H) / 2;
            let _ = writeln!(
                s,
                r#"<g id="node-{id}" class="node undo" data-undo="{step}"><title>undo: {undo}</title><rect x="{UNDO_X}" y="{uy}" width="{UNDO_W}" height="{UNDO_H}" rx="14"/><text x="{}" y="{}" text-anchor="middle" class="small">undo: {undo}</text></g>"#,
                UNDO_X + UNDO_W / 2,
                uy + 22,
                undo = esc(undo),
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<g id="node-{COMPLETED}" class="end completed"><circle cx="{CX}" cy="{end_y}" r="{END_R}"/><text x="{CX}" y="{}" text-anchor="middle" class="small">completed</text></g>"#,
        end_y + END_R + 16
    );
    let fail_x = FAIL_LANE + 10;
    let _ = writeln!(
        s,
        r#"<g id="node-{FAILED}" class="end failed"><circle cx="{fail_x}" cy="{end_y}" r="{END_R}"/><text x="{fail_x}" y="{}" text-anchor="middle" class="small">failed</text><text x="{fail_x}" y="{}" text-anchor="middle" class="small">(undo newest first)</text></g>"#,
        end_y + END_R + 16,
        end_y + END_R + 30
    );
    // Lines.
    let mut lane = 0;
    for e in merged(route) {
        let class = match e.style {
            Style::Solid => "edge",
            Style::Dashed => "edge dashed",
            Style::Dotted => "edge dotted",
        };
        let label = esc(&e.label);
        let from = if e.from == START { None } else { index_of(&e.from, 's') };
        let (d, lx, ly, anchor) = match (from, e.to.as_str()) {
            (None, _) => (format!("M{CX},40 V{}", TOP - 2), CX + 6, TOP - 12, "start"),
            (Some(i), FAILED) => {
                // Out of the box's left side, along the lane, into `failed`.
                let y = step_top(i) + if e.style == Style::Dashed { 40 } else { 20 };
                (
                    format!("M{},{y} H{fail_x} V{}", CX - BOX_W / 2, end_y - END_R - 2),
                    CX - BOX_W / 2 - 6,
                    y - 4,
                    "end",
                )
            }
            (Some(i), to) if to.starts_with('u') => {
                let y = step_top(i) + BOX_H / 2;
                (format!("M{},{y} H{}", CX + BOX_W / 2, UNDO_X - 2), 0, 0, "none")
            }
            (Some(i), to) => {
                let next = if to == COMPLETED { Some(n) } else { index_of(to, 's') };
                let bottom = step_top(i) + BOX_H;
                match next {
                    Some(j) if j == i + 1 => {
                        let end = if j == n { end_y - END_R - 2 } else { step_top(j) - 2 };
                        (format!("M{CX},{bottom} V{end}"), CX + 6, bottom + 20, "start")
                    }
                    _ => {
                        // A jump: out of the right side, along a lane of its own.
                        lane += 1;
                        let x = CX + BOX_W / 2 + 16 + 14 * lane;
                        let y0 = step_top(i) + 14;
                        let (tx, ty) = match next {
                            Some(j) if j < n => (CX + BOX_W / 2 + 2, step_top(j) + BOX_H - 14),
                            _ => (CX + END_R + 2, end_y),
                        };
                        (
                            format!("M{},{y0} H{x} V{ty} H{tx}", CX + BOX_W / 2),
                            x + 4,
                            (y0 + ty) / 2,
                            "start",
                        )
                    }
                }
            }
        };
        let _ = writeln!(
            s,
            r#"<path class="{class}" data-from="{}" data-to="{}" d="{d}" marker-end="url(#arrow)"/>"#,
            esc(&e.from),
            esc(&e.to)
        );
        if anchor != "none" && !label.is_empty() {
            let _ = writeln!(
                s,
                r#"<text x="{lx}" y="{ly}" text-anchor="{anchor}" class="label">{label}</text>"#
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::super::tests::order;
    use super::super::{draw, GraphFormat};

    #[test]
    fn the_picture_has_a_box_per_step_and_undo_and_every_kind_of_line() {
        let text = draw(order().route(), GraphFormat::Svg);
        assert!(text.starts_with("<svg ") && text.ends_with("</svg>\n"), "{text}");
        for id in ["start", "s0", "s1", "s2", "u0", "u1", "completed", "failed"] {
            assert!(text.contains(&format!(r#"id="node-{id}""#)), "no box {id}:\n{text}");
        }
        assert!(!text.contains(r#"id="node-u2""#), "ship has nothing to undo");
        for (from, to, class) in [
            ("s0", "s1", "edge"),
            ("s0", "failed", "edge"),
            ("s0", "failed", "edge dashed"),
            ("s0", "u0", "edge dotted"),
            ("s1", "s2", "edge"),
            ("s2", "completed", "edge"),
        ] {
            let line = format!(r#"<path class="{class}" data-from="{from}" data-to="{to}""#);
            assert!(text.contains(&line), "missing {line}:\n{text}");
        }
        // `ok` and the jump `skip` both lead from reserve to ship: one line.
        assert!(text.contains(">ok, skip</text>"), "{text}");
    }
}
