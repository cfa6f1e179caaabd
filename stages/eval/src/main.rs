//! temper-eval: compares policies (SFT, PPO, DPO, …) on held-out prompts. Every policy answers
//! every prompt with the same seeds; each reply is scored by the reward model, by its KL to the
//! reference, and by an independent judge the pipeline never trained (VADER). Per policy it
//! reports the RM score, the win-rate over the baseline, KL, reply length, EOS rate,
//! distinct-1/2 and the judge's agreement with the wanted sentiment (overall and per
//! sentiment) — the numbers that tell a real gain from reward hacking. Writes report.json,
//! report.md (a table and side-by-side samples), samples.jsonl, metrics.jsonl, summary.json.
//! It trains nothing, so it writes no checkpoint/.

mod exact;
mod measures;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::checkpoint::{check_vocab, ScoreHead};
use temper_core::rewards::SentimentJudge;
use temper_core::sample::{generate, Generation, SamplingConfig};
use temper_core::scoring::{decode_replies, response_logprobs, reward_scores};
use temper_core::{
    load_checkpoint, resolve_device, with_autocast, DeviceSpec, LoadSpec, Precision, Transformer,
};
use temper_data::{
    seeds_for, ChatTemplate, Fields, LoadOptions, Overlong, PromptRecord, TextTokenizer,
};
use temper_stage::{
    checked_config, invalid, ConfigFile, Inputs, MetricsLog, StageArgs, StageError, StageFolder,
    StageKind,
};

use crate::measures::{policy_metrics, Replies};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The policies to compare, by name: checkpoint folders, e.g. {sft: …, ppo: …, dpo: …}.
    policies: BTreeMap<String, PathBuf>,
    /// The policy the others are compared with (win-rates): one of `policies`' names.
    baseline: String,
    /// KL is measured against this checkpoint; defaults to the baseline's.
    #[serde(default)]
    reference: Option<PathBuf>,
    /// Scores replies (score, win-rate); without one, no reward metrics.
    #[serde(default)]
    reward_model: Option<PathBuf>,
    /// Exact-match accuracy against a prompt field (verifiable tasks): greedy accuracy,
    /// pass@k and the mean accuracy of k samples at `temperature`.
    #[serde(default)]
    exact_match: Option<exact::ExactMatchEval>,
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
    temper_stage::stage_main(
        "temper-eval",
        "Compare policies (SFT, PPO, DPO, …) on held-out prompts: reward-model score, win-rate, KL, length, EOS rate, distinct-n and an independent judge.",
        run,
    )
}

/// Range checks and the inputs' presence; nothing is read yet.
fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    cfg.ensure(
        !c.policies.is_empty(),
        "policies",
        "name at least one policy",
    )?;
    cfg.ensure(
        c.policies.contains_key(&c.baseline),
        "baseline",
        format!(
            "`{}` is not one of the policies ({})",
            c.baseline,
            c.policies.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    )?;
    for name in c.policies.keys() {
        cfg.ensure(
            !name.is_empty()
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_-".contains(ch)),
            "policies",
            format!("policy name `{name}`: use letters, digits, `_` and `-`"),
        )?;
    }
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
    for (name, dir) in &c.policies {
        inputs.checkpoint(cfg, &format!("policies.{name}"), dir, true)?;
    }
    if let Some(r) = &c.reference {
        inputs.checkpoint(cfg, "reference", r, false)?;
    }
    if let Some(r) = &c.reward_model {
        inputs.checkpoint(cfg, "reward_model", r, false)?;
    }
    if let Some(e) = &c.exact_match {
        cfg.ensure(e.k >= 1, "exact_match.k", "must be at least 1")?;
        if let Some(p) = &e.pattern {
            temper_core::rewards::functions::compile_pattern(p)
                .map_err(|why| cfg.error("exact_match.pattern", why))?;
        }
        cfg.ensure(
            e.k == 1 || c.temperature > 0.0,
            "temperature",
            "must be positive for pass@k with k > 1 (greedy replies are all the same)",
        )?;
    }
    inputs.file(cfg, "prompts", &c.prompts)?;
    if let Some(l) = &c.lexicon {
        inputs.file(cfg, "lexicon", l)?;
    }
    Ok(())
}

