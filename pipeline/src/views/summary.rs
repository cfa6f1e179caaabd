//! `temper summary` (also printed at the end of `temper run`): what each stage achieved, one
//! line each in plain words and numbers — held-out loss before → after, the reward model's
//! accuracy, the pairs a labeller made, RL's reward and KL, every policy against the
//! evaluation's baseline under each judge with its KL and length — with ✓ or ✗ for each gate
//! the file states, then where the report is and how to open TensorBoard. It reads only the
//! stages' summary.json and metrics.jsonl, so it says the same thing every time it is asked.

use serde_json::Value as Json;
use temper_stage::StageKind;

use crate::run::lock::{Lock, RunStatus};
use crate::spec::{Pipeline, Stage};
use crate::views::metrics::metric_rows;

/// A number of a JSON object.
fn num(v: &Json, key: &str) -> Option<f64> {
    v.get(key).and_then(Json::as_f64)
}

/// Few significant digits, as a person reads them: 4229, 261, 5.04, 0.812.
fn short(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 1.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

/// The first and the last value of `key` over the rows that have it.
fn first_last(rows: &[&Json], key: &str) -> Option<(f64, f64)> {
    let mut values = rows.iter().filter_map(|r| num(r, key));
    let first = values.next()?;
    Some((first, values.next_back().unwrap_or(first)))
}

/// The mean of `key` over the first and over the last `k` rows that have it (at most a
/// quarter of them): RL's per-batch numbers are noisy, so one batch says little.
fn start_end(rows: &[&Json], key: &str, k: usize) -> Option<(f64, f64)> {
    let values: Vec<f64> = rows.iter().filter_map(|r| num(r, key)).collect();
    if values.is_empty() {
        return None;
    }
    // At most a quarter of the rows each, so the two ends never share a row.
    let k = k.min(values.len() / 4).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Some((mean(&values[..k]), mean(&values[values.len() - k..])))
}

fn arrow((a, b): (f64, f64)) -> String {
    format!("{} → {}", short(a), short(b))
}

fn split<'a>(rows: &'a [Json], name: &str) -> Vec<&'a Json> {
    rows.iter()
        .filter(|r| r.get("split").and_then(Json::as_str) == Some(name))
        .collect()
}

/// Held-out language-model numbers: perplexity per evaluation stream, first → last.
fn language_model(eval: &[&Json]) -> Vec<String> {
    let mut keys: Vec<&str> = eval
        .iter()
        .flat_map(|r| r.as_object().into_iter().flatten().map(|(k, _)| k.as_str()))
        .filter(|k| *k == "ppl" || k.ends_with("/ppl"))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys.iter()
        .filter_map(|k| {
            let name = k.strip_suffix("/ppl").unwrap_or("held-out");
            first_last(eval, k).map(|fl| format!("{name} perplexity {}", arrow(fl)))
        })
        .collect()
}

/// The parts of a reward model's line: accuracy before → after on each held-out set.
fn reward_model(eval: &[&Json], summary: &Json) -> Vec<String> {
    let mut parts = Vec::new();
    if let Some(fl) = first_last(eval, "accuracy") {
        let mut s = format!("held-out pair accuracy {}", arrow(fl));
        let groups: Vec<String> = summary
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                let g = k.strip_prefix("accuracy/")?;
                Some(format!("{g} {}", short(v.as_f64()?)))
            })
            .collect();
        if !groups.is_empty() {
            s.push_str(&format!(" ({})", groups.join(", ")));
        }
        parts.push(s);
    }
    for (k, v) in summary.as_object().into_iter().flatten() {
        if let (Some(set), Some(x)) = (k.strip_suffix("/accuracy"), v.as_f64()) {
            parts.push(format!("{set} pairs {}", short(x)));
        }
    }
    parts
}

