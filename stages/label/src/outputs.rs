//! What the stage writes when every reply is labelled: `replies.jsonl` (every reply, its
//! score and each labeller's part), `pairs.jsonl` (the reward/DPO format: `prompt`, `chosen`,
//! `rejected`, both scores, the margin, and the prompt's other fields), `best_of_n.jsonl` (SFT
//! rows in `messages` form with the best reply and its score), and `report.md` (the numbers and
//! histograms of the scores and margins). Each file is written whole and renamed into place.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Map, Value};
use temper_core::chat_model::Prompts;
use temper_data::{Message, PromptRecord, Role};
use temper_stage::atomic::write_atomic;
use temper_stage::{invalid, ConfigFile, StageError};

use crate::config::Config;
use crate::select::{best, describe, histogram, pairs, Dropped, Labelled};

/// The numbers logged and summarised, and the sample records shown by `temper report`.
pub struct Written {
    pub fields: Vec<(String, f64)>,
    pub samples: Vec<Value>,
}

/// Pairs shown as samples.
const SHOWN: usize = 8;

pub fn write(
    out: &Path,
    cfg: &ConfigFile<Config>,
    prompts: &Prompts,
    labelled: &[Labelled],
) -> Result<Written, StageError> {
    let c = &cfg.value;
    let mut groups: Vec<Vec<Labelled>> = vec![Vec::new(); prompts.len()];
    for r in labelled {
        groups[r.prompt].push(r.clone());
    }
    let (mut pair_rows, mut best_rows, mut reply_rows) = (Vec::new(), Vec::new(), Vec::new());
    let mut dropped = Dropped::default();
    let (mut margins, mut chosen_len, mut rejected_len, mut best_scores) =
        (vec![], vec![], vec![], vec![]);
    for (i, group) in groups.iter().enumerate() {
        let record = &prompts[i].1;
        for r in group {
            reply_rows.push(reply_row(record, r));
        }
        let (kept, d) = pairs(group, c.pairs, c.min_margin);
        dropped.add(d);
        for p in kept {
            let (ch, rj) = (&group[p.chosen], &group[p.rejected]);
            margins.push(p.margin);
            chosen_len.push(ch.tokens as f64);
            rejected_len.push(rj.tokens as f64);
            pair_rows.push(pair_row(record, ch, rj));
        }
        if let Some(b) = best(group, c.best_min_score) {
            best_scores.push(group[b].score);
            best_rows.push(best_row(record, &group[b]));
        }
    }
    for (name, rows) in [
        ("replies.jsonl", &reply_rows),
        ("pairs.jsonl", &pair_rows),
        ("best_of_n.jsonl", &best_rows),
    ] {
        write_atomic(&out.join(name), jsonl(rows).as_bytes()).map_err(invalid)?;
    }
    let scores: Vec<f64> = labelled.iter().map(|r| r.score).collect();
    let mut fields: Vec<(String, f64)> = vec![
        ("pairs/kept".into(), pair_rows.len() as f64),
        ("pairs/dropped_ties".into(), dropped.ties as f64),
        ("pairs/dropped_margin".into(), dropped.below_margin as f64),
        ("pairs/dropped_same_text".into(), dropped.same_text as f64),
        ("best_of_n/kept".into(), best_rows.len() as f64),
    ];
    let described = [
        ("score", &scores),
        ("margin", &margins),
        ("len/chosen", &chosen_len),
        ("len/rejected", &rejected_len),
        ("best_of_n/score", &best_scores),
    ];
    for (prefix, values) in described {
        if let Some(d) = describe(values) {
            let wanted = |k: &str| prefix.starts_with("score") || prefix == "margin" || k == "mean";
            fields.extend(
                d.fields(prefix)
                    .into_iter()
                    .filter(|(k, _)| wanted(k.rsplit('/').next().unwrap_or(""))),
            );
        }
    }
    let report = report_md(c, &fields, &scores, &margins);
    write_atomic(&out.join("report.md"), report.as_bytes()).map_err(invalid)?;
    let samples = pair_rows
        .iter()
        .take(SHOWN)
        .map(|r| {
            let mut r = r.clone();
            r["step"] = json!(0);
            r
        })
        .collect();
    Ok(Written { fields, samples })
}

fn jsonl(rows: &[Value]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

/// The prompt as the data readers take it back: a string for one user turn, else the turns.
fn prompt_value(record: &PromptRecord) -> Value {
    match record.messages.as_slice() {
        [Message {
            role: Role::User,
            content,
        }] => json!(content),
        turns => json!(turns),
    }
}

/// The prompt's own fields first, then ours (which win a clash of names).
fn row(record: &PromptRecord, ours: Value) -> Value {
    let mut m: Map<String, Value> = record.meta.clone().into_iter().collect();
    if let Value::Object(o) = ours {
        m.extend(o);
    }
    Value::Object(m)
}

fn reply_row(record: &PromptRecord, r: &Labelled) -> Value {
    let mut ours = json!({
        "prompt": prompt_value(record),
        "prompt_index": r.prompt,
        "sample": r.sample,
        "reply": r.text,
        "score": r.score,
        "tokens": r.tokens,
        "eos": r.eos,
    });
    for (name, v) in &r.parts {
        ours[format!("score/{name}")] = json!(v);
    }
    row(record, ours)
}

fn pair_row(record: &PromptRecord, chosen: &Labelled, rejected: &Labelled) -> Value {
    row(
        record,
        json!({
            "prompt": prompt_value(record),
            "chosen": chosen.text,
            "rejected": rejected.text,
            "chosen_score": chosen.score,
            "rejected_score": rejected.score,
            "margin": chosen.score - rejected.score,
        }),
    )
}

fn best_row(record: &PromptRecord, best: &Labelled) -> Value {
    let mut messages = record.messages.clone();
    messages.push(Message::new(Role::Assistant, best.text.clone()));
    row(record, json!({"messages": messages, "score": best.score}))
}

/// The numbers as a table, then the histograms of scores and margins.
fn report_md(c: &Config, fields: &[(String, f64)], scores: &[f64], margins: &[f64]) -> String {
    let mut s = format!(
        "# Labelled replies ({} per prompt, pairs: {}, min_margin {})\n\n| metric | value |\n|---|---|\n",
        c.num_generations,
        c.pairs.name(),
        c.min_margin
    );
    for (k, v) in fields {
        let _ = writeln!(s, "| {k} | {v:.4} |");
    }
    for (title, values) in [("Scores", scores), ("Margins of kept pairs", margins)] {
        let _ = writeln!(s, "\n## {title}\n\n```");
        let (edges, counts) = histogram(values, 10);
        let most = counts.iter().copied().max().unwrap_or(1).max(1);
        for (e, n) in edges.iter().zip(&counts) {
            let bar = "#".repeat((n * 40).div_ceil(most));
            let _ = writeln!(s, "{e:>9.3} | {bar} {n}");
        }
        s.push_str("```\n");
    }
    s
}
