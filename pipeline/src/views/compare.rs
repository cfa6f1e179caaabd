//! `temper compare`: the branches of each swept stage side by side — every final number of
//! their summaries as mean ± sample standard deviation over the branches, and each branch's
//! value — so a result is read as a distribution over seeds, not one run.

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};

use crate::spec::Pipeline;

/// Summary keys that describe the run rather than its result (throughput, `tokens_per_s`, is a
/// result: a sweep over PEFT methods or batch sizes compares it).
const BOOKKEEPING: [&str; 3] = ["wall_time_s", "status", "data"];

pub struct MetricRow {
    pub metric: String,
    /// One per branch, in branch order; None where a branch lacks it (or has not run).
    pub values: Vec<Option<f64>>,
}

impl MetricRow {
    /// (mean, sample std, n) over the branches that report it.
    pub fn stats(&self) -> (f64, f64, usize) {
        let xs: Vec<f64> = self.values.iter().flatten().copied().collect();
        mean_std(&xs)
    }
}

/// Mean and sample standard deviation (n − 1; 0 for a single value).
pub fn mean_std(xs: &[f64]) -> (f64, f64, usize) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, 0);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    (mean, var.sqrt(), n)
}

/// A swept stage: its branches (label like `seed=1`, stage name) and their numbers.
pub struct Group {
    pub name: String,
    pub branches: Vec<(String, String)>,
    pub rows: Vec<MetricRow>,
}

impl Group {
    /// The table's header and rows: each metric, its mean ± std over the branches, and each
    /// branch's value (`-` where it has none).
    pub fn table(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let mut header = vec!["metric".to_string(), "mean ± std".to_string()];
        header.extend(self.branches.iter().map(|(l, _)| l.clone()));
        let rows = self
            .rows
            .iter()
            .map(|r| {
                let (mean, std, n) = r.stats();
                let mut row = vec![
                    r.metric.clone(),
                    format!("{} ± {} (n={n})", fmt(mean), fmt(std)),
                ];
                row.extend(r.values.iter().map(|v| v.map_or("-".into(), fmt)));
                row
            })
            .collect();
        (header, rows)
    }
}

/// A branch's column title: its name after the `@` (`seed=1`, `peft=lora+r16`), one line
/// whatever the swept values are (a mapping renders as `lora+r16`, not as YAML).
fn label(stage_name: &str) -> String {
    stage_name
        .split_once('@')
        .map_or(stage_name, |(_, b)| b)
        .to_string()
}

/// Every stage written once in the file but run as several branches.
pub fn groups(p: &Pipeline) -> Vec<Group> {
    let mut by_group: BTreeMap<&str, Vec<&crate::spec::Stage>> = BTreeMap::new();
    for st in p.topo_order() {
        by_group.entry(st.group.as_str()).or_default().push(st);
    }
    let order: Vec<&str> = p.topo_order().iter().map(|s| s.group.as_str()).collect();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for g in order {
        if seen.contains(&g) {
            continue;
        }
        seen.push(g);
        let stages = &by_group[g];
        if stages.len() < 2 {
            continue;
        }
        let summaries: Vec<Option<Json>> = stages
            .iter()
            .map(|s| {
                std::fs::read_to_string(p.stage_out(&s.name).join("summary.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
            })
            .collect();
        let mut metrics: Vec<String> = Vec::new();
        for s in summaries.iter().flatten() {
            for (k, v) in s.as_object().into_iter().flatten() {
                if v.is_number() && !BOOKKEEPING.contains(&k.as_str()) && !metrics.contains(k) {
                    metrics.push(k.clone());
                }
            }
        }
        let rows = metrics
            .into_iter()
            .map(|m| MetricRow {
                values: summaries
                    .iter()
                    .map(|s| s.as_ref().and_then(|s| s.get(&m)).and_then(Json::as_f64))
                    .collect(),
                metric: m,
            })
            .collect();
        out.push(Group {
            name: g.to_string(),
            branches: stages
                .iter()
                .map(|s| (label(&s.name), s.name.clone()))
                .collect(),
            rows,
        });
    }
    out
}

pub fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.4}")
    }
}

/// Prints every group as a table (or one JSON object per group).
pub fn print(p: &Pipeline, as_json: bool) {
    let groups = groups(p);
    if groups.is_empty() && !as_json {
        println!(
            "{}: no swept stages (add `matrix:` to a stage)",
            p.file.display()
        );
    }
    for g in groups {
        if as_json {
            let metrics: serde_json::Map<String, Json> = g
                .rows
                .iter()
                .map(|r| {
                    let (mean, std, n) = r.stats();
                    (
                        r.metric.clone(),
                        json!({"mean": mean, "std": std, "n": n, "values": r.values}),
                    )
                })
                .collect();
            let branches: Vec<&String> = g.branches.iter().map(|(l, _)| l).collect();
            println!(
                "{}",
                json!({"stage": g.name, "branches": branches, "metrics": metrics})
            );
            continue;
        }
        println!("\n{} ({} branches)", g.name, g.branches.len());
        let (header, rows) = g.table();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        crate::views::status::table(&header, &rows);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn branch_titles_are_the_names_after_the_at() {
        assert_eq!(super::label("reward@seed=1"), "seed=1");
        assert_eq!(super::label("sft@peft=lora+r16+dora"), "peft=lora+r16+dora");
        assert_eq!(super::label("plain"), "plain");
    }

    #[test]
    fn mean_and_sample_std_by_hand() {
        // 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; / 2 = 7/3.
        let (m, s, n) = super::mean_std(&[1.0, 2.0, 4.0]);
        assert!(
            (m - 7.0 / 3.0).abs() < 1e-12 && (s - (7.0f64 / 3.0).sqrt()).abs() < 1e-12 && n == 3
        );
        assert_eq!(super::mean_std(&[5.0]), (5.0, 0.0, 1));
    }
}