/// The evaluation's lines: each policy against the baseline under each judge, with KL and
/// reply length; a judge a policy trained on is marked †.
fn evaluation(st: &Stage, summary: &Json) -> Vec<String> {
    let baseline = st
        .params
        .get("baseline")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let trained_on = |policy: &str, judge: &str| {
        st.params
            .get("trained_on")
            .and_then(|t| t.get(policy))
            .and_then(|v| v.as_sequence())
            .is_some_and(|seen| seen.iter().any(|s| s.as_str() == Some(judge)))
    };
    let keys: Vec<&String> = summary
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    let mut policies: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.strip_suffix("/len"))
        .filter(|n| *n != baseline)
        .collect();
    policies.dedup();
    let judges: Vec<&str> = keys
        .iter()
        .filter_map(|k| {
            k.strip_prefix(&format!("{baseline}/"))?
                .strip_suffix("_agreement")
        })
        .collect();
    let mut out = Vec::new();
    for policy in policies {
        let get = |m: &str| num(summary, &format!("{policy}/{m}"));
        let base = |m: &str| num(summary, &format!("{baseline}/{m}"));
        let mut parts = Vec::new();
        for judge in &judges {
            let key = format!("{judge}_agreement");
            let (Some(b), Some(x)) = (base(&key), get(&key)) else {
                continue;
            };
            let dagger = if trained_on(policy, judge) { "†" } else { "" };
            let by_sentiment: Vec<String> = ["positive", "negative"]
                .iter()
                .filter_map(|s| {
                    let (b, x) = (base(&format!("{key}/{s}"))?, get(&format!("{key}/{s}"))?);
                    Some(format!("{s} {:+.0}", 100.0 * (x - b)))
                })
                .collect();
            parts.push(format!(
                "{judge}{dagger} agreement {} → {} ({:+.0} pts{})",
                short(b),
                short(x),
                100.0 * (x - b),
                if by_sentiment.is_empty() {
                    String::new()
                } else {
                    format!("; {}", by_sentiment.join(", "))
                }
            ));
        }
        if let Some(w) = get("win_rate") {
            parts.push(format!("RM win-rate {}", short(w)));
        }
        if let Some(kl) = get("kl") {
            parts.push(format!("KL {}", short(kl)));
        }
        if let (Some(b), Some(x)) = (base("len"), get("len")) {
            let change = if b > 0.0 { 100.0 * (x / b - 1.0) } else { 0.0 };
            parts.push(format!(
                "length {} → {} ({change:+.0} %)",
                short(b),
                short(x)
            ));
        }
        out.push(format!("{policy} vs {baseline}: {}", parts.join(", ")));
    }
    out
}

/// The line of one stage that has finished, from its numbers.
fn achieved(p: &Pipeline, st: &Stage, summary: &Json) -> Vec<String> {
    let rows = metric_rows(p, &st.name);
    let (eval, train) = (split(&rows, "eval"), split(&rows, "train"));
    let parts: Vec<String> = match st.uses {
        StageKind::Tokenizer => vec![format!(
            "vocabulary {}, {} characters per token",
            num(summary, "vocab_size").map_or("-".into(), |v| format!("{v:.0}")),
            num(summary, "chars_per_token").map_or("-".into(), short)
        )],
        StageKind::Pretrain => language_model(&eval),
        StageKind::Sft => first_last(&eval, "loss")
            .map(|fl| format!("held-out reply loss {}", arrow(fl)))
            .into_iter()
            .collect(),
        StageKind::Reward => reward_model(&eval, summary),
        StageKind::Label => {
            let mut v = vec![format!(
                "{} pairs and {} best-of-n rows from {} replies, labeller mean {}",
                num(summary, "pairs/kept").unwrap_or(0.0),
                num(summary, "best_of_n/kept").unwrap_or(0.0),
                num(summary, "replies").unwrap_or(0.0),
                num(summary, "score/mean").map_or("-".into(), short)
            )];
            if let (Some(c), Some(r)) = (
                num(summary, "len/chosen/mean"),
                num(summary, "len/rejected/mean"),
            ) {
                v.push(format!(
                    "chosen {} vs rejected {} tokens",
                    short(c),
                    short(r)
                ));
            }
            v
        }
        StageKind::Ppo | StageKind::Grpo => {
            let mut v = Vec::new();
            if let Some(se) = start_end(&train, "reward/mean", 5) {
                v.push(format!("reward {} (first → last iterations)", arrow(se)));
            }
            if let Some(kl) = num(summary, "kl/mean") {
                v.push(format!("KL {}", short(kl)));
            }
            if let Some(se) = start_end(&train, "response/len_mean", 5) {
                v.push(format!("reply length {}", arrow(se)));
            }
            v
        }
        // Before the first update the implicit reward is 0 on both sides (no pair ranked), so
        // only the last evaluation says anything.
        StageKind::Dpo => [
            ("rewards/accuracies", "held-out implicit-reward accuracy"),
            ("rewards/margins", "margin"),
            ("kl_to_reference", "KL to the reference"),
        ]
        .iter()
        .filter_map(|(k, name)| {
            let (_, last) = first_last(&eval, k)?;
            Some(format!("{name} {}", short(last)))
        })
        .collect(),
        StageKind::Merge => vec!["adapter merged into its base".into()],
        StageKind::Eval => return evaluation(st, summary),
    };
    // Without held-out data, the training loss says at least whether it learned.
    let parts = match (parts.is_empty(), start_end(&train, "loss", 5)) {
        (true, Some(se)) => vec![format!("training loss {} (first → last logs)", arrow(se))],
        _ => parts,
    };
    if parts.is_empty() {
        vec!["done".into()]
    } else {
        vec![parts.join(", ")]
    }
}

