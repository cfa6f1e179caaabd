//! temper-eval: does PPO help? On held-out prompts, samples a reply from the PPO policy and
//! from the baseline (SFT) with the same seeds, then reports: mean reward-model score of each,
//! the PPO win-rate over the baseline under the reward model, the KL of PPO to the reference on
//! its own samples, and how often each agrees with the prompt's wanted sentiment under an
//! independent judge the pipeline never trained (the VADER lexicon). Writes report.json,
//! report.md (with side-by-side samples), samples.jsonl, metrics.jsonl and summary.json.
//! It trains nothing, so it writes no checkpoint/.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::checkpoint::ScoreHead;
use temper_core::rewards::{SentimentJudge, Verdict};
use temper_core::sample::{generate, Generation, SamplingConfig};
use temper_core::scoring::{decode_replies, response_logprobs, reward_scores};
use temper_core::{
    load_checkpoint, load_with_tokenizer, resolve_device, with_autocast, DeviceSpec, LoadSpec,
    Loaded, Precision, Transformer, CHECKPOINT_FILES,
};
use temper_data::{seed_for, ChatTemplate, Fields, LoadOptions, Overlong, PromptRecord};
use temper_stage::{
    checked_config, invalid, ConfigFile, Inputs, MetricsLog, StageArgs, StageError, StageFolder,
    StageKind,
};
use tracing::info;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The tuned policy (PPO's checkpoint).
    policy: PathBuf,
    /// What it is compared with (the SFT checkpoint).
    baseline: PathBuf,
    /// KL is measured against this; defaults to the baseline.
    #[serde(default)]
    reference: Option<PathBuf>,
    reward_model: PathBuf,
    /// Held-out prompts (.jsonl or .parquet).
    prompts: PathBuf,
    #[serde(default)]
    fields: Fields,
    /// The prompt field naming the wanted sentiment (positive / negative), for the judge.
    #[serde(default = "default_label")]
    label_field: String,
    /// The judge's lexicon (VADER's vader_lexicon.txt); without it, no judge metrics.
    #[serde(default)]
    lexicon: Option<PathBuf>,
    #[serde(default = "default_max_prompts")]
    max_prompts: usize,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default = "default_max_new")]
    max_new_tokens: i64,
    #[serde(default = "default_temperature")]
    temperature: f64,
    #[serde(default)]
    top_p: Option<f64>,
    /// Side-by-side samples in report.md.
    #[serde(default = "default_shown")]
    show: usize,
    #[serde(default)]
    device: DeviceSpec,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    seed: u64,
}

fn default_label() -> String {
    "sentiment".into()
}
fn default_max_prompts() -> usize {
    200
}
fn default_batch() -> usize {
    32
}
fn default_max_new() -> i64 {
    32
}
fn default_temperature() -> f64 {
    0.7
}
fn default_shown() -> usize {
    6
}

/// One model's replies: text, reward-model score, summed log-prob ratio to the reference.
struct Replies {
    text: Vec<String>,
    scores: Vec<f64>,
    kl: Vec<f64>,
    eos: Vec<bool>,
}

fn main() {
    temper_stage::stage_main(
        "temper-eval",
        "Compare a PPO policy with its SFT baseline on held-out prompts.",
        run,
    )
}

/// Range checks and the inputs' presence; nothing is read yet.
fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    cfg.ensure(c.max_prompts >= 1, "max_prompts", "must be at least 1")?;
    cfg.ensure(c.batch_size >= 1, "batch_size", "must be at least 1")?;
    cfg.ensure(
        c.max_new_tokens >= 1,
        "max_new_tokens",
        "must be at least 1",
    )?;
    cfg.ensure(
        c.temperature.is_finite() && c.temperature >= 0.0,
        "temperature",
        "must be ≥ 0 (0 is greedy)",
    )?;
    cfg.ensure(
        c.top_p.is_none_or(|p| p > 0.0 && p <= 1.0),
        "top_p",
        "must be in (0, 1]",
    )?;
    for (field, dir) in [
        ("policy", Some(&c.policy)),
        ("baseline", Some(&c.baseline)),
        ("reference", c.reference.as_ref()),
        ("reward_model", Some(&c.reward_model)),
    ] {
        if let Some(dir) = dir {
            inputs.folder(cfg, field, dir, &CHECKPOINT_FILES[..2])?;
        }
    }
    inputs.file(cfg, "prompts", &c.prompts)?;
    if let Some(l) = &c.lexicon {
        inputs.file(cfg, "lexicon", l)?;
    }
    Ok(())
}

