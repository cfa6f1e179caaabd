//! temper-eval: compares policies (SFT, PPO, DPO, …) on held-out prompts. Every policy answers
//! every prompt with the same seeds; each reply is scored by the reward model, by its KL to the
//! reference, and by judges the pipeline never trained (VADER, AFINN-165, a user's command).
//! Per policy it reports the RM score, the win-rate over the baseline, KL, reply length, EOS
//! rate, distinct-1/2 and each judge's agreement with the wanted sentiment (overall and per
//! sentiment) — the numbers that tell a real gain from reward hacking — and marks the signals
//! each policy's training saw (`trained_on`). Writes report.json,
//! report.md (a table and side-by-side samples), samples.jsonl, metrics.jsonl, summary.json.
//! It trains nothing, so it writes no checkpoint/.

mod best_of;
mod config;
mod exact;
mod judges;
mod measures;
mod setup;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::reward_set::{ReplyBatch, RewardSet};
use temper_core::sample::{generate, Generation, SamplingConfig};
use temper_core::scoring::{decode_replies, response_logprobs, reward_scores};
use temper_core::{load_checkpoint, with_autocast, LoadSpec, Transformer};
use temper_data::{seeds_for, PromptRecord};
use temper_stage::{
    checked_config, invalid, MetricsLog, StageArgs, StageError, StageFolder, StageKind,
};

use crate::best_of::Draw;
use crate::config::{check, Config};
use crate::measures::{policy_metrics, Replies};
use crate::setup::{prepare, Setup};

fn main() {
    temper_stage::stage_main(
        "temper-eval",
        "Compare policies (SFT, PPO, DPO, …) on held-out prompts: reward-model score, win-rate, KL, length, EOS rate, distinct-n and an independent judge.",
        run,
    )
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Eval, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    temper_core::dist::World::require_single("eval").map_err(invalid)?;
    let s = prepare(&cfg)?;
    if args.validate {
        return cfg.print_resolved();
    }
    let c = &cfg.value;
    let folder = StageFolder::claim(&args.out, "eval")?;
    let mut log = MetricsLog::open(&folder.path)?;
    log.reset()?;
    cfg.write_resolved(&folder.path)?;

    let device = s.reference.device();
    let mut replies = BTreeMap::new();
    let mut exact_metrics = BTreeMap::new();
    for (name, dir) in &c.policies {
        let (_vs, model) = load_checkpoint(dir, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
        tracing::info!("{name}: answering {} prompts", s.prompts.len());
        replies.insert(name.clone(), answer(&s, &model, c, 0, None)?.replies);
        if let Some(e) = &s.exact {
            tracing::info!("{name}: exact match, greedy and pass@{}", e.k);
            exact_metrics.insert(name.clone(), e.measure(&s, &model, c)?);
        }
    }
    let mut summary = temper_stage::Summary::new();
    if let (Some(b), Some(labeller)) = (&c.best_of, &s.labeller) {
        let name = b.row_name();
        tracing::info!("{name}: the reference's best of {} replies per prompt", b.n);
        let draws = (0..b.n as u64)
            .map(|k| answer(&s, &s.reference, c, k, Some(labeller)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (best, label_mean) = best_of::select(b, &draws);
        summary.insert(format!("{name}/label_mean"), json!(label_mean));
        summary.insert(
            format!("{name}/label_mean_one"),
            json!(measures::mean(&draws[0].labels)),
        );
        replies.insert(name, best);
    }
    let base = &replies[&c.baseline];
    summary.insert("prompts".into(), s.prompts.len().into());
    let judges: Vec<(&str, f64)> = s.judges.iter().map(|j| (j.name.as_str(), j.band)).collect();
    for name in &order(c) {
        let r = &replies[name];
        let baseline = (name != &c.baseline).then_some(base);
        for (k, v) in policy_metrics(name, r, baseline, &s.labels, &judges) {
            summary.insert(k, json!(v));
        }
        for (k, v) in exact_metrics.get(name).into_iter().flatten() {
            summary.insert(format!("{name}/{k}"), json!(v));
        }
    }
    let fields: Vec<(&str, f64)> = summary
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.as_str(), x)))
        .collect();
    log.log_eval(0, &fields)?;
    let records = sample_records(&s, c, &replies);
    log.log_samples(&records)?;
    temper_stage::atomic::write_json(
        &folder.path.join("report.json"),
        &json!({"summary": summary, "samples": records, "trained_on": c.trained_on}),
    )?;
    temper_stage::atomic::write_atomic(
        &folder.path.join("report.md"),
        report_md(c, &summary, &records).as_bytes(),
    )?;
    log.write_summary("ok", summary)?;
    Ok(())
}

