//! `temper report`: one self-contained HTML file with the pipeline's status, its graph, and a
//! chart per metric per stage (train and eval curves together), so a glance shows which stage
//! went wrong: a flat SFT curve, a reward model at chance, a KL that runs away in PPO.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::spec::Pipeline;
use crate::views::graph::Node;
use crate::views::metrics::{metric_rows, read_metrics};
use crate::views::plot::{escape, line_chart, Series};
use crate::views::status::{status_rows, STATUS_HEADER};

const SPLITS: [(&str, &str); 2] = [("train", "#1f77b4"), ("eval", "#d62728")];

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;\
text-align:left;font-size:13px}.charts{display:flex;flex-wrap:wrap;gap:8px}\
.charts svg{border:1px solid #eee}h2{margin-top:28px}.warning{color:#a50}\
details{margin:8px 0}summary{cursor:pointer}td.text{max-width:520px;white-space:pre-wrap}";

/// Metric names in order of first appearance, without the bookkeeping fields.
fn metric_names(rows: &[Json]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        for (k, v) in r.as_object().into_iter().flatten() {
            if v.is_number() && !matches!(k.as_str(), "step" | "time_s") && !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    out.push_str("<table><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", escape(c));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

/// The points of metric `n` in the rows of one split; a logged null (a NaN or inf, which
/// JSON cannot hold) becomes NaN, so the chart breaks the line there.
fn points(rows: &[Json], split: &str, n: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r["split"] == *split)
        .filter_map(|r| {
            let v = r.get(n)?;
            Some((r["step"].as_f64()?, v.as_f64().unwrap_or(f64::NAN)))
        })
        .collect()
}

/// "loss at step 40, 50; kl at step 40": where a metric was logged as non-finite.
fn non_finite(rows: &[Json], names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter_map(|n| {
            let steps: Vec<String> = rows
                .iter()
                .filter(|r| r.get(n).is_some_and(Json::is_null))
                .map(|r| r["step"].to_string())
                .collect();
            (!steps.is_empty()).then(|| format!("{n} at step {}", steps.join(", ")))
        })
        .collect()
}

/// A stage's section: a chart per metric, or a table when the stage logged a single row
/// (an evaluation), where a chart would be one dot; then its samples.
fn stage_section(out: &mut String, p: &Pipeline, name: &str, kind: &str, report_dir: &Path) {
    let file = read_metrics(p, name);
    let rows = &file.rows;
    let _ = write!(
        out,
        "<h2 id=\"stage-{0}\">{0} <small>({1})</small></h2>",
        escape(name),
        escape(kind)
    );
    if let Some(w) = file.warning() {
        let _ = write!(out, "<p class=\"warning\">{}</p>", escape(&w));
    }
    let eval_report = p.stage_out(name).join("report.md");
    if eval_report.exists() {
        let link = relative(&eval_report, report_dir);
        let _ = write!(
            out,
            "<p>Details: <a href=\"{0}\">{0}</a></p>",
            escape(&link)
        );
    }
    if rows.is_empty() {
        out.push_str("<p>No metrics yet.</p>");
        crate::views::samples::section(out, &p.stage_out(name));
        return;
    }
    let names = metric_names(rows);
    let bad = non_finite(rows, &names);
    if !bad.is_empty() {
        let _ = write!(
            out,
            "<p class=\"warning\">Not finite (drawn as gaps): {}</p>",
            escape(&bad.join("; "))
        );
    }
    if rows.len() == 1 {
        single_row_table(out, &rows[0], &names);
        crate::views::samples::section(out, &p.stage_out(name));
        return;
    }
    out.push_str("<div class=\"charts\">");
    if kind == "ppo" {
        // Reward against KL, iteration by iteration: reward bought with ever more KL is the
        // signature of over-optimisation.
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r["kl/mean"].as_f64()?, r["reward/mean"].as_f64()?)))
            .collect();
        let series = [Series {
            label: "iterations".into(),
            color: "#2ca02c",
            points,
        }];
        if let Some(svg) = crate::views::plot::xy_chart("reward/mean vs kl/mean", "KL", &series) {
            out.push_str(&svg);
        }
    }
    for n in &names {
        let series: Vec<Series> = SPLITS
            .iter()
            .map(|(split, color)| Series {
                label: split.to_string(),
                color,
                points: points(rows, split, n),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if let Some(svg) = line_chart(n, &series) {
            out.push_str(&svg);
        }
    }
    out.push_str("</div>");
    crate::views::samples::section(out, &p.stage_out(name));
}

/// Every swept stage's branches side by side (as `temper compare`): mean ± std and values.
fn sweeps_section(out: &mut String, p: &Pipeline) {
    let groups = crate::views::compare::groups(p);
    if groups.is_empty() {
        return;
    }
    out.push_str("<h2>Sweeps</h2>");
    for g in groups {
        let _ = write!(
            out,
            "<h3>{} ({} branches)</h3>",
            escape(&g.name),
            g.branches.len()
        );
        let (header, rows) = g.table();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(out, &header, &rows);
        sweep_curves(out, p, &g.branches);
    }
}

/// The branches' curves over steps, one chart per metric: each branch thin, the mean thick
/// in a ± std band. Evaluation rows where the branches have several, else training rows.
fn sweep_curves(out: &mut String, p: &Pipeline, branches: &[(String, String)]) {
    let rows: Vec<Vec<Json>> = branches.iter().map(|(_, s)| metric_rows(p, s)).collect();
    let count = |split: &str| {
        rows.iter()
            .flatten()
            .filter(|r| r["split"] == *split)
            .count()
    };
    let (split, color) = if count("eval") > branches.len() {
        SPLITS[1]
    } else {
        SPLITS[0]
    };
    let in_split: Vec<Json> = rows
        .iter()
        .flatten()
        .filter(|r| r["split"] == *split)
        .cloned()
        .collect();
    let charts: Vec<String> = metric_names(&in_split)
        .iter()
        .filter_map(|n| {
            let series: Vec<Series> = branches
                .iter()
                .zip(&rows)
                .map(|((label, _), r)| Series {
                    label: label.clone(),
                    color,
                    points: points(r, split, n),
                })
                .collect();
            crate::views::plot::band_chart(&format!("{n} ({split})"), color, &series)
        })
        .collect();
    if !charts.is_empty() {
        let _ = write!(out, "<div class=\"charts\">{}</div>", charts.concat());
    }
}

/// A single row (an evaluation) as a table: metric × policy when its keys are `policy/metric`,
/// else metric | value.
fn single_row_table(out: &mut String, row: &Json, names: &[String]) {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
    let mut columns: Vec<&str> = Vec::new();
    let mut metrics: Vec<&str> = Vec::new();
    for n in names {
        if let Some((policy, metric)) = n.split_once('/') {
            if !columns.contains(&policy) {
                columns.push(policy);
            }
            if !metrics.contains(&metric) {
                metrics.push(metric);
            }
        }
    }
    if columns.is_empty() {
        let cells: Vec<Vec<String>> = names
            .iter()
            .map(|n| vec![n.clone(), fmt(row[n].as_f64())])
            .collect();
        table(out, &["metric", "value"], &cells);
        return;
    }
    let cells: Vec<Vec<String>> = metrics
        .iter()
        .map(|m| {
            std::iter::once(m.to_string())
                .chain(
                    columns
                        .iter()
                        .map(|c| fmt(row[format!("{c}/{m}")].as_f64())),
                )
                .collect()
        })
        .collect();
    let header: Vec<&str> = std::iter::once("metric").chain(columns).collect();
    table(out, &header, &cells);
}

/// `target` relative to `from_dir` when it lies below it, else absolute.
fn relative(target: &Path, from_dir: &Path) -> String {
    target
        .strip_prefix(from_dir)
        .unwrap_or(target)
        .display()
        .to_string()
}

/// Writes the report (default `<workdir>/report.html`) and returns its path.
pub fn write_report(p: &Pipeline, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = out.map_or_else(|| p.workdir.join("report.html"), Path::to_path_buf);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&dir)?;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>temper: {0}</title>\
         <style>{STYLE}</style></head><body><h1>Pipeline {0}</h1><p>{1} · work folder {2}</p>",
        escape(&p.name),
        escape(&p.file.display().to_string()),
        escape(&p.workdir.display().to_string())
    );
    let status = status_rows(p)?;
    table(&mut html, &STATUS_HEADER, &status);
    let nodes: Vec<Node> = p
        .topo_order()
        .iter()
        .zip(&status)
        .map(|(st, row)| Node {
            name: st.name.clone(),
            kind: st.uses.name().to_string(),
            parents: st.parents.iter().cloned().collect(),
            state: row[2].clone(),
        })
        .collect();
    html.push_str("<h2>Graph</h2>");
    html.push_str(&crate::views::graph::draw(&nodes));
    html.push_str(
        "<p>Curves: <span style=\"color:#1f77b4\">train</span>, \
                   <span style=\"color:#d62728\">eval</span>; x is the stage's step \
                   (PPO: iteration).</p>",
    );
    sweeps_section(&mut html, p);
    for st in p.topo_order() {
        stage_section(&mut html, p, &st.name, st.uses.name(), &dir);
    }
    html.push_str("</body></html>\n");
    let tmp = path.with_extension("html.tmp");
    std::fs::write(&tmp, html)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