/// The shared pieces: tokenizer, reference, reward model, judge and prompts. Policies are
/// loaded one at a time, so memory holds one policy besides these.
pub struct Setup {
    tok: TextTokenizer,
    template: ChatTemplate,
    reference: Transformer,
    reward: Option<Transformer>,
    exact: Option<exact::ExactScorer>,
    judge: Option<SentimentJudge>,
    prompts: Vec<(Vec<u32>, PromptRecord)>,
    labels: Vec<Option<String>>,
    /// Each prompt's reward sign (the reward model's `temper_score_sign`; 1 without one).
    signs: Vec<f64>,
}

fn prepare(cfg: &ConfigFile<Config>) -> Result<Setup, StageError> {
    let c = &cfg.value;
    let device = resolve_device(c.device).map_err(invalid)?;
    let base_dir = &c.policies[&c.baseline];
    let tokenizer = base_dir.join("tokenizer.json");
    let tok = TextTokenizer::load(&tokenizer).map_err(invalid)?;
    for (name, dir) in &c.policies {
        let same = std::fs::read(dir.join("tokenizer.json")).ok() == std::fs::read(&tokenizer).ok();
        cfg.ensure(
            same,
            &format!("policies.{name}"),
            "uses a different tokenizer from the baseline; the policies must agree token for token",
        )?;
    }
    let template = ChatTemplate::new(&tok).map_err(invalid)?;
    let load = |dir: &PathBuf, spec| -> Result<Transformer, StageError> {
        let (_, model) = load_checkpoint(dir, spec, device).map_err(invalid)?;
        check_vocab(tok.vocab_size(), &model.config, dir).map_err(invalid)?;
        Ok(model)
    };
    // Positions every policy has for prompt + reply (prompt tuning's virtual tokens take some).
    let mut room = i64::MAX;
    for dir in c.policies.values() {
        // Config and vocabulary only: the weights are read when the policy's turn comes.
        let config = temper_core::checkpoint::model_config(dir).map_err(invalid)?;
        check_vocab(tok.vocab_size(), &config, dir).map_err(invalid)?;
        let positions = config.max_position - temper_core::peft::virtual_tokens_of(dir);
        cfg.ensure(
            c.max_new_tokens < positions,
            "max_new_tokens",
            format!(
                "must leave room for a prompt in {}'s {positions} positions",
                dir.display(),
            ),
        )?;
        room = room.min(positions);
    }
    let reference = load(
        c.reference.as_ref().unwrap_or(base_dir),
        LoadSpec::CAUSAL_LM,
    )?;
    let rm_spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let reward = c
        .reward_model
        .as_ref()
        .map(|r| load(r, rm_spec))
        .transpose()?;
    let judge = c
        .lexicon
        .as_ref()
        .map(|l| SentimentJudge::load(l))
        .transpose()
        .map_err(invalid)?;
    let opts = LoadOptions {
        tokenizer: &tok,
        template: template.clone(),
        fields: &c.fields,
        max_len: (reference.config.max_position.min(room) - c.max_new_tokens) as usize,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (mut prompts, _) = opts.prompts(&c.prompts).map_err(invalid)?;
    prompts.truncate(c.max_prompts);
    let exact = c
        .exact_match
        .as_ref()
        .map(|e| exact::ExactScorer::new(e, &prompts))
        .transpose()
        .map_err(|e| cfg.error("exact_match", e))?;
    let signs = match reward.as_ref().and_then(|r| r.config.score_sign.as_ref()) {
        Some(sign) => prompts
            .iter()
            .map(|(_, r)| sign.sign(&r.meta))
            .collect::<Result<Vec<f64>, _>>()
            .map_err(|e| cfg.error("prompts", e))?,
        None => vec![1.0; prompts.len()],
    };
    let labels = prompts
        .iter()
        .map(|(_, r)| {
            r.meta
                .get(&c.label_field)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    Ok(Setup {
        tok,
        template,
        reference,
        reward,
        exact,
        judge,
        prompts,
        labels,
        signs,
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Eval, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    temper_core::dist::World::require_single("eval").map_err(|e| invalid(anyhow::anyhow!(e)))?;
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
        replies.insert(name.clone(), answer(&s, &model, c)?);
        if let Some(e) = &s.exact {
            tracing::info!("{name}: exact match, greedy and pass@{}", e.k);
            exact_metrics.insert(name.clone(), e.measure(&s, &model, c)?);
        }
    }
    let base = &replies[&c.baseline];
    let mut summary = temper_stage::Summary::new();
    summary.insert("prompts".into(), s.prompts.len().into());
    for name in order(c) {
        let r = &replies[name];
        let baseline = (name != &c.baseline).then_some(base);
        for (k, v) in policy_metrics(name, r, baseline, &s.labels) {
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
        &json!({"summary": summary, "samples": records}),
    )?;
    temper_stage::atomic::write_atomic(
        &folder.path.join("report.md"),
        report_md(c, &summary, &records).as_bytes(),
    )?;
    log.write_summary("ok", summary)?;
    Ok(())
}

/// The baseline first, then the other policies in name order.
fn order(c: &Config) -> Vec<&String> {
    std::iter::once(&c.baseline)
        .chain(c.policies.keys().filter(|k| **k != c.baseline))
        .collect()
}

/// One policy's replies to every prompt (the same seeds for every policy), scored.
fn answer(s: &Setup, model: &Transformer, c: &Config) -> anyhow::Result<Replies> {
    let sampling = SamplingConfig {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: None,
        top_p: c.top_p,
        eos_token_id: Some(s.template.eos as i64),
        also_stop: s.template.also_stop(),
        pad_token_id: s.template.pad as i64,
    };
    let ids: Vec<Vec<i64>> = s
        .prompts
        .iter()
        .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
        .collect();
    let seeds = seeds_for(c.seed, "eval", 0, ids.len());
    let mut out = Replies {
        text: vec![],
        tokens: vec![],
        scores: vec![],
        kl: vec![],
        eos: vec![],
        judge: s.judge.as_ref().map(|_| Vec::new()),
    };
    let batches = ids
        .chunks(c.batch_size)
        .zip(seeds.chunks(c.batch_size))
        .zip(s.signs.chunks(c.batch_size));
    for ((chunk, chunk_seeds), signs) in batches {
        let g = with_autocast(model.device(), c.precision, || {
            generate(model, chunk, &sampling, chunk_seeds)
        })??;
        let (scores, kl) = score(s, model, &g, c)?;
        // The reward the policies were trained on: the score times the prompt's sign.
        let scores = Vec::<f64>::try_from(scores.to_kind(Kind::Double))?;
        out.scores
            .extend(scores.iter().zip(signs).map(|(x, sign)| x * sign));
        out.kl
            .extend(Vec::<f64>::try_from(kl.to_kind(Kind::Double))?);
        for r in decode_replies(&s.tok, &g.tokens, &g.mask, &s.template.stop_ids())? {
            if let (Some(j), Some(v)) = (&s.judge, out.judge.as_mut()) {
                v.push(j.judge(&r.text).compound);
            }
            out.tokens.push(r.ids.len() + usize::from(r.ended_with_eos));
            out.eos.push(r.ended_with_eos);
            out.text.push(r.text);
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
                let x = &replies[name];
                r.insert(name.clone(), x.text[i].clone().into());
                r.insert(format!("{name}_score"), json!(x.scores.get(i)));
                r.insert(format!("{name}_kl"), json!(x.kl[i]));
                if let Some(j) = &x.judge {
                    r.insert(format!("{name}_judge"), json!(j[i]));
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
            let _ = write!(s, " {} |", v.map_or("-".into(), |x| format!("{x:.4}")));
        }
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