/// The baseline first, then the other policies in name order, then the best-of row.
fn order(c: &Config) -> Vec<String> {
    std::iter::once(&c.baseline)
        .chain(c.policies.keys().filter(|k| **k != c.baseline))
        .cloned()
        .chain(c.best_of.as_ref().map(|b| b.row_name()))
        .collect()
}

/// One policy's replies to every prompt, scored, and the labeller's value of each when one is
/// given. Draw `k`'s seeds are the same for every policy; draw 0 is what the policy rows use.
fn answer(
    s: &Setup,
    model: &Transformer,
    c: &Config,
    draw: u64,
    labeller: Option<&RewardSet>,
) -> anyhow::Result<Draw> {
    let sampling = SamplingConfig {
        top_p: c.top_p,
        ..SamplingConfig::chat(&s.template, c.max_new_tokens, c.temperature)
    };
    let ids: Vec<Vec<i64>> = s
        .prompts
        .iter()
        .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
        .collect();
    let seeds = seeds_for(c.seed, "eval", draw, ids.len());
    let mut labels = Vec::new();
    let mut out = Replies {
        text: vec![],
        tokens: vec![],
        scores: vec![],
        kl: vec![],
        eos: vec![],
        judges: vec![Vec::new(); s.judges.len()],
    };
    let batches = ids
        .chunks(c.batch_size)
        .zip(seeds.chunks(c.batch_size))
        .zip(s.signs.chunks(c.batch_size));
    for (b, ((chunk, chunk_seeds), signs)) in batches.enumerate() {
        let g = with_autocast(model.device(), c.precision, || {
            generate(model, chunk, &sampling, chunk_seeds)
        })??;
        let (scores, kl) = score(s, model, &g, c)?;
        if let Some(l) = labeller {
            labels.extend(label(s, l, &g, b * c.batch_size)?);
        }
        // The reward the policies were trained on: the score times the prompt's sign.
        let scores = Vec::<f64>::try_from(scores.to_kind(Kind::Double))?;
        out.scores
            .extend(scores.iter().zip(signs).map(|(x, sign)| x * sign));
        out.kl
            .extend(Vec::<f64>::try_from(kl.to_kind(Kind::Double))?);
        let replies = decode_replies(&s.tok, &g.tokens, &g.mask, &s.template.stop_ids())?;
        for (i, r) in replies.into_iter().enumerate() {
            let (prompt, record) = &s.prompts[b * c.batch_size + i];
            let tokens = r.ids.len() + usize::from(r.ended_with_eos);
            if !s.judges.is_empty() {
                let prompt = s.tok.decode(prompt)?;
                for (j, values) in s.judges.iter().zip(&mut out.judges) {
                    values.push(j.score(&prompt, &r.text, tokens, &record.meta)?);
                }
            }
            out.tokens.push(tokens);
            out.eos.push(r.ended_with_eos);
            out.text.push(r.text);
        }
    }
    Ok(Draw {
        replies: out,
        labels,
    })
}

/// The labeller's totals for one generated batch whose first prompt is `first`.
fn label(
    s: &Setup,
    labeller: &RewardSet,
    g: &Generation,
    first: usize,
) -> anyhow::Result<Vec<f64>> {
    let joined = g.joined();
    let batch = ReplyBatch {
        joined: &joined,
        prompt: &g.prompt,
        prompt_mask: &g.prompt_mask,
        tokens: &g.tokens,
        mask: &g.mask,
    };
    let records: Vec<&PromptRecord> = s.prompts[first..first + g.tokens.size()[0] as usize]
        .iter()
        .map(|(_, r)| r)
        .collect();
    let stops = s.template.stop_ids();
    Ok(labeller.score(&records, &batch, &s.tok, &stops)?.totals)
}

