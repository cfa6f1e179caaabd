//! temper-label's settings and their checks: the policy that writes the replies, the prompts,
//! the labeller that scores them, and how pairs and best-of-n rows are chosen.

use serde::{Deserialize, Serialize};
use temper_core::sample::{check_sampling, SamplingKeys};
use temper_core::{DeviceSpec, Precision};
use temper_data::Fields;
use temper_rewards::{check_rewards, RewardSpec};
use temper_stage::{ConfigFile, Every, InputPath, Inputs, StageError};

/// Which pairs each prompt's replies give.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairMode {
    /// One pair per prompt: its best reply against its worst.
    #[default]
    BestWorst,
    /// Every two replies whose scores differ by more than `min_margin`.
    All,
}

impl PairMode {
    pub fn name(self) -> &'static str {
        match self {
            PairMode::BestWorst => "best_worst",
            PairMode::All => "all",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The checkpoint that writes the replies (the policy to improve), with its tokenizer.
    pub policy: InputPath,
    /// Prompts (.jsonl or .parquet): `prompt` as text or messages, plus the fields the
    /// labeller reads (e.g. `sentiment`, `answer`); every field is carried into the outputs.
    pub prompts: InputPath,
    #[serde(default)]
    pub fields: Fields,
    /// What scores a reply: a list of `{kind: lexicon|exact_match|regex|length|command|model,
    /// weight, …}` as GRPO's `rewards:`; the label is their weighted sum.
    pub labeller: Vec<RewardSpec>,
    /// Replies sampled per prompt (k).
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    /// Use only the first this many prompts.
    #[serde(default)]
    pub max_prompts: Option<usize>,
    #[serde(default)]
    pub pairs: PairMode,
    /// A pair is kept when its chosen reply scores more than this above its rejected one;
    /// ties are always dropped.
    #[serde(default)]
    pub min_margin: f64,
    /// A prompt's best reply becomes a best-of-n SFT row when it scores at least this;
    /// without it every prompt gives one.
    #[serde(default)]
    pub best_min_score: Option<f64>,
    /// Prompts per generation batch (each gives `num_generations` sequences).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "temper_core::sample::default_max_new_tokens")]
    pub max_new_tokens: i64,
    #[serde(default)]
    pub max_prompt_len: Option<usize>,
    #[serde(default = "temper_core::sample::full_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// How often (in batches) the labelled replies so far are saved for a resume.
    #[serde(default = "every_batch")]
    pub save_every: Every,
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub seed: u64,
}

fn default_generations() -> usize {
    4
}
fn default_batch() -> usize {
    8
}
fn every_batch() -> Every {
    Every::new(1)
}

/// Range checks and the inputs' presence; nothing is read yet.
pub fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    cfg.ensure(
        c.num_generations >= 2,
        "num_generations",
        "must be at least 2: a pair compares two replies to one prompt",
    )?;
    cfg.ensure(c.batch_size >= 1, "batch_size", "must be at least 1")?;
    cfg.ensure(
        c.max_prompts.is_none_or(|m| m >= 1),
        "max_prompts",
        "must be at least 1",
    )?;
    cfg.ensure(
        c.min_margin.is_finite() && c.min_margin >= 0.0,
        "min_margin",
        "must be a number ≥ 0",
    )?;
    cfg.ensure(
        c.best_min_score.is_none_or(f64::is_finite),
        "best_min_score",
        "must be a finite number",
    )?;
    let sampling = SamplingKeys {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        needs_temperature: Some("the replies to one prompt must differ to make pairs"),
    };
    check_sampling(cfg, sampling)?;
    cfg.ensure(
        !c.labeller.is_empty(),
        "labeller",
        "list at least one reward",
    )?;
    inputs.checkpoint(cfg, "policy", &c.policy, true)?;
    inputs.file(cfg, "prompts", &c.prompts)?;
    check_rewards(cfg, inputs, "labeller", &c.labeller, None)?;
    Ok(())
}
