//! Read-only views of a pipeline: `validate`, `status`, `metrics` and `dag` (`report` is in
//! html.rs).

use std::collections::BTreeSet;

use serde_json::Value as Json;

use crate::lock::{Lock, RunStatus};
use crate::plan::{decide, Decision};
use crate::resolve::resolve_all;
use crate::schema::Pipeline;
use crate::validate::validate_stages;

/// `temper validate`: every stage checked with its own parser. Upstream outputs that do not
/// exist yet, or whose stages are stale, are pending. Prints the verdict; returns the exit
/// code.
pub fn validate_all(p: &Pipeline) -> anyhow::Result<i32> {
    let lock = Lock::load(&p.workdir)?;
    let mut cache = lock.file_hashes.clone();
    let resolved = resolve_all(p, &mut cache)?;
    let names: Vec<String> = p.topo_order().iter().map(|s| s.name.clone()).collect();
    let stale: BTreeSet<String> = names
        .iter()
        .filter(|n| decide(&resolved[*n], p, &lock, &mut cache).0 != Decision::Skip)
        .cloned()
        .collect();
    let checked = validate_stages(p, &resolved, &names, &stale)?;
    if checked.problems.is_empty() {
        println!("{}: valid ({} stages)", p.file.display(), p.stages.len());
        if !checked.pending.is_empty() {
            println!(
                "checked when the stage starts (it reads what an upstream stage has yet to write):"
            );
            for st in p.topo_order() {
                if let Some(fields) = checked.pending.get(&st.name) {
                    println!(
                        "  {}: {} — {}",
                        st.name,
                        fields.join(", "),
                        st.uses.content_checks()
                    );
                }
            }
        }
        return Ok(0);
    }
    eprintln!("temper: error: {} problem(s):", checked.problems.len());
    for pr in checked.problems {
        eprintln!("  {pr}");
    }
    Ok(crate::exec::EXIT_INVALID)
}

/// Short "key value" text of the main numbers in a stage's summary.json.
pub fn key_metrics(out: &std::path::Path) -> String {
    let Ok(text) = std::fs::read_to_string(out.join("summary.json")) else {
        return String::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return String::new();
    };
    const KEYS: [&str; 9] = [
        "loss",
        "ppl",
        "general/ppl",
        "accuracy",
        "margin",
        "reward/mean",
        "kl/mean",
        "vocab_size",
        "chars_per_token",
    ];
    // An evaluation's numbers are per policy: `ppo/win_rate`, `ppo/judge_agreement`.
    let per_policy = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.ends_with("/win_rate") || k.ends_with("/judge_agreement"));
    let keys: Vec<&str> = KEYS
        .iter()
        .copied()
        .chain(per_policy.map(|(k, _)| k.as_str()))
        .collect();
    keys.iter()
        .filter_map(|k| {
            v.get(*k).and_then(|x| x.as_f64()).map(|x| {
                format!(
                    "{k} {}",
                    if x.abs() >= 100.0 {
                        format!("{x:.0}")
                    } else {
                        format!("{x:.4}")
                    }
                )
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let d = now.saturating_sub(secs);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// Prints an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

/// One row per stage, in run order: name, kind, state, last run, duration, key metrics.
pub fn status_rows(p: &Pipeline) -> anyhow::Result<Vec<Vec<String>>> {
    let lock = Lock::load(&p.workdir)?;
    let mut cache = lock.file_hashes.clone();
    let resolved = resolve_all(p, &mut cache)?;
    let mut rows = Vec::new();
    for st in p.topo_order() {
        let (d, why) = decide(&resolved[&st.name], p, &lock, &mut cache);
        let (done, attempt) = (lock.done(&st.name), lock.attempt(&st.name));
        let running = running_state(&p.stage_attempt(&st.name));
        let mut state = match (&d, done) {
            _ if running.is_some() => running.clone().unwrap_or_default(),
            (Decision::Skip, _) => "up to date".to_string(),
            (_, _) if lock.gated(&st.name).is_some() => {
                format!("gated: {}", lock.gated(&st.name).unwrap_or_default())
            }
            (Decision::Resume, _) => match attempt.map(|a| (a.status, a.exit_code)) {
                Some((RunStatus::Failed, Some(c))) => format!("failed (exit {c}); resumes"),
                _ => "interrupted; resumes".to_string(),
            },
            (Decision::Fresh, None) if attempt.is_none() => "never run".to_string(),
            (Decision::Fresh, _) => format!("stale: {why}"),
        };
        if let (Some(a), Decision::Fresh, None) = (attempt, &d, &running) {
            state.push_str(&format!(
                "; a newer run {} ({})",
                match a.status {
                    RunStatus::Failed => "failed",
                    _ => "was interrupted",
                },
                a.exit_code
                    .map_or("killed".to_string(), |c| format!("exit {c}"))
            ));
        }
        let last = attempt
            .filter(|_| d == Decision::Resume)
            .or(done)
            .or(attempt);
        let (when, took) = match (last, &running) {
            (Some(r), None) => (
                ago(r.started),
                r.duration_s.map_or("-".into(), |d| format!("{d:.1}s")),
            ),
            (_, Some(_)) => (
                attempt.map_or("-".into(), |a| format!("started {}", ago(a.started))),
                "-".into(),
            ),
            (None, None) => ("-".into(), "-".into()),
        };
        rows.push(vec![
            st.name.clone(),
            st.uses.name().to_string(),
            state,
            when,
            took,
            key_metrics(&p.stage_out(&st.name)),
        ]);
    }
    Ok(rows)
}

/// "running: step 40/60 (67 %), 2.1 steps/s, ETA 10s" while a live process holds the stage's
/// attempt folder; None when nothing runs there.
fn running_state(attempt: &std::path::Path) -> Option<String> {
    temper_stage::folder::holder(attempt)?;
    let Some(r) = temper_stage::progress::Running::read(attempt) else {
        return Some("running: starting".into());
    };
    let rate = if r.steps_per_s >= 1.0 {
        format!("{:.1} steps/s", r.steps_per_s)
    } else if r.steps_per_s > 0.0 {
        format!("{:.1} s/step", 1.0 / r.steps_per_s)
    } else {
        "no step yet".into()
    };
    let percent = 100.0 * r.step as f64 / r.total.max(1) as f64;
    let eta = r
        .eta_s
        .map_or(String::new(), |s| format!(", ETA {}", duration(s)));
    Some(format!(
        "running: step {}/{} ({percent:.0} %), {rate}{eta}",
        r.step, r.total
    ))
}

/// `42s`, `3m 05s`, `2h 10m`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

pub const STATUS_HEADER: [&str; 6] = ["stage", "kind", "state", "last run", "took", "metrics"];

pub fn status(p: &Pipeline) -> anyhow::Result<()> {
    let rows = status_rows(p)?;
    println!("pipeline {} ({})", p.name, p.workdir.display());
    table(&STATUS_HEADER, &rows);
    Ok(())
}

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