/// The models, the judge and the prompts, loaded and cross-checked.
struct Setup {
    policy: Loaded,
    baseline: Transformer,
    reference: Transformer,
    reward: Transformer,
    judge: Option<SentimentJudge>,
    template: ChatTemplate,
    prompts: Vec<(Vec<u32>, PromptRecord)>,
}

fn prepare(cfg: &ConfigFile<Config>) -> Result<Setup, StageError> {
    let c = &cfg.value;
    let device = resolve_device(c.device).map_err(invalid)?;
    let policy = load_with_tokenizer(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    let template = ChatTemplate::new(&policy.tokenizer).map_err(invalid)?;
    let load = |dir: &PathBuf, spec| -> Result<Transformer, StageError> {
        let (_, model) = load_checkpoint(dir, spec, device).map_err(invalid)?;
        temper_core::checkpoint::check_vocab(policy.tokenizer.vocab_size(), &model.config, dir)
            .map_err(invalid)?;
        Ok(model)
    };
    let baseline = load(&c.baseline, LoadSpec::CAUSAL_LM)?;
    let reference = load(
        c.reference.as_ref().unwrap_or(&c.baseline),
        LoadSpec::CAUSAL_LM,
    )?;
    let rm_spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let reward = load(&c.reward_model, rm_spec)?;
    let judge = c
        .lexicon
        .as_ref()
        .map(|l| SentimentJudge::load(l))
        .transpose()
        .map_err(invalid)?;
    let max_position = policy.model.config.max_position;
    cfg.ensure(
        c.max_new_tokens < max_position,
        "max_new_tokens",
        format!("must leave room for a prompt in the model's {max_position} positions"),
    )?;
    let opts = LoadOptions {
        tokenizer: &policy.tokenizer,
        template,
        fields: &c.fields,
        max_len: (max_position - c.max_new_tokens) as usize,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (mut prompts, _) = opts.prompts(&c.prompts).map_err(invalid)?;
    prompts.truncate(c.max_prompts);
    Ok(Setup {
        policy,
        baseline,
        reference,
        reward,
        judge,
        template,
        prompts,
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Eval, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    let s = prepare(&cfg)?;
    if args.validate {
        return cfg.print_resolved();
    }
    let c = &cfg.value;
    let folder = StageFolder::claim(&args.out, "eval")?;
    let mut log = MetricsLog::open(&folder.path)?;
    log.reset()?;
    cfg.write_resolved(&folder.path)?;

    let tuned = replies(&s, &s.policy.model, c)?;
    let base = replies(&s, &s.baseline, c)?;
    let labels: Vec<Option<String>> = s
        .prompts
        .iter()
        .map(|(_, r)| {
            r.meta
                .get(&c.label_field)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    // The judge reads each reply once; agreement, correlation and the samples reuse it.
    let judged = |r: &Replies| -> Option<Vec<Verdict>> {
        let j = s.judge.as_ref()?;
        Some(r.text.iter().map(|t| j.judge(t)).collect())
    };
    let (ppo_verdicts, sft_verdicts) = (judged(&tuned), judged(&base));
    let summary = summarize(
        &tuned,
        &base,
        &labels,
        ppo_verdicts.as_deref(),
        sft_verdicts.as_deref(),
    );
    let fields: Vec<(&str, f64)> = summary
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.as_str(), x)))
        .collect();
    log.log_eval(0, &fields)?;
    let records: Vec<serde_json::Value> = (0..s.prompts.len())
        .map(|i| json!({
            "step": 0, "prompt": s.policy.tokenizer.decode(&s.prompts[i].0).unwrap_or_default(), "label": labels[i],
            "ppo": tuned.text[i], "ppo_score": tuned.scores[i], "ppo_kl": tuned.kl[i],
            "sft": base.text[i], "sft_score": base.scores[i],
            "ppo_judge": ppo_verdicts.as_ref().map(|v| v[i].compound),
            "sft_judge": sft_verdicts.as_ref().map(|v| v[i].compound),
        }))
        .collect();
    log.log_samples(&records)?;
    temper_stage::atomic::write_json(
        &folder.path.join("report.json"),
        &json!({"summary": summary, "samples": records}),
    )?;
    temper_stage::atomic::write_atomic(
        &folder.path.join("report.md"),
        report_md(&summary, &records, c.show).as_bytes(),
    )?;
    info!(
        "win-rate {:.3}; score PPO {:.3} vs SFT {:.3}; KL {:.3}",
        summary["win_rate"], summary["score_ppo"], summary["score_sft"], summary["kl_ppo"]
    );
    log.write_summary("ok", summary)?;
    Ok(())
}

/// One model's replies to every prompt (same seeds for every model), each scored by the reward
/// model and by its KL to the reference: Σ log π − log π_ref over the reply at the sampling
/// temperature.
fn replies(s: &Setup, model: &Transformer, c: &Config) -> anyhow::Result<Replies> {
    let sampling = SamplingConfig {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: None,
        top_p: c.top_p,
        eos_token_id: Some(s.template.eos as i64),
        pad_token_id: s.template.pad as i64,
    };
    let ids: Vec<Vec<i64>> = s
        .prompts
        .iter()
        .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
        .collect();
    let mut out = Replies {
        text: vec![],
        scores: vec![],
        kl: vec![],
        eos: vec![],
    };
    let device = model.device();
    for (chunk_index, chunk) in ids.chunks(c.batch_size).enumerate() {
        let seeds: Vec<u64> = (0..chunk.len())
            .map(|i| {
                seed_for(
                    c.seed,
                    "eval-prompt",
                    (chunk_index * c.batch_size + i) as u64,
                )
            })
            .collect();
        let g = with_autocast(device, c.precision, || {
            generate(model, chunk, &sampling, &seeds)
        })??;
        let (scores, kl) = score(s, model, &g, c)?;
        out.scores
            .extend(Vec::<f64>::try_from(scores.to_kind(Kind::Double))?);
        out.kl
            .extend(Vec::<f64>::try_from(kl.to_kind(Kind::Double))?);
        for r in decode_replies(&s.policy.tokenizer, &g.tokens, &g.mask, s.template.eos)? {
            out.text.push(r.text);
            out.eos.push(r.ended_with_eos);
        }
    }
    Ok(out)
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
    let device = model.device();
    tch::no_grad(|| {
        with_autocast(
            device,
            c.precision,
            || -> anyhow::Result<(Tensor, Tensor)> {
                let scores = reward_scores(&s.reward, &joined)?;
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

/// The evaluation's numbers: RM scores and win-rate, KL, EOS rates, and, with a judge, its
/// agreement with the wanted sentiment (overall and per sentiment) and its correlation with
/// the reward model within each sentiment.
fn summarize(
    tuned: &Replies,
    base: &Replies,
    labels: &[Option<String>],
    ppo_verdicts: Option<&[Verdict]>,
    sft_verdicts: Option<&[Verdict]>,
) -> temper_stage::Summary {
    let n = labels.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let wins: f64 = tuned
        .scores
        .iter()
        .zip(&base.scores)
        .map(|(a, b)| match a.partial_cmp(b) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .sum::<f64>()
        / n;
    // Agreement over all labelled prompts, or only those wanting `only`.
    let agreement = |verdicts: &[Verdict], only: Option<&str>| -> Option<f64> {
        let hits: Vec<bool> = verdicts
            .iter()
            .zip(labels)
            .filter(|(_, l)| only.is_none() || l.as_deref() == only)
            .filter_map(|(v, l)| l.as_ref().map(|l| v.agrees_with(l)))
            .collect();
        (!hits.is_empty()).then(|| hits.iter().filter(|&&a| a).count() as f64 / hits.len() as f64)
    };
    // Does the reward model measure what the independent judge measures? Its scores against
    // the judge's compound score signed by the wanted sentiment (+ for positive, − for
    // negative), within each wanted sentiment: a Bradley–Terry score is only comparable
    // between replies to the same kind of prompt (its level per prompt is free).
    let rm_judge_corr = |verdicts: &[Verdict], scores: &[f64]| -> Option<f64> {
        let points: Vec<(&str, f64, f64)> = verdicts
            .iter()
            .zip(scores)
            .zip(labels)
            .filter_map(|((v, &sc), l)| {
                let label = l.as_deref()?;
                let sign = match label {
                    "positive" => 1.0,
                    "negative" => -1.0,
                    _ => return None,
                };
                Some((label, sc, sign * v.compound))
            })
            .collect();
        within_group_pearson(&points)
    };
    let mut summary = temper_stage::Summary::new();
    let mut put = |k: &str, v: f64| {
        summary.insert(k.into(), json!(v));
    };
    put("prompts", n);
    put("score_ppo", mean(&tuned.scores));
    put("score_sft", mean(&base.scores));
    put("win_rate", wins);
    put("kl_ppo", mean(&tuned.kl));
    put("kl_sft", mean(&base.kl));
    put(
        "eos_rate_ppo",
        tuned.eos.iter().filter(|&&e| e).count() as f64 / n,
    );
    put(
        "eos_rate_sft",
        base.eos.iter().filter(|&&e| e).count() as f64 / n,
    );
    if let (Some(ppo_v), Some(sft_v)) = (ppo_verdicts, sft_verdicts) {
        let sides = [("ppo", ppo_v, tuned), ("sft", sft_v, base)];
        for (name, v, _) in sides {
            if let Some(a) = agreement(v, None) {
                put(&format!("judge_agreement_{name}"), a);
            }
        }
        for label in ["positive", "negative"] {
            for (name, v, _) in sides {
                if let Some(a) = agreement(v, Some(label)) {
                    put(&format!("judge_agreement_{name}/{label}"), a);
                }
            }
        }
        for (name, v, r) in sides {
            if let Some(c) = rm_judge_corr(v, &r.scores) {
                put(&format!("rm_judge_corr_{name}"), c);
            }
        }
    }
    summary
}

fn report_md(
    summary: &serde_json::Map<String, serde_json::Value>,
    records: &[serde_json::Value],
    show: usize,
) -> String {
    let mut s = String::from("# PPO vs SFT on held-out prompts\n\n| metric | value |\n|---|---|\n");
    for (k, v) in summary {
        let _ = writeln!(
            s,
            "| {k} | {} |",
            v.as_f64().map_or(v.to_string(), |x| format!("{x:.4}"))
        );
    }
    s.push_str("\n## Samples\n");
    for r in records.iter().take(show) {
        let _ = write!(
            s,
            "\n**Prompt** ({}): {}\n\n- **SFT** (score {:.3}): {}\n- **PPO** (score {:.3}, KL {:.3}): {}\n",
            r["label"].as_str().unwrap_or("-"),
            r["prompt"].as_str().unwrap_or(""),
            r["sft_score"].as_f64().unwrap_or(0.0),
            r["sft"].as_str().unwrap_or(""),
            r["ppo_score"].as_f64().unwrap_or(0.0),
            r["ppo_kl"].as_f64().unwrap_or(0.0),
            r["ppo"].as_str().unwrap_or(""),
        );
    }
    s
}

/// Pearson correlation of (x, y) after centring both within each group: the pooled
/// within-group correlation, blind to differences between the groups' means.
fn within_group_pearson(points: &[(&str, f64, f64)]) -> Option<f64> {
    let mut sums: std::collections::HashMap<&str, (f64, f64, f64)> = Default::default();
    for &(g, x, y) in points {
        let e = sums.entry(g).or_default();
        *e = (e.0 + x, e.1 + y, e.2 + 1.0);
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = points
        .iter()
        .map(|&(g, x, y)| {
            let (sx, sy, n) = sums[g];
            (x - sx / n, y - sy / n)
        })
        .unzip();
    pearson(&xs, &ys)
}

/// Pearson correlation of `xs` and `ys`; None with fewer than two points or a constant side.
fn pearson(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len() as f64;
    if xs.len() < 2 || xs.len() != ys.len() {
        return None;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::{pearson, within_group_pearson};

    #[test]
    fn pearson_matches_hand_computed_values() {
        // x = 1, 2, 3; y = 1, 3, 2: sxy = 1, sxx = syy = 2, r = 0.5.
        let r = pearson(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]).unwrap();
        assert!((r - 0.5).abs() < 1e-12, "{r}");
        assert!((pearson(&[1.0, 2.0], &[4.0, 2.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0], &[1.0]), None);
    }

    #[test]
    fn within_group_pearson_ignores_the_groups_offsets() {
        // Inside each group y rises with x; the groups' means go the other way, so the plain
        // correlation is negative while the within-group one is exactly 1.
        let pts = [
            ("a", 0.0, 10.0),
            ("a", 1.0, 11.0),
            ("b", 10.0, 0.0),
            ("b", 11.0, 1.0),
        ];
        let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().map(|p| (p.1, p.2)).unzip();
        assert!(pearson(&xs, &ys).unwrap() < 0.0);
        assert!((within_group_pearson(&pts).unwrap() - 1.0).abs() < 1e-12);
    }
}
