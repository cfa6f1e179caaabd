//! `temper report`: one self-contained HTML file with the pipeline's status, its graph, and a
//! chart per metric per stage (train and eval curves together), so a glance shows which stage
//! went wrong: a flat SFT curve, a reward model at chance, a KL that runs away in PPO.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::plot::{escape, line_chart, Series};
use crate::report::{metric_rows, status_rows, STATUS_HEADER};
use crate::schema::Pipeline;

const SPLITS: [(&str, &str); 2] = [("train", "#1f77b4"), ("eval", "#d62728")];

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;\
text-align:left;font-size:13px}.charts{display:flex;flex-wrap:wrap;gap:8px}\
.charts svg{border:1px solid #eee}h2{margin-top:28px}";

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

/// A stage's section: a chart per metric, or a table when the stage logged a single row
/// (an evaluation), where a chart would be one dot.
fn stage_section(out: &mut String, p: &Pipeline, name: &str, kind: &str, report_dir: &Path) {
    let rows = metric_rows(p, name);
    let _ = write!(
        out,
        "<h2>{} <small>({})</small></h2>",
        escape(name),
        escape(kind)
    );
    let eval_report = p.stage_out(name).join("report.md");
    if eval_report.exists() {
        let link = relative(&eval_report, report_dir);
        let _ = write!(
            out,
            "<p>Samples and details: <a href=\"{0}\">{0}</a></p>",
            escape(&link)
        );
    }
    if rows.is_empty() {
        out.push_str("<p>No metrics yet.</p>");
        return;
    }
    let names = metric_names(&rows);
    if rows.len() == 1 {
        single_row_table(out, &rows[0], &names);
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
        if let Some(svg) = crate::plot::xy_chart("reward/mean vs kl/mean", "KL", &series) {
            out.push_str(&svg);
        }
    }
    for n in &names {
        let series: Vec<Series> = SPLITS
            .iter()
            .map(|(split, color)| Series {
                label: split.to_string(),
                color,
                points: rows
                    .iter()
                    .filter(|r| r["split"] == *split)
                    .filter_map(|r| Some((r["step"].as_f64()?, r[n].as_f64()?)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if let Some(svg) = line_chart(n, &series) {
            out.push_str(&svg);
        }
    }
    out.push_str("</div>");
}

/// Every swept stage's branches side by side (as `temper compare`): mean ± std and values.
fn sweeps_section(out: &mut String, p: &Pipeline) {
    let groups = crate::compare::groups(p);
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
        let mut header = vec!["metric".to_string(), "mean ± std".to_string()];
        header.extend(g.branches.iter().map(|(l, _)| l.clone()));
        let rows: Vec<Vec<String>> = g
            .rows
            .iter()
            .map(|r| {
                let (mean, std, n) = r.stats();
                let fmt = crate::compare::fmt;
                let mut row = vec![
                    r.metric.clone(),
                    format!("{} ± {} (n={n})", fmt(mean), fmt(std)),
                ];
                row.extend(r.values.iter().map(|v| v.map_or("-".into(), fmt)));
                row
            })
            .collect();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(out, &header, &rows);
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
    table(&mut html, &STATUS_HEADER, &status_rows(p)?);
    html.push_str("<h2>Graph</h2><table><tr><th>stage</th><th>needs</th></tr>");
    for st in p.topo_order() {
        let parents: Vec<&str> = st.parents.iter().map(String::as_str).collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(&st.name),
            escape(&parents.join(", "))
        );
    }
    html.push_str(
        "</table><p>Curves: <span style=\"color:#1f77b4\">train</span>, \
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
