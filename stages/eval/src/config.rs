//! temper-eval's configuration: the policies to compare, the judges and the sampling, with
//! the range checks made before anything is read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use temper_core::sample::{check_sampling, SamplingKeys};
use temper_core::{DeviceSpec, Precision};
use temper_data::Fields;
use temper_rewards::{check_rewards, RewardSpec};
use temper_stage::{ConfigFile, InputPath, Inputs, StageError};

use crate::{best_of, exact};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The policies to compare, by name: checkpoint folders, e.g. {sft: …, ppo: …, dpo: …}.
    pub policies: BTreeMap<String, InputPath>,
    /// The policy the others are compared with (win-rates): one of `policies`' names.
    pub baseline: String,
    /// KL is measured against this checkpoint; defaults to the baseline's.
    #[serde(default)]
    pub reference: Option<InputPath>,
    /// Scores replies (score, win-rate); without one, no reward metrics.
    #[serde(default)]
    pub reward_model: Option<InputPath>,
    /// Exact-match accuracy against a prompt field (verifiable tasks): greedy accuracy,
    /// pass@k and the mean accuracy of k samples at `temperature`.
    #[serde(default)]
    pub exact_match: Option<exact::ExactMatchEval>,
    /// A best-of-n row, the rejection-sampling baseline: `{n, labeller: [...], name}` — the
    /// reference answers each prompt n times and the labeller keeps the best reply; its KL
    /// is the analytic log n − (n − 1)/n.
    #[serde(default)]
    pub best_of: Option<best_of::BestOfEval>,
    /// Held-out prompts (.jsonl or .parquet).
    pub prompts: InputPath,
    #[serde(default)]
    pub fields: Fields,
    /// The prompt field naming the wanted sentiment (positive / negative), for the judge.
    #[serde(default = "default_label")]
    pub label_field: String,
    /// The judge's lexicon (VADER's vader_lexicon.txt): a judge named `judge`.
    #[serde(default)]
    pub lexicon: Option<InputPath>,
    /// More judges, each `{kind: lexicon|afinn|command, …, name}` as a reward is written;
    /// each gives `<policy>/<name>_agreement` (overall and per sentiment) and, with a reward
    /// model, `<policy>/rm_<name>_corr`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub judges: Vec<RewardSpec>,
    /// Which signals each policy's training saw, by policy: judge names or `reward_model`
    /// (e.g. `{ppo_onpolicy: [vader]}` when VADER labelled its pairs); marked in the report.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trained_on: BTreeMap<String, Vec<String>>,
    #[serde(default = "default_max_prompts")]
    pub max_prompts: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "temper_core::sample::default_max_new_tokens")]
    pub max_new_tokens: i64,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Side-by-side samples in report.md.
    #[serde(default = "default_shown")]
    pub show: usize,
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub seed: u64,
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
fn default_temperature() -> f64 {
    0.7
}
fn default_shown() -> usize {
    6
}

/// Range checks and the inputs' presence; nothing is read yet.
pub fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
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
    let sampling = SamplingKeys {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: None,
        top_p: c.top_p,
        needs_temperature: None,
    };
    check_sampling(cfg, sampling)?;
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
            temper_rewards::compile_pattern(p)
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
    best_of::check(cfg, inputs)?;
    crate::judges::check(cfg)?;
    check_rewards(
        cfg,
        inputs,
        "judges",
        &c.judges,
        Some("the reward model is `reward_model`; a judge is a program no stage trained"),
    )?;
    Ok(())
}
