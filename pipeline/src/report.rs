//! Read-only views of a pipeline: `validate`, `status`, `metrics` and `dag` (`report` is in
//! html.rs).

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value as Json;

use crate::exec::key_metrics;
use crate::hash::HashCache;
use crate::plan::{resolve, staleness, Decision, Lock};
use crate::schema::{references, strings, Pipeline};

/// Runs each stage's own `--validate` on its resolved config, where its inputs exist yet.
/// Returns the problems found (one line each).
pub fn validate_stages(p: &Pipeline) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut cache = HashCache::new();
    let mut keys = std::collections::BTreeMap::new();
    let scratch = tempdir()?;
    for st in p.topo_order() {
        let r = match resolve(st, p, &keys, &mut cache) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{e:#}"));
                continue;
            }
        };
        keys.insert(st.name.clone(), r.key.clone());
        let mut refs = Vec::new();
        strings(&serde_yaml::Value::Mapping(st.params.clone()), &mut refs);
        let waiting: BTreeSet<String> = refs
            .iter()
            .flat_map(|s| references(s))
            .filter(|(stage, field)| {
                let out = p.stage_out(stage);
                !(if field == "checkpoint" {
                    out.join("checkpoint")
                } else {
                    out
                })
                .exists()
            })
            .map(|(stage, _)| stage)
            .collect();
        if !waiting.is_empty() {
            println!(
                "{}: config parsed; inputs checked when {} has run",
                st.name,
                waiting.into_iter().collect::<Vec<_>>().join(", ")
            );
            continue;
        }
        let cfg = scratch.join(format!("{}.yaml", st.name));
        std::fs::write(&cfg, serde_yaml::to_string(&r.config)?)?;
        let out = Command::new(&r.binary)
            .arg("--validate")
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(scratch.join(&st.name))
            .env("TEMPER_LOG", "error")
            .output()?;
        if out.status.success() {
            println!("{}: ok", st.name);
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed without a message");
            problems.push(format!(
                "stage `{}`: {}",
                st.name,
                line.replace(
                    &cfg.display().to_string(),
                    &format!("{}: stage {}", p.file.display(), st.name)
                )
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(problems)
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("temper-validate-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
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
fn table(header: &[&str], rows: &[Vec<String>]) {
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
    let mut keys = std::collections::BTreeMap::new();
    let mut rows = Vec::new();
    for st in p.topo_order() {
        let r = resolve(st, p, &keys, &mut cache)?;
        keys.insert(st.name.clone(), r.key.clone());
        let rec = lock.stages.get(&st.name);
        let (d, why) = staleness(&r, rec, p, &lock, &mut cache);
        let state = match (rec.map(|r| r.status.as_str()), &d) {
            (None, _) => "never run".to_string(),
            (Some("failed"), Decision::Resume) => format!(
                "failed (exit {}); resumes",
                rec.and_then(|r| r.exit_code)
                    .map_or("?".into(), |c| c.to_string())
            ),
            (Some("running"), Decision::Resume) => "interrupted; resumes".to_string(),
            (_, Decision::Skip) => "up to date".to_string(),
            _ => format!("stale: {why}"),
        };
        let (when, took) = match rec {
            Some(r) => (
                ago(r.started),
                r.duration_s.map_or("-".into(), |d| format!("{d:.1}s")),
            ),
            None => ("-".into(), "-".into()),
        };
        rows.push(vec![
            st.name.clone(),
            st.uses.clone(),
            state,
            when,
            took,
            key_metrics(&p.stage_out(&st.name)),
        ]);
    }
    Ok(rows)
}

pub const STATUS_HEADER: [&str; 6] = ["stage", "kind", "state", "last run", "took", "metrics"];

pub fn status(p: &Pipeline) -> anyhow::Result<()> {
    let rows = status_rows(p)?;
    println!("pipeline {} ({})", p.name, p.workdir.display());
    table(&STATUS_HEADER, &rows);
    Ok(())
}

/// The rows of a stage's metrics.jsonl (unreadable lines skipped); empty when it has none.
pub fn metric_rows(p: &Pipeline, stage: &str) -> Vec<Json> {
    let path = p.stage_out(stage).join("metrics.jsonl");
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn metrics(
    p: &Pipeline,
    stage: Option<&str>,
    split: &str,
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
        let mut rows: Vec<Json> = metric_rows(p, &name)
            .into_iter()
            .filter(|r| split == "all" || r["split"] == split)
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
        if split == "all" {
            cols.insert(1, "split".into());
        }
        println!("\n{name} ({split})");
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

pub fn dag(p: &Pipeline, format: &str) {
    match format {
        "dot" => {
            println!("digraph \"{}\" {{\n  rankdir=LR;", p.name);
            for s in &p.stages {
                println!("  \"{}\" [label=\"{}\\n({})\"];", s.name, s.name, s.uses);
                for parent in &s.parents {
                    println!("  \"{parent}\" -> \"{}\";", s.name);
                }
            }
            println!("}}");
        }
        _ => {
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
