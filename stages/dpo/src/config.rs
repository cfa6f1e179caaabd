//! temper-dpo's configuration: the keys, their defaults, and the range checks made before
//! anything is read.

use serde::{Deserialize, Serialize};
use temper_core::checkpoint::{check_save, SaveOptions};
use temper_core::dist::Placement;
use temper_core::peft::{check_peft, PeftConfig};
use temper_core::preference::PreferenceLoss;
use temper_core::schedule::check_optim;
use temper_core::{DeviceSpec, OptimSettings, Precision};
use temper_data::{Fields, Overlong};
use temper_stage::cadence::{every_10, every_100};

use crate::losses::LossSettings;
use temper_stage::{ConfigFile, Every, InputPath, Inputs, StageError};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// The checkpoint to train (usually SFT), with its tokenizer.json.
    pub(crate) policy: InputPath,
    /// The frozen reference; defaults to `policy`'s starting checkpoint.
    #[serde(default)]
    pub(crate) reference: Option<InputPath>,
    /// Preference pairs (prompt, chosen, rejected); for `kto` also unpaired rows (prompt,
    /// completion, label).
    pub(crate) data: InputPath,
    #[serde(default)]
    pub(crate) eval_data: Option<InputPath>,
    #[serde(default)]
    pub(crate) fields: Fields,
    #[serde(default)]
    pub(crate) max_len: Option<usize>,
    #[serde(default)]
    pub(crate) overlong: Overlong,
    #[serde(default)]
    pub(crate) loss: PreferenceLoss,
    /// The strength of the preference against the reference (DPO's β; ORPO's λ).
    #[serde(default = "default_beta")]
    pub(crate) beta: f64,
    /// cDPO's ε (sigmoid only): the share of labels assumed flipped.
    #[serde(default)]
    pub(crate) label_smoothing: f64,
    /// SimPO's target margin γ.
    #[serde(default = "default_gamma")]
    pub(crate) gamma: f64,
    #[serde(default = "default_weight")]
    pub(crate) desirable_weight: f64,
    #[serde(default = "default_weight")]
    pub(crate) undesirable_weight: f64,
    /// Compute the reference's log-probs once (cached in the stage folder) instead of holding
    /// the reference model during training.
    #[serde(default)]
    pub(crate) precompute_reference: bool,
    /// Parameter-efficient training (lora: the reference is the policy with its adapters
    /// bypassed, so no second model is held; freeze); default: every parameter trains.
    #[serde(default)]
    pub(crate) peft: Option<PeftConfig>,
    pub(crate) steps: u64,
    /// Pairs (or, for kto, examples) per micro-batch.
    pub(crate) batch_size: usize,
    #[serde(default = "default_optim")]
    pub(crate) optim: OptimSettings,
    #[serde(default = "every_100")]
    pub(crate) eval_every: Every,
    #[serde(default = "every_100")]
    pub(crate) save_every: Every,
    #[serde(default = "every_10")]
    pub(crate) log_every: Every,
    /// Held-out prompts the policy answers at each evaluation, to measure its KL to the
    /// reference (0: none).
    #[serde(default = "default_kl_samples")]
    pub(crate) kl_samples: usize,
    #[serde(default = "temper_core::sample::default_max_new_tokens")]
    pub(crate) max_new_tokens: i64,
    /// How the final checkpoint is written: `dtype` (fp32, bf16, fp16; default the init's)
    /// and `max_shard_size` (`5GB`; default one file).
    #[serde(default)]
    pub(crate) save: SaveOptions,
    #[serde(default)]
    pub(crate) device: DeviceSpec,
    #[serde(default)]
    pub(crate) precision: Precision,
    #[serde(default)]
    pub(crate) seed: u64,
}

fn default_beta() -> f64 {
    0.1
}
fn default_gamma() -> f64 {
    0.5
}
fn default_weight() -> f64 {
    1.0
}
fn default_kl_samples() -> usize {
    32
}
fn default_optim() -> OptimSettings {
    OptimSettings {
        lr: 5e-6,
        min_lr: 5e-7,
        warmup_steps: 10,
        weight_decay: 0.0,
        ..OptimSettings::default()
    }
}

/// Range checks and the inputs' presence; nothing is read yet.
pub(crate) fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    // KTO's reference point is a batch estimate, not a per-example mean.
    let ranks = Placement::from_env().map_or(1, |p| p.world);
    cfg.ensure(
        !(ranks > 1 && c.loss == PreferenceLoss::Kto),
        "loss",
        "`kto` trains on one process only (its KL reference point is a batch estimate); run it without WORLD_SIZE > 1",
    )?;
    check_peft(cfg, "peft", c.peft.as_ref())?;
    check_optim(cfg, "optim", &c.optim)?;
    check_save(cfg, &c.save)?;
    cfg.ensure(c.steps >= 1, "steps", "must be at least 1")?;
    cfg.ensure(c.batch_size >= 1, "batch_size", "must be at least 1")?;
    cfg.ensure(
        c.beta.is_finite() && c.beta > 0.0,
        "beta",
        format!("must be positive, got {}", c.beta),
    )?;
    cfg.ensure(
        (0.0..0.5).contains(&c.label_smoothing),
        "label_smoothing",
        format!("must be in [0, 0.5), got {}", c.label_smoothing),
    )?;
    cfg.ensure(
        c.label_smoothing == 0.0 || c.loss == PreferenceLoss::Sigmoid,
        "label_smoothing",
        "applies to `loss: sigmoid` only (conservative DPO)",
    )?;
    cfg.ensure(c.gamma.is_finite(), "gamma", "must be a number")?;
    for (field, w) in [
        ("desirable_weight", c.desirable_weight),
        ("undesirable_weight", c.undesirable_weight),
    ] {
        cfg.ensure(w.is_finite() && w > 0.0, field, "must be positive")?;
    }
    cfg.ensure(
        c.loss != PreferenceLoss::Kto || c.batch_size >= 2,
        "batch_size",
        "kto estimates its KL term from the other examples of the batch: use at least 2",
    )?;
    cfg.ensure(
        !(c.precompute_reference && c.loss == PreferenceLoss::Kto),
        "precompute_reference",
        "not available with kto: its KL term pairs each prompt with another example's reply in the batch",
    )?;
    cfg.ensure(
        c.max_new_tokens >= 1,
        "max_new_tokens",
        "must be at least 1",
    )?;
    inputs.checkpoint(cfg, "policy", &c.policy, true)?;
    if let Some(r) = &c.reference {
        inputs.checkpoint(cfg, "reference", r, false)?;
    }
    inputs.file(cfg, "data", &c.data)?;
    if let Some(e) = &c.eval_data {
        inputs.file(cfg, "eval_data", e)?;
    }
    Ok(())
}

impl Config {
    /// What the loss needs besides log-probs.
    pub(crate) fn loss_settings(&self) -> LossSettings {
        LossSettings {
            loss: self.loss,
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            gamma: self.gamma,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
        }
    }
}
