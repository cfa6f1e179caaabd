//! temper-grpo's settings and their checks. Names follow TRL's GRPOConfig where one exists
//! (`num_generations`, `epsilon`, `epsilon_high`, `beta`, `scale_rewards` → `scale`,
//! `loss_type` → `loss_aggregation`, `importance_sampling_level` → `importance`,
//! `num_iterations` → `updates_per_iteration`).

use serde::{Deserialize, Serialize};
use temper_core::checkpoint::{check_save, SaveOptions};
use temper_core::critic_free::{Aggregation, RatioLevel, Scale};
use temper_core::peft::{check_peft, PeftConfig};
use temper_core::sample::{check_sampling, SamplingKeys};
use temper_core::schedule::check_optim;
use temper_core::{DeviceSpec, OptimSettings, Precision};
use temper_data::Fields;
use temper_rewards::{check_rewards, RewardSpec};
use temper_stage::cadence::every_10;
use temper_stage::{ConfigFile, Every, InputPath, Inputs, StageError};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Group-relative advantages: (r − mean of the group) / (std + 1e-4), as `scale` says.
    #[default]
    Grpo,
    /// Leave-one-out baseline: r − mean of the other replies to the same prompt.
    Rloo,
    /// Per-token rewards (−β·KL on every token, the score on the last), returns-to-go
    /// whitened over the batch: no group statistics.
    ReinforcePp,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The checkpoint to train (SFT), with its tokenizer.json.
    pub policy: InputPath,
    /// The KL anchor when `beta` > 0; defaults to `policy`'s starting weights.
    #[serde(default)]
    pub reference: Option<InputPath>,
    /// Prompts (.jsonl or .parquet): `prompt` as text or messages, plus the fields rewards
    /// read (e.g. `answer`).
    pub prompts: InputPath,
    #[serde(default)]
    pub fields: Fields,
    /// What scores a reply: a list of `{kind: exact_match|regex|length|lexicon|command|model,
    /// weight, …}`; the reward is their weighted sum.
    pub rewards: Vec<RewardSpec>,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Replies per prompt (G).
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    /// Prompts per iteration; the rollout holds prompts × G replies.
    pub prompts_per_iteration: usize,
    pub iterations: u64,
    /// Passes of the loss over each rollout (μ); 1 is on-policy (the ratio is 1).
    #[serde(default = "one")]
    pub updates_per_iteration: usize,
    /// Replies per gradient step; default the whole rollout.
    #[serde(default)]
    pub minibatch_size: Option<usize>,
    #[serde(default)]
    pub scale: Scale,
    #[serde(default)]
    pub loss_aggregation: Aggregation,
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// DAPO's clip-higher; default `epsilon`.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// Token ratios (GRPO) or one length-normalised ratio per sequence (GSPO).
    #[serde(default)]
    pub importance: RatioLevel,
    /// KL weight: a k3 penalty in the loss (GRPO, RLOO) or a per-token reward penalty
    /// (REINFORCE++). 0 loads no reference.
    #[serde(default)]
    pub beta: f64,
    /// Leave out of the loss the groups whose replies all scored the same (DAPO).
    #[serde(default)]
    pub dynamic_sampling: bool,
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
    #[serde(default = "default_optim")]
    pub optim: OptimSettings,
    #[serde(default)]
    pub peft: Option<PeftConfig>,
    #[serde(default = "every_10")]
    pub save_every: Every,
    #[serde(default = "every_10")]
    pub sample_every: Every,
    /// How the final checkpoint is written: `dtype` (fp32, bf16, fp16; default the init's)
    /// and `max_shard_size` (`5GB`; default one file).
    #[serde(default)]
    pub save: SaveOptions,
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub seed: u64,
}

fn default_generations() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_optim() -> OptimSettings {
    OptimSettings {
        lr: 1e-5,
        min_lr: 1e-5,
        warmup_steps: 0,
        weight_decay: 0.0,
        ..OptimSettings::default()
    }
}

impl Config {
    pub fn needs_reference(&self) -> bool {
        self.beta > 0.0
    }

    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    pub fn rollout_size(&self) -> usize {
        self.prompts_per_iteration * self.num_generations
    }

    /// Optimizer updates over the whole run (at most: dynamic sampling may shrink a batch).
    pub fn planned_updates(&self) -> usize {
        let minibatch = self.minibatch_size.unwrap_or(self.rollout_size()).max(1);
        self.iterations as usize
            * self.updates_per_iteration
            * self.rollout_size().div_ceil(minibatch)
    }
}

/// Range checks and the inputs' presence; nothing is read yet.
pub fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    check_peft(cfg, "peft", c.peft.as_ref())?;
    check_optim(cfg, "optim", &c.optim)?;
    check_save(cfg, &c.save)?;
    for (field, v) in [
        ("iterations", c.iterations),
        ("prompts_per_iteration", c.prompts_per_iteration as u64),
        ("updates_per_iteration", c.updates_per_iteration as u64),
        ("num_generations", c.num_generations as u64),
    ] {
        cfg.ensure(v >= 1, field, "must be at least 1")?;
    }
    // A group of one has no mean to compare with: every advantage would be 0.
    let grouped = c.algorithm != Algorithm::ReinforcePp;
    cfg.ensure(
        !grouped || c.num_generations >= 2,
        "num_generations",
        format!(
            "must be at least 2 for {:?}: advantages compare replies to the same prompt",
            c.algorithm
        ),
    )?;
    cfg.ensure(
        c.minibatch_size
            .is_none_or(|m| m >= 1 && m <= c.rollout_size()),
        "minibatch_size",
        format!(
            "must be in 1..={} (prompts_per_iteration × num_generations)",
            c.rollout_size()
        ),
    )?;
    let sampling = SamplingKeys {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        needs_temperature: Some("the group needs different replies"),
    };
    check_sampling(cfg, sampling)?;
    cfg.ensure(
        c.epsilon > 0.0 && c.epsilon < 1.0,
        "epsilon",
        "must be in (0, 1)",
    )?;
    cfg.ensure(
        c.epsilon_high.is_none_or(|e| e > 0.0 && e.is_finite()),
        "epsilon_high",
        "must be positive",
    )?;
    cfg.ensure(c.beta.is_finite() && c.beta >= 0.0, "beta", "must be ≥ 0")?;
    cfg.ensure(!c.rewards.is_empty(), "rewards", "list at least one reward")?;
    inputs.checkpoint(cfg, "policy", &c.policy, true)?;
    if let Some(r) = &c.reference {
        inputs.checkpoint(cfg, "reference", r, false)?;
    }
    inputs.file(cfg, "prompts", &c.prompts)?;
    check_rewards(cfg, inputs, "rewards", &c.rewards, None)?;
    Ok(())
}
