//! `temper metrics` (tables from each stage's metrics.jsonl, a cut-off last line skipped and
//! named) and `temper tensorboard` (the command that shows every stage's event files).

use serde_json::Value as Json;

use crate::spec::Pipeline;
use crate::views::status::table;

/// A stage's metrics.jsonl as read: the rows, and the numbers (from 1) of lines that were
/// not JSON objects — typically a last line cut off by a kill — which are skipped.
pub struct MetricsFile {
    pub path: std::path::PathBuf,
    pub rows: Vec<Json>,
    pub unreadable: Vec<usize>,
}

impl MetricsFile {
    /// One line naming the file and the skipped lines, or None when every line was read.
    pub fn warning(&self) -> Option<String> {
        let lines: Vec<String> = self.unreadable.iter().map(usize::to_string).collect();
        (!lines.is_empty()).then(|| {
            format!(
                "{}: skipped unreadable line {} (cut off by a kill? the stage rewrites it when it resumes)",
                self.path.display(),
                lines.join(", ")
            )
        })
    }
}

/// The stage's metrics file; no rows when it has none.
pub fn read_metrics(p: &Pipeline, stage: &str) -> MetricsFile {
    let path = p.stage_out(stage).join("metrics.jsonl");
    let mut file = MetricsFile {
        rows: Vec::new(),
        unreadable: Vec::new(),
        path,
    };
    let text = std::fs::read_to_string(&file.path).unwrap_or_default();
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<Json>(line) {
            Ok(row) if row.is_object() => file.rows.push(row),
            _ if line.trim().is_empty() => {}
            _ => file.unreadable.push(i + 1),
        }
    }
    file
}

/// The readable rows of a stage's metrics.jsonl.
pub fn metric_rows(p: &Pipeline, stage: &str) -> Vec<Json> {
    read_metrics(p, stage).rows
}

pub fn metrics(
    p: &Pipeline,
    stage: Option<&str>,
    split: crate::Split,
    last: Option<usize>,
    as_json: bool,
) -> anyhow::Result<()> {
    let names: Vec<String> = match stage {
        Some(s) => {
            anyhow::ensure!(
                p.stage(s).is_some(),
                "no stage `{s}` in {}",
                p.file.display()
            );
            vec![s.to_string()]
        }
        None => p.topo_order().iter().map(|s| s.name.clone()).collect(),
    };
    for name in names {
        let file = read_metrics(p, &name);
        if let Some(w) = file.warning() {
            eprintln!("warning: {w}");
        }
        let mut rows: Vec<Json> = file
            .rows
            .into_iter()
            .filter(|r| split.admits(r["split"].as_str().unwrap_or("")))
            .collect();
        if let Some(n) = last {
            rows = rows.split_off(rows.len().saturating_sub(n));
        }
        if as_json {
            for r in &rows {
                println!("{}", serde_json::json!({"stage": name, "metrics": r}));
            }
            continue;
        }
        if rows.is_empty() {
            continue;
        }
        let mut cols: Vec<String> = vec!["step".into()];
        for r in &rows {
            for k in r.as_object().into_iter().flat_map(|o| o.keys()) {
                if !cols.contains(k) && k != "split" && k != "time_s" {
                    cols.push(k.clone());
                }
            }
        }
        if split == crate::Split::All {
            cols.insert(1, "split".into());
        }
        println!("\n{name} ({})", split.name());
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                cols.iter()
                    .map(|c| match &r[c] {
                        Json::Number(n) if n.is_f64() => {
                            let x = n.as_f64().unwrap_or(0.0);
                            if x.abs() >= 1000.0 {
                                format!("{x:.0}")
                            } else if x == 0.0 || x.abs() >= 1e-3 {
                                format!("{x:.4}")
                            } else {
                                format!("{x:.3e}")
                            }
                        }
                        Json::Null => "-".into(),
                        Json::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .collect();
        let header: Vec<&str> = cols.iter().map(String::as_str).collect();
        table(&header, &cells);
    }
    Ok(())
}

/// `tensorboard --logdir_spec name:path,…` over the stages that have written event files.
pub fn tensorboard(p: &Pipeline) {
    let runs: Vec<String> = p
        .stages
        .iter()
        .map(|s| (s.name.clone(), p.stage_out(&s.name).join("tb")))
        .filter(|(_, dir)| dir.is_dir())
        .map(|(name, dir)| format!("{}:{}", name.replace([':', ','], "_"), dir.display()))
        .collect();
    if runs.is_empty() {
        eprintln!("no stage has written TensorBoard files yet; run the pipeline first");
        return;
    }
    println!("tensorboard --logdir_spec {}", runs.join(","));
}
