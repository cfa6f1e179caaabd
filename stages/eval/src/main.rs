//! temper-eval: does PPO help? On held-out prompts, samples a reply from the PPO policy and
//! from the baseline (SFT) with the same seeds, then reports: mean reward-model score of each,
//! the PPO win-rate over the baseline under the reward model, the KL of PPO to the reference on
//! its own samples, and how often each agrees with the prompt's wanted sentiment under an
//! independent judge the pipeline never trained (the VADER lexicon). Writes report.json,
//! report.md (with side-by-side samples), samples.jsonl, metrics.jsonl and summary.json.
//! It trains nothing, so it writes no checkpoint/.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::checkpoint::ScoreHead;
use temper_core::sample::{generate, Generation, Joined, SamplingConfig};
use temper_core::stage::{self, invalid, StageArgs, StageError};
use temper_core::{
    load_checkpoint, resolve_device, token_logprobs, with_autocast, DeviceSpec, LoadSpec,
    Precision, RunDir, Transformer,
};
use temper_data::judge::{SentimentJudge, Verdict};
use temper_data::{ChatTemplate, Fields, LoadOptions, Overlong, TextTokenizer};
use tracing::info;

/// Compare a PPO policy with its SFT baseline on held-out prompts.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    stage: StageArgs,
}

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

fn main() {
    let args = Args::parse();
    stage::main_with("temper-eval", || run(&args.stage));
}

