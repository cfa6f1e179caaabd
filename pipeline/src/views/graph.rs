//! The pipeline's graph as an SVG drawing for `temper report`: stages as boxes coloured by
//! their state, arrows from each stage to the stages that reference it. A layered layout
//! (each stage one row below its deepest parent, rows ordered by their parents' positions)
//! is enough for pipelines, which are mostly chains with sweep branches side by side.

use std::collections::HashMap;
use std::fmt::Write;

use crate::spec::Pipeline;
use crate::views::plot::escape;

/// One stage to draw: its name, kind, parents (stage names) and state as `temper status`
/// words it ("up to date", "stale: …", "gated: …", …).
pub struct Node {
    pub name: String,
    pub kind: String,
    pub parents: Vec<String>,
    pub state: String,
}

const BOX_W: f64 = 156.0;
const BOX_H: f64 = 40.0;
const GAP_X: f64 = 18.0;
const GAP_Y: f64 = 34.0;
const MARGIN: f64 = 12.0;
const LEGEND_H: f64 = 26.0;

/// State classes in legend order: (class, label, fill).
const STATES: [(&str, &str, &str); 7] = [
    ("done", "up to date", "#c7e9c0"),
    ("running", "running", "#9ecae1"),
    ("stale", "stale", "#fdd49e"),
    ("resumes", "interrupted, resumes", "#fdae6b"),
    ("failed", "failed", "#fc9272"),
    ("gated", "gated", "#d9d9d9"),
    ("never", "never run", "#ffffff"),
];

/// The class of a `temper status` state string.
pub fn state_class(state: &str) -> &'static str {
    if state.starts_with("up to date") {
        "done"
    } else if state.starts_with("running") {
        "running"
    } else if state.starts_with("gated") {
        "gated"
    } else if state.starts_with("failed") {
        "failed"
    } else if state.starts_with("interrupted") {
        "resumes"
    } else if state.starts_with("never run") {
        "never"
    } else {
        "stale"
    }
}

/// Rows of the layered layout: each node one row below its deepest parent; within a row,
/// nodes are ordered by the mean position of their parents (fewer crossing arrows), then by
/// their order in `nodes` (run order).
fn layers(nodes: &[Node]) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let parents = |i: usize| {
        nodes[i]
            .parents
            .iter()
            .filter_map(|p| index.get(p.as_str()).copied())
    };
    // Nodes come in run order, so every parent's depth is known before its children's.
    let mut depth = vec![0usize; nodes.len()];
    for i in 0..nodes.len() {
        depth[i] = parents(i).map(|p| depth[p] + 1).max().unwrap_or(0);
    }
    let rows = depth.iter().max().map_or(0, |d| d + 1);
    let mut layers: Vec<Vec<usize>> = vec![Vec::new(); rows];
    for (i, d) in depth.iter().enumerate() {
        layers[*d].push(i);
    }
    let mut position = vec![0.0f64; nodes.len()];
    for layer in &mut layers {
        let key = |i: usize| {
            let ps: Vec<f64> = parents(i).map(|p| position[p]).collect();
            if ps.is_empty() {
                i as f64
            } else {
                ps.iter().sum::<f64>() / ps.len() as f64
            }
        };
        let mut keyed: Vec<(f64, usize)> = layer.iter().map(|&i| (key(i), i)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        *layer = keyed.into_iter().map(|(_, i)| i).collect();
        let centre = (layer.len() as f64 - 1.0) / 2.0;
        for (slot, &i) in layer.iter().enumerate() {
            position[i] = slot as f64 - centre;
        }
    }
    layers
}

/// `s` cut to `max` characters with an ellipsis, so a label stays inside its box.
fn fit(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let head: String = s.chars().take(max - 1).collect();
        format!("{head}…")
    }
}

/// A legend entry's width: its swatch, about 6.5 px per character at this font size, a gap.
fn legend_width(label: &str) -> f64 {
    16.0 + 6.5 * label.len() as f64 + 18.0
}

