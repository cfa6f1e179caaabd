//! `temper status`: per stage its state (up to date, stale and why, running with its step and
//! ETA, failed, interrupted, never run), when it last ran, how long it took and its key
//! numbers; and the plain-text table every terminal view prints with.

use crate::plan::resolve::resolve_all;
use crate::plan::{decide, Decision};
use crate::run::lock::{Lock, RunStatus};
use crate::spec::Pipeline;

/// Short "key value" text of the main numbers in a stage's summary.json.
pub fn key_metrics(out: &std::path::Path) -> String {
    let Ok(text) = std::fs::read_to_string(out.join("summary.json")) else {
        return String::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return String::new();
    };
    const KEYS: [&str; 11] = [
        "loss",
        "ppl",
        "general/ppl",
        "accuracy",
        "margin",
        "reward/mean",
        "kl/mean",
        "vocab_size",
        "chars_per_token",
        "pairs/kept",
        "score/mean",
    ];
    // An evaluation's numbers are per policy: `ppo/win_rate`, `ppo/judge_agreement`,
    // `ppo/afinn_agreement`.
    let per_policy = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.ends_with("/win_rate") || k.ends_with("_agreement"));
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