/// One model's replies: text, reward-model score, summed log-prob ratio to the reference.
struct Replies {
    text: Vec<String>,
    scores: Vec<f64>,
    kl: Vec<f64>,
    eos: Vec<bool>,
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let cfg: Config = stage::read_config(&args.config)?;
    for (name, dir) in [
        ("policy", &cfg.policy),
        ("baseline", &cfg.baseline),
        ("reward_model", &cfg.reward_model),
    ]
    .into_iter()
    .chain(cfg.reference.as_ref().map(|r| ("reference", r)))
    {
        if !dir.join("model.safetensors").exists() {
            return Err(invalid(anyhow!(
                "{name}: {} holds no model.safetensors",
                dir.display()
            )));
        }
    }
    for f in [Some(&cfg.prompts), cfg.lexicon.as_ref()]
        .into_iter()
        .flatten()
    {
        if !f.exists() {
            return Err(invalid(anyhow!("{} not found", f.display())));
        }
    }
    let device = resolve_device(cfg.device).map_err(invalid)?;
    let tok = TextTokenizer::load(&cfg.policy.join("tokenizer.json")).map_err(invalid)?;
    let template = ChatTemplate::new(&tok).map_err(invalid)?;
    let (_p, policy) =
        load_checkpoint(&cfg.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    let (_b, baseline) =
        load_checkpoint(&cfg.baseline, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    let (_r, reference) = load_checkpoint(
        cfg.reference.as_ref().unwrap_or(&cfg.baseline),
        LoadSpec::CAUSAL_LM,
        device,
    )
    .map_err(invalid)?;
    let (_rm, reward) = load_checkpoint(
        &cfg.reward_model,
        LoadSpec {
            lm_head: false,
            score: ScoreHead::Load,
        },
        device,
    )
    .map_err(invalid)?;
    let judge = cfg
        .lexicon
        .as_ref()
        .map(|l| SentimentJudge::load(l))
        .transpose()
        .map_err(invalid)?;
    let max_prompt = (policy.config.max_position - cfg.max_new_tokens).max(1) as usize;
    let opts = LoadOptions {
        tokenizer: &tok,
        template,
        fields: &cfg.fields,
        max_len: max_prompt,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (mut prompts, _) = opts.prompts(&cfg.prompts).map_err(invalid)?;
    prompts.truncate(cfg.max_prompts);
    if args.validate {
        println!(
            "{}",
            serde_yaml::to_string(&cfg).context("printing the resolved config")?
        );
        return Ok(());
    }
    let mut run = RunDir::create(&args.out)?;
    run.reset_logs()?;
    stage::write_resolved(&run.out, &cfg)?;

    let sampling = SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_k: None,
        top_p: cfg.top_p,
        eos_token_id: Some(template.eos as i64),
        pad_token_id: template.pad as i64,
    };
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
        .collect();
    let reply = |model: &Transformer| -> anyhow::Result<Replies> {
        let mut out = Replies {
            text: vec![],
            scores: vec![],
            kl: vec![],
            eos: vec![],
        };
        for (c, chunk) in ids.chunks(cfg.batch_size).enumerate() {
            let seeds: Vec<u64> = (0..chunk.len())
                .map(|i| cfg.seed ^ ((c * cfg.batch_size + i) as u64))
                .collect();
            let g = with_autocast(device, cfg.precision, || {
                generate(model, chunk, &sampling, &seeds)
            })??;
            score_replies(
                &g,
                &reward,
                &reference,
                model,
                &tok,
                template.eos,
                cfg.temperature,
                cfg.precision,
                &mut out,
            )?;
        }
        Ok(out)
    };
    let tuned = reply(&policy)?;
    let base = reply(&baseline)?;
    let n = prompts.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let wins: f64 = tuned
        .scores
        .iter()
        .zip(&base.scores)
        .map(|(a, b)| {
            if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / n;
    let labels: Vec<Option<String>> = prompts
        .iter()
        .map(|(_, r)| {
            r.meta
                .get(&cfg.label_field)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    // The judge reads each reply once; agreement, correlation and the samples reuse it.
    let judged = |r: &Replies| -> Option<Vec<Verdict>> {
        let j = judge.as_ref()?;
        Some(r.text.iter().map(|t| j.judge(t)).collect())
    };
    let (ppo_verdicts, sft_verdicts) = (judged(&tuned), judged(&base));
    // Agreement over all labelled prompts, or only those wanting `only`.
    let agreement = |verdicts: &[Verdict], only: Option<&str>| -> Option<f64> {
        let hits: Vec<bool> = verdicts
            .iter()
            .zip(&labels)
            .filter(|(_, l)| only.is_none() || l.as_deref() == only)
            .filter_map(|(v, l)| l.as_ref().map(|l| v.agrees_with(l)))
            .collect();
        (!hits.is_empty()).then(|| hits.iter().filter(|&&a| a).count() as f64 / hits.len() as f64)
    };
    // Does the reward model measure what the independent judge measures? Its scores against
    // the judge's compound score signed by the wanted sentiment (+ for positive, − for
    // negative), within each wanted sentiment: a Bradley–Terry score is only
    // comparable between replies to the same kind of prompt (its level per prompt is free).
    let rm_judge_corr = |verdicts: &[Verdict], scores: &[f64]| -> Option<f64> {
        let points: Vec<(&str, f64, f64)> = verdicts
            .iter()
            .zip(scores)
            .zip(&labels)
            .filter_map(|((v, &s), l)| {
                let label = l.as_deref()?;
                let sign = match label {
                    "positive" => 1.0,
                    "negative" => -1.0,
                    _ => return None,
                };
                Some((label, s, sign * v.compound))
            })
            .collect();
        within_group_pearson(&points)
    };
    let mut summary = serde_json::Map::new();
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
    if let (Some(ppo_v), Some(sft_v)) = (&ppo_verdicts, &sft_verdicts) {
        let sides = [("ppo", ppo_v, &tuned), ("sft", sft_v, &base)];
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
    let fields: Vec<(&str, f64)> = summary
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.as_str(), x)))
        .collect();
    run.log(0, "eval", &fields)?;
    let records: Vec<serde_json::Value> = (0..prompts.len())
        .map(|i| json!({
            "step": 0, "prompt": tok.decode(&prompts[i].0).unwrap_or_default(), "label": labels[i],
            "ppo": tuned.text[i], "ppo_score": tuned.scores[i], "ppo_kl": tuned.kl[i],
            "sft": base.text[i], "sft_score": base.scores[i],
            "ppo_judge": ppo_verdicts.as_ref().map(|v| v[i].compound),
            "sft_judge": sft_verdicts.as_ref().map(|v| v[i].compound),
        }))
        .collect();
    run.log_samples(&records)?;
    std::fs::write(
        run.out.join("report.json"),
        serde_json::to_vec_pretty(&json!({"summary": summary, "samples": records}))?,
    )?;
    std::fs::write(
        run.out.join("report.md"),
        report_md(&summary, &records, cfg.show),
    )?;
    info!(
        "win-rate {wins:.3}; score PPO {:.3} vs SFT {:.3}; KL {:.3}",
        mean(&tuned.scores),
        mean(&base.scores),
        mean(&tuned.kl)
    );
    run.write_summary("ok", summary)?;
    Ok(())
}

/// Scores one batch of replies: the reward model on prompt + reply, the reference KL on the
/// reply tokens (Σ log π − log π_ref at the sampling temperature), and the decoded text.
#[allow(clippy::too_many_arguments)]
fn score_replies(
    g: &Generation,
    reward: &Transformer,
    reference: &Transformer,
    model: &Transformer,
    tok: &TextTokenizer,
    eos: u32,
    temperature: f64,
    precision: Precision,
    out: &mut Replies,
) -> anyhow::Result<()> {
    let p = g.prompt.size()[1];
    let n = g.tokens.size()[1];
    let Joined {
        seq,
        attention: attn,
        response,
    } = g.joined();
    let mask = g.mask.to_kind(Kind::Float);
    let device = seq.device();
    let (scores, kl) = tch::no_grad(|| {
        with_autocast(device, precision, || -> anyhow::Result<(Tensor, Tensor)> {
            let h = reward.hidden_states(&seq, Some(&attn), None)?;
            let scores = reward
                .sequence_scores(&h, &attn, &response)?
                .to_kind(Kind::Float);
            let lp = |m: &Transformer| -> anyhow::Result<Tensor> {
                let h = m.hidden_states(&seq, Some(&attn), None)?;
                let logits = m.logits(&h.narrow(1, p - 1, n))?.to_kind(Kind::Float) / temperature;
                Ok(token_logprobs(&logits, &g.tokens))
            };
            let kl = ((lp(model)? - lp(reference)?) * &mask).sum_dim_intlist(1, false, Kind::Float);
            Ok((scores, kl))
        })?
    })?;
    out.scores
        .extend(Vec::<f64>::try_from(scores.to_kind(Kind::Double))?);
    out.kl
        .extend(Vec::<f64>::try_from(kl.to_kind(Kind::Double))?);
    for i in 0..g.tokens.size()[0] {
        let toks = Vec::<i64>::try_from(g.tokens.get(i))?;
        let m = Vec::<bool>::try_from(g.mask.get(i))?;
        out.eos
            .push(toks.iter().zip(&m).any(|(&t, &k)| k && t == eos as i64));
        let reply: Vec<u32> = toks
            .iter()
            .zip(&m)
            .filter(|(&t, &k)| k && t != eos as i64)
            .map(|(&t, _)| t as u32)
            .collect();
        out.text.push(tok.decode(&reply)?);
    }
    Ok(())
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