/// The drawing, one `<svg>` element sized to its content.
pub fn draw(nodes: &[Node]) -> String {
    let layers = layers(nodes);
    let widest = layers.iter().map(Vec::len).max().unwrap_or(0).max(3) as f64;
    let legend: f64 = STATES.iter().map(|s| legend_width(s.1)).sum();
    let width = (2.0 * MARGIN + widest * BOX_W + (widest - 1.0) * GAP_X).max(2.0 * MARGIN + legend);
    let height = 2.0 * MARGIN + LEGEND_H + layers.len() as f64 * (BOX_H + GAP_Y) - GAP_Y;
    let mut at: HashMap<&str, (f64, f64)> = HashMap::new();
    for (row, layer) in layers.iter().enumerate() {
        let span = layer.len() as f64 * BOX_W + (layer.len() as f64 - 1.0) * GAP_X;
        let left = (width - span) / 2.0;
        for (slot, &i) in layer.iter().enumerate() {
            let x = left + slot as f64 * (BOX_W + GAP_X);
            let y = MARGIN + LEGEND_H + row as f64 * (BOX_H + GAP_Y);
            at.insert(nodes[i].name.as_str(), (x, y));
        }
    }
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11"><defs><marker id="dag-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>"##
    );
    let mut x = MARGIN;
    for (class, label, fill) in STATES {
        let _ = write!(
            svg,
            r##"<rect class="legend-{class}" x="{x:.0}" y="{MARGIN}" width="12" height="12" fill="{fill}" stroke="#555"/><text x="{:.0}" y="{:.0}">{label}</text>"##,
            x + 16.0,
            MARGIN + 10.0
        );
        x += legend_width(label);
    }
    for n in nodes {
        let (cx, cy) = at[n.name.as_str()];
        for p in &n.parents {
            let Some(&(px, py)) = at.get(p.as_str()) else {
                continue;
            };
            let (x1, y1) = (px + BOX_W / 2.0, py + BOX_H);
            let (x2, y2) = (cx + BOX_W / 2.0, cy);
            let bend = (y2 - y1) / 2.0;
            let _ = write!(
                svg,
                r##"<path class="edge" d="M{x1:.1},{y1:.1} C{x1:.1},{:.1} {x2:.1},{:.1} {x2:.1},{y2:.1}" fill="none" stroke="#666" stroke-width="1.2" marker-end="url(#dag-arrow)"><title>{} → {}</title></path>"##,
                y1 + bend,
                y2 - bend,
                escape(p),
                escape(&n.name)
            );
        }
    }
    for n in nodes {
        let (x, y) = at[n.name.as_str()];
        let class = state_class(&n.state);
        let fill = STATES.iter().find(|s| s.0 == class).map_or("#fff", |s| s.2);
        let short = n.state.split([':', ';']).next().unwrap_or_default();
        let _ = write!(
            svg,
            r##"<g class="stage {class}"><title>{name}: {state}</title><rect x="{x:.1}" y="{y:.1}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}" stroke="#555"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{label}</text><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#444">{detail}</text></g>"##,
            y + 16.0,
            y + 31.0,
            name = escape(&n.name),
            state = escape(&n.state),
            tx = x + BOX_W / 2.0,
            label = escape(&fit(&n.name, 24)),
            detail = escape(&fit(&format!("{} · {short}", n.kind), 28)),
        );
    }
    svg.push_str("</svg>");
    svg
}

/// `temper dag`: the stage graph as Mermaid or Graphviz text.
pub fn dag(p: &Pipeline, format: crate::DagFormat) {
    match format {
        crate::DagFormat::Dot => {
            println!("digraph \"{}\" {{\n  rankdir=LR;", p.name);
            for s in &p.stages {
                println!("  \"{}\" [label=\"{}\\n({})\"];", s.name, s.name, s.uses);
                for parent in &s.parents {
                    println!("  \"{parent}\" -> \"{}\";", s.name);
                }
            }
            println!("}}");
        }
        crate::DagFormat::Mermaid => {
            println!("graph LR");
            for s in &p.stages {
                println!("  {}[\"{} ({})\"]", s.name, s.name, s.uses);
            }
            for s in &p.stages {
                for parent in &s.parents {
                    println!("  {parent} --> {}", s.name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, parents: &[&str], state: &str) -> Node {
        Node {
            name: name.into(),
            kind: "sft".into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            state: state.into(),
        }
    }

    #[test]
    fn stages_sit_one_row_below_their_deepest_parent() {
        let nodes = [
            node("tok", &[], "up to date"),
            node("b", &["tok"], "up to date"),
            node("c", &["tok"], "stale: params changed"),
            node("d", &["b", "c", "tok"], "never run"),
        ];
        assert_eq!(layers(&nodes), vec![vec![0], vec![1, 2], vec![3]]);
        let svg = draw(&nodes);
        assert_eq!(svg.matches("<g class=\"stage ").count(), 4);
        assert_eq!(svg.matches("class=\"edge\"").count(), 5);
        assert!(svg.contains("<g class=\"stage stale\"><title>c: stale: params changed"));
        assert!(svg.contains("<g class=\"stage never\">"));
    }

    #[test]
    fn children_are_ordered_under_their_parents() {
        // Two chains started in the opposite order: each child lands under its own parent.
        let nodes = [
            node("a", &[], "up to date"),
            node("b", &[], "up to date"),
            node("b2", &["b"], "up to date"),
            node("a2", &["a"], "up to date"),
        ];
        assert_eq!(layers(&nodes)[1], vec![3, 2]);
    }

    #[test]
    fn states_map_to_classes_and_long_names_are_cut() {
        assert_eq!(state_class("gated: reward.accuracy 0.5 < 0.7"), "gated");
        assert_eq!(state_class("failed (exit 3); resumes"), "failed");
        assert_eq!(state_class("interrupted; resumes"), "resumes");
        assert_eq!(state_class("running: step 3/10 (30 %)"), "running");
        assert_eq!(state_class("stale: output missing: x"), "stale");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert!(draw(&[node("<x>", &[], "never run")]).contains("&lt;x&gt;"));
    }
}
