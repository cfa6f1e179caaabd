//! temper-ppo's settings and their checks. Names follow TRL's PPOConfig where one exists
//! (`cliprange`, `cliprange_value`, `vf_coef`, `gamma`, `lam`, `whiten_advantages`,
//! `missing_eos_penalty`).

use serde::{Deserialize, Serialize};
use temper_core::checkpoint::{check_save, SaveOptions};
use temper_core::peft::{check_peft, PeftConfig};
use temper_core::rl::{KlControl, KlEstimator};
use temper_core::sample::{check_sampling, SamplingKeys};
use temper_core::schedule::check_optim;
use temper_core::{DeviceSpec, OptimSettings, Precision};
use temper_data::Fields;
use temper_rewards::{check_rewards, RewardSpec};
use temper_stage::cadence::every_10;
use temper_stage::{ConfigFile, Every, InputPath, Inputs, StageError};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CriticInit {
    /// The reward model's backbone and head (the usual choice: it already reads the reward).
    #[default]
    Reward,
    /// The policy's backbone with a fresh value head.
    Policy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerMode {
    /// One AdamW each for actor and critic, with their own settings.
    #[default]
    Separate,
    /// One AdamW over both; loss = policy loss + vf_coef · value loss, settings from `optim`.
    Shared,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlSettings {
    #[serde(default)]
    pub estimator: KlEstimator,
    /// Initial (or fixed) coefficient of the per-token KL penalty.
    pub coef: f64,
    /// With a target, the coefficient adapts (Ziegler et al.) towards this KL per sequence.
    #[serde(default)]
    pub target: Option<f64>,
    #[serde(default = "default_horizon")]
    pub horizon: f64,
}

fn default_horizon() -> f64 {
    10_000.0
}

impl KlSettings {
    /// The controller these settings describe: adaptive with a target, else fixed.
    pub fn control(&self) -> KlControl {
        match self.target {
            Some(target) => KlControl::Adaptive {
                coef: self.coef,
                target,
                horizon: self.horizon,
            },
            None => KlControl::Fixed { coef: self.coef },
        }
    }
}

impl Default for KlSettings {
    fn default() -> Self {
        Self {
            estimator: KlEstimator::K1,
            coef: 0.05,
            target: None,
            horizon: default_horizon(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// SFT checkpoint: the actor's start and the frozen reference.
    pub policy: InputPath,
    /// Reward-model checkpoint (with `score.weight`); optional when `rewards` lists program
    /// rewards (then the critic starts from the policy: `critic_init: policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<InputPath>,
    /// Program rewards added to the reward model's score, weighted (`length`, `regex`,
    /// `exact_match`, `lexicon`, `command`; the same list as temper-grpo's, without `model`):
    /// e.g. a `length` range so the actor cannot win by writing replies too short to judge,
    /// or, without a reward model, an exact answer.
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
    /// Prompts (.jsonl or .parquet): `prompt` as text or messages.
    pub prompts: InputPath,
    #[serde(default)]
    pub fields: Fields,
    #[serde(default)]
    pub critic_init: CriticInit,
    #[serde(default)]
    pub optimizer: OptimizerMode,
    /// Parameter-efficient actor (lora: the reference is the actor with its adapters
    /// bypassed, so no second copy is held; freeze); default: every parameter trains.
    #[serde(default)]
    pub peft: Option<PeftConfig>,
    /// Parameter-efficient critic (e.g. a LoRA on the reward model); default: full.
    #[serde(default)]
    pub critic_peft: Option<PeftConfig>,
    pub iterations: u64,
    /// Prompts per iteration (the rollout batch).
    pub batch_size: usize,
    #[serde(default = "default_minibatch")]
    pub minibatch_size: usize,
    #[serde(default = "default_ppo_epochs")]
    pub ppo_epochs: usize,
    #[serde(default = "temper_core::sample::default_max_new_tokens")]
    pub max_new_tokens: i64,
    #[serde(default = "temper_core::sample::full_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub max_prompt_len: Option<usize>,
    #[serde(default)]
    pub kl: KlSettings,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    #[serde(default = "default_lam")]
    pub lam: f64,
    #[serde(default = "default_clip")]
    pub cliprange: f64,
    #[serde(default = "default_clip")]
    pub cliprange_value: f64,
    /// Weight of the value loss (shared optimizer only).
    #[serde(default = "default_vf_coef")]
    pub vf_coef: f64,
    #[serde(default)]
    pub entropy_coef: f64,
    #[serde(default = "default_true")]
    pub whiten_advantages: bool,
    /// Added to the score of a reply that never emitted EOS (e.g. −1).
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// Normalise scores by running mean and std (before clipping).
    #[serde(default)]
    pub reward_normalize: bool,
    /// Clip scores to ±this.
    #[serde(default)]
    pub reward_clip: Option<f64>,
    /// Actor optimizer (and the shared one).
    #[serde(default = "default_optim")]
    pub optim: OptimSettings,
    #[serde(default = "default_optim")]
    pub critic_optim: OptimSettings,
    #[serde(default = "every_10")]
    pub save_every: Every,
    /// Write a few prompts, replies, scores and KL to samples.jsonl every N iterations.
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

fn default_minibatch() -> usize {
    8
}
fn default_ppo_epochs() -> usize {
    2
}
fn default_gamma() -> f64 {
    1.0
}
fn default_lam() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    0.2
}
fn default_vf_coef() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}
/// Actor and critic alike: a constant 1e-5, no warm-up, no weight decay.
fn default_optim() -> OptimSettings {
    OptimSettings {
        lr: 1e-5,
        min_lr: 1e-5,
        warmup_steps: 0,
        weight_decay: 0.0,
        ..OptimSettings::default()
    }
}

/// Range checks and the inputs' presence; nothing is read yet.
pub fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    check_peft(cfg, "peft", c.peft.as_ref())?;
    check_peft(cfg, "critic_peft", c.critic_peft.as_ref())?;
    check_optim(cfg, "optim", &c.optim)?;
    check_save(cfg, &c.save)?;
    check_optim(cfg, "critic_optim", &c.critic_optim)?;
    for (field, v) in [
        ("iterations", c.iterations),
        ("batch_size", c.batch_size as u64),
        ("minibatch_size", c.minibatch_size as u64),
        ("ppo_epochs", c.ppo_epochs as u64),
    ] {
        cfg.ensure(v >= 1, field, "must be at least 1")?;
    }
    let sampling = SamplingKeys {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        needs_temperature: Some("PPO samples"),
    };
    check_sampling(cfg, sampling)?;
    cfg.ensure(
        c.kl.coef.is_finite() && c.kl.coef >= 0.0,
        "kl.coef",
        "must be ≥ 0",
    )?;
    cfg.ensure(
        c.kl.target.is_none_or(|t| t > 0.0),
        "kl.target",
        "must be positive",
    )?;
    cfg.ensure(c.kl.horizon > 0.0, "kl.horizon", "must be positive")?;
    cfg.ensure((0.0..=1.0).contains(&c.gamma), "gamma", "must be in [0, 1]")?;
    cfg.ensure((0.0..=1.0).contains(&c.lam), "lam", "must be in [0, 1]")?;
    for (field, v) in [
        ("cliprange", c.cliprange),
        ("cliprange_value", c.cliprange_value),
    ] {
        cfg.ensure(v > 0.0 && v.is_finite(), field, "must be positive")?;
    }
    cfg.ensure(
        c.reward_clip.is_none_or(|v| v > 0.0),
        "reward_clip",
        "must be positive",
    )?;
    inputs.checkpoint(cfg, "policy", &c.policy, true)?;
    cfg.ensure(
        c.reward_model.is_some() || !c.rewards.is_empty(),
        "reward_model",
        "PPO needs a reward: give `reward_model`, program `rewards`, or both",
    )?;
    cfg.ensure(
        c.reward_model.is_some() || c.critic_init == CriticInit::Policy,
        "critic_init",
        "`reward` (the default) starts the critic from the reward model, and there is none; set `critic_init: policy`",
    )?;
    if let Some(rm) = &c.reward_model {
        inputs.checkpoint(cfg, "reward_model", rm, true)?;
    }
    inputs.file(cfg, "prompts", &c.prompts)?;
    cfg.ensure(
        !matches!(c.critic_peft, Some(PeftConfig::Adalora(_))),
        "critic_peft.method",
        "adalora trains only the actor here (the critic's updates have no rank schedule); give the critic lora",
    )?;
    check_rewards(
        cfg,
        inputs,
        "rewards",
        &c.rewards,
        Some("PPO's reward model is `reward_model` (its critic starts from it); list only program rewards here"),
    )?;
    Ok(())
}