/// Reward-model scores (B,) and KL to the reference (B,) of one generated batch.
fn score(
    s: &Setup,
    model: &Transformer,
    g: &Generation,
    c: &Config,
) -> anyhow::Result<(Tensor, Tensor)> {
    let joined = g.joined();
    let p = g.prompt.size()[1];
    let mask = g.mask.to_kind(Kind::Float);
    tch::no_grad(|| {
        with_autocast(
            model.device(),
            c.precision,
            || -> anyhow::Result<(Tensor, Tensor)> {
                let scores = match &s.reward {
                    Some(rm) => reward_scores(rm, &joined)?,
                    None => Tensor::zeros([0], (Kind::Float, joined.seq.device())),
                };
                let lp = |m: &Transformer| -> anyhow::Result<Tensor> {
                    Ok(response_logprobs(
                        m,
                        &joined.seq,
                        &joined.attention,
                        p,
                        &g.tokens,
                        c.temperature,
                    )?
                    .0)
                };
                let kl = ((lp(model)? - lp(&s.reference)?) * &mask).sum_dim_intlist(
                    1,
                    false,
                    Kind::Float,
                );
                Ok((scores, kl))
            },
        )?
    })
}

/// Whether policy `n`'s training saw the signal metric `m` measures: a judge it names in
/// `trained_on` (its mean, agreement and correlation rows), or the reward model (score,
/// win-rate).
fn saw(c: &Config, n: &str, m: &str) -> bool {
    c.trained_on.get(n).is_some_and(|seen| {
        seen.iter().any(|j| match j.as_str() {
            "reward_model" => m == "score" || m == "win_rate",
            judge => m.starts_with(&format!("{judge}_")) || m == format!("rm_{judge}_corr"),
        })
    })
}

/// One record per prompt: the prompt, its label, and each policy's reply, score and verdict.
fn sample_records(
    s: &Setup,
    c: &Config,
    replies: &BTreeMap<String, Replies>,
) -> Vec<serde_json::Value> {
    (0..s.prompts.len())
        .map(|i| {
            let mut r = serde_json::Map::new();
            r.insert("step".into(), 0.into());
            r.insert(
                "prompt".into(),
                s.tok.decode(&s.prompts[i].0).unwrap_or_default().into(),
            );
            r.insert("label".into(), json!(s.labels[i]));
            for name in order(c) {
                let x = &replies[&name];
                r.insert(name.clone(), x.text[i].clone().into());
                r.insert(format!("{name}_score"), json!(x.scores.get(i)));
                r.insert(format!("{name}_kl"), json!(x.kl[i]));
                for (j, values) in s.judges.iter().zip(&x.judges) {
                    r.insert(format!("{name}_{}", j.name), json!(values[i]));
                }
            }
            serde_json::Value::Object(r)
        })
        .collect()
}

/// A metric × policy table, then side-by-side samples.
fn report_md(c: &Config, summary: &temper_stage::Summary, records: &[serde_json::Value]) -> String {
    let names = order(c);
    let mut s = format!(
        "# Policies on held-out prompts (baseline: {})\n\n| metric |",
        c.baseline
    );
    for n in &names {
        let _ = write!(s, " {n} |");
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(names.len()));
    let mut metrics: Vec<&str> = Vec::new();
    for k in summary.keys() {
        if let Some((_, m)) = k.split_once('/') {
            if !metrics.contains(&m) {
                metrics.push(m);
            }
        }
    }
    for m in metrics {
        let _ = write!(s, "\n| {m} |");
        for n in &names {
            let v = summary.get(&format!("{n}/{m}")).and_then(|v| v.as_f64());
            let seen = if saw(c, n, m) { " †" } else { "" };
            let _ = write!(
                s,
                " {}{seen} |",
                v.map_or("-".into(), |x| format!("{x:.4}"))
            );
        }
    }
    if let Some(b) = &c.best_of {
        let _ = write!(
            s,
            "\n\n`{}`: the reference's best of {} replies per prompt under the labeller; its KL \
             is the analytic log n − (n − 1)/n, not measured.",
            b.row_name(),
            b.n
        );
    }
    if !c.trained_on.is_empty() {
        s.push_str(
            "\n\n† the policy's training saw this signal: it is not an independent measure of it.",
        );
    }
    s.push_str("\n\n## Samples\n");
    for r in records.iter().take(c.show) {
        let _ = write!(
            s,
            "\n**Prompt** ({}): {}\n\n",
            r["label"].as_str().unwrap_or("-"),
            r["prompt"].as_str().unwrap_or("")
        );
        for n in &names {
            let _ = writeln!(
                s,
                "- **{n}** (score {:.3}, KL {:.3}): {}",
                r[format!("{n}_score")].as_f64().unwrap_or(0.0),
                r[format!("{n}_kl")].as_f64().unwrap_or(0.0),
                r[n.as_str()].as_str().unwrap_or("")
            );
        }
    }
    s
}