/// ✓ or ✗ for each of the stage's gates, on its parent's summary as it is now.
fn gates(p: &Pipeline, st: &Stage) -> String {
    st.gates
        .iter()
        .map(|g| {
            let summary = std::fs::read_to_string(p.stage_out(&g.stage).join("summary.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Json>(&t).ok());
            match g.check(summary.as_ref()) {
                Ok(()) => format!(" ✓ {g}"),
                Err(why) => format!(" ✗ {why}"),
            }
        })
        .collect()
}

/// Every stage's lines, in the order the stages run.
pub fn lines(p: &Pipeline) -> Vec<String> {
    let lock = Lock::load(&p.workdir).unwrap_or_default();
    let mut out = Vec::new();
    for st in p.topo_order() {
        let summary = std::fs::read_to_string(p.stage_out(&st.name).join("summary.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Json>(&t).ok());
        let text = match (&summary, lock.gated(&st.name)) {
            (_, Some(why)) => vec![format!("⊘ gated: {why}")],
            (Some(s), None) => achieved(p, st, s),
            (None, None) => match lock.attempt(&st.name).map(|a| a.status) {
                Some(RunStatus::Failed) => vec!["✗ failed: see its log".into()],
                _ => vec!["not run".into()],
            },
        };
        let gate_marks = if summary.is_some() {
            gates(p, st)
        } else {
            String::new()
        };
        for (i, t) in text.iter().enumerate() {
            let head = if i == 0 { st.name.as_str() } else { "" };
            let marks = if i == 0 { gate_marks.as_str() } else { "" };
            out.push(format!("{head:<16} {t}{marks}"));
        }
    }
    out
}

/// The lines, then where to look next.
pub fn print(p: &Pipeline, file: &std::path::Path) {
    println!("What each stage achieved ({}):", p.name);
    for l in lines(p) {
        println!("  {l}");
    }
    println!(
        "Report: temper report {} → {}; TensorBoard: temper tensorboard {} prints the command.",
        file.display(),
        p.workdir.join("report.html").display(),
        file.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_policy_against_the_baseline_under_each_judge_with_kl_and_length() {
        let st = Stage {
            name: "eval".into(),
            group: "eval".into(),
            uses: StageKind::Eval,
            params: serde_yaml::from_str("{baseline: sft, trained_on: {ppo: [vader]}}").unwrap(),
            parents: Default::default(),
            matrix: Vec::new(),
            gates: Vec::new(),
            resources: Default::default(),
        };
        let summary = json!({
            "sft/len": 20.0, "sft/kl": 0.0,
            "sft/afinn_agreement": 0.25, "sft/afinn_agreement/positive": 0.40,
            "sft/afinn_agreement/negative": 0.10, "sft/vader_agreement": 0.30,
            "ppo/len": 15.0, "ppo/kl": 4.5, "ppo/win_rate": 0.7,
            "ppo/afinn_agreement": 0.45, "ppo/afinn_agreement/positive": 0.55,
            "ppo/afinn_agreement/negative": 0.35, "ppo/vader_agreement": 0.60,
        });
        let lines = evaluation(&st, &summary);
        assert_eq!(
            lines,
            [
                "ppo vs sft: afinn agreement 0.250 → 0.450 (+20 pts; positive +15, negative +25), \
              vader† agreement 0.300 → 0.600 (+30 pts), RM win-rate 0.700, KL 4.50, \
              length 20.0 → 15.0 (-25 %)"
            ]
        );
    }

    #[test]
    fn noisy_series_are_read_at_their_ends_without_overlap() {
        let rows: Vec<Json> = (0..8).map(|i| json!({"reward/mean": i as f64})).collect();
        let refs: Vec<&Json> = rows.iter().collect();
        // 8 rows: a quarter is 2 at each end: (0 + 1) / 2 and (6 + 7) / 2.
        assert_eq!(start_end(&refs, "reward/mean", 5), Some((0.5, 6.5)));
        assert_eq!(start_end(&refs[..2], "reward/mean", 5), Some((0.0, 1.0)));
        assert_eq!(start_end(&refs, "missing", 5), None);
        assert_eq!(first_last(&refs, "reward/mean"), Some((0.0, 7.0)));
        assert_eq!(short(4228.75), "4229");
        assert_eq!(short(0.8123), "0.812");
    }
}
