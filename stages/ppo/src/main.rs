//! temper-ppo: RLHF with PPO. An actor (from SFT) generates replies to chat-templated prompts;
//! a frozen reward model scores them; a frozen reference (the same SFT weights) anchors them
//! through a per-token KL penalty; a critic (from the reward model, or the actor) estimates
//! values for GAE. Each iteration is the numbered steps in `main`'s loop. The full state
//! (actor, critic, optimizers, KL coefficient, reward statistics, iteration) is checkpointed
//! atomically; prompt order and sampling seeds are functions of the iteration, so a resumed run
//! reproduces the uninterrupted one on CPU.

mod rollout;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::checkpoint::ScoreHead;
use temper_core::rl::{self, AdaptiveKl, KlEstimator};
use temper_core::stage::{self, invalid, StageArgs, StageError};
use temper_core::{
    config_hash, load_checkpoint, resolve_device, save_checkpoint, AdamW, DeviceSpec, LoadSpec,
    OptimSettings, Precision, RunDir,
};
use temper_data::{shuffled, ChatTemplate, Fields, LoadOptions, Overlong, TextTokenizer};
use tracing::info;

use crate::rollout::{Models, RewardStats};

/// RLHF with PPO: actor, critic, frozen reference and reward model.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    stage: StageArgs,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CriticInit {
    /// The reward model's backbone and head (the usual choice: it already reads the reward).
    #[default]
    Reward,
    /// The policy's backbone with a fresh value head.
    Policy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OptimizerMode {
    /// One AdamW each for actor and critic, with their own settings.
    #[default]
    Separate,
    /// One AdamW over both; loss = policy loss + vf_coef · value loss, settings from `optim`.
    Shared,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KlSettings {
    #[serde(default)]
    estimator: KlEstimator,
    /// Initial (or fixed) coefficient of the per-token KL penalty.
    coef: f64,
    /// With a target, the coefficient adapts (Ziegler et al.) towards this KL per sequence.
    #[serde(default)]
    target: Option<f64>,
    #[serde(default = "default_horizon")]
    horizon: f64,
}

fn default_horizon() -> f64 {
    10_000.0
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
struct Config {
    /// SFT checkpoint: the actor's start and the frozen reference.
    policy: PathBuf,
    /// Reward-model checkpoint (with `score.weight`).
    reward_model: PathBuf,
    /// Prompts (.jsonl or .parquet): `prompt` as text or messages.
    prompts: PathBuf,
    #[serde(default)]
    fields: Fields,
    #[serde(default)]
    critic_init: CriticInit,
    #[serde(default)]
    optimizer: OptimizerMode,
    iterations: u64,
    /// Prompts per iteration (the rollout batch).
    batch_size: usize,
    #[serde(default = "default_minibatch")]
    minibatch_size: usize,
    #[serde(default = "default_ppo_epochs")]
    ppo_epochs: usize,
    #[serde(default = "default_max_new")]
    max_new_tokens: i64,
    #[serde(default = "default_temperature")]
    temperature: f64,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_prompt_len: Option<usize>,
    #[serde(default)]
    kl: KlSettings,
    #[serde(default = "default_gamma")]
    gamma: f64,
    #[serde(default = "default_lam")]
    lam: f64,
    #[serde(default = "default_clip")]
    cliprange: f64,
    #[serde(default = "default_clip")]
    cliprange_value: f64,
    /// Weight of the value loss (shared optimizer only).
    #[serde(default = "default_vf_coef")]
    vf_coef: f64,
    #[serde(default)]
    entropy_coef: f64,
    #[serde(default = "default_true")]
    whiten_advantages: bool,
    /// Added to the score of a reply that never emitted EOS (e.g. −1).
    #[serde(default)]
    missing_eos_penalty: Option<f64>,
    /// Normalise scores by running mean and std (before clipping).
    #[serde(default)]
    reward_normalize: bool,
    /// Clip scores to ±this.
    #[serde(default)]
    reward_clip: Option<f64>,
    /// Actor optimizer (and the shared one).
    #[serde(default = "default_actor_optim")]
    optim: OptimSettings,
    #[serde(default = "default_critic_optim")]
    critic_optim: OptimSettings,
    #[serde(default = "default_every")]
    save_every: u64,
    /// Write a few prompts, replies, scores and KL to samples.jsonl every N iterations.
    #[serde(default = "default_every")]
    sample_every: u64,
    #[serde(default)]
    device: DeviceSpec,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    seed: u64,
}

fn default_minibatch() -> usize {
    8
}
fn default_ppo_epochs() -> usize {
    2
}
fn default_max_new() -> i64 {
    32
}
fn default_temperature() -> f64 {
    1.0
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
fn default_every() -> u64 {
    10
}
fn default_actor_optim() -> OptimSettings {
    OptimSettings {
        lr: 1e-5,
        min_lr: 1e-5,
        warmup_steps: 0,
        weight_decay: 0.0,
        ..OptimSettings::default()
    }
}
fn default_critic_optim() -> OptimSettings {
    OptimSettings {
        lr: 1e-5,
        min_lr: 1e-5,
        warmup_steps: 0,
        weight_decay: 0.0,
        ..OptimSettings::default()
    }
}

fn main() {
    let args = Args::parse();
    stage::main_with("temper-ppo", || run(&args.stage));
}

fn validate(cfg: &Config) -> Result<(), StageError> {
    let bad = |m: String| Err(invalid(anyhow!(m)));
    cfg.optim.validate().map_err(|m| invalid(anyhow!(m)))?;
    cfg.critic_optim
        .validate()
        .map_err(|m| invalid(anyhow!("critic_{m}")))?;
    if cfg.iterations == 0 || cfg.batch_size == 0 || cfg.minibatch_size == 0 || cfg.ppo_epochs == 0
    {
        return bad(
            "iterations, batch_size, minibatch_size and ppo_epochs must be positive".into(),
        );
    }
    if cfg.max_new_tokens < 1 || cfg.temperature.is_nan() || cfg.temperature <= 0.0 {
        return bad(
            "max_new_tokens must be at least 1 and temperature positive (PPO samples)".into(),
        );
    }
    if cfg.kl.coef < 0.0 || cfg.kl.target.is_some_and(|t| t <= 0.0) {
        return bad("kl.coef must be ≥ 0 and kl.target > 0".into());
    }
    for (name, dir) in [("policy", &cfg.policy), ("reward_model", &cfg.reward_model)] {
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            if !dir.join(f).exists() {
                return bad(format!("{name}: {} lacks {f}", dir.display()));
            }
        }
    }
    if !cfg.prompts.exists() {
        return bad(format!("prompts: {} not found", cfg.prompts.display()));
    }
    Ok(())
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let cfg: Config = stage::read_config(&args.config)?;
    validate(&cfg)?;
    let device = resolve_device(cfg.device).map_err(invalid)?;
    tch::manual_seed(cfg.seed as i64);
    let tokenizer_path = cfg.policy.join("tokenizer.json");
    let tok = TextTokenizer::load(&tokenizer_path).map_err(invalid)?;
    if std::fs::read(&tokenizer_path).ok()
        != std::fs::read(cfg.reward_model.join("tokenizer.json")).ok()
    {
        return Err(invalid(anyhow!("policy and reward_model use different tokenizers; PPO needs them to agree token for token")));
    }
    let template = ChatTemplate::new(&tok).map_err(invalid)?;

    // The four models. Frozen ones are loaded with gradients off and only run under no_grad.
    let (actor_vs, actor) =
        load_checkpoint(&cfg.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    let (mut ref_vs, reference) =
        load_checkpoint(&cfg.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    ref_vs.freeze();
    let rm_spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let (mut rm_vs, reward) =
        load_checkpoint(&cfg.reward_model, rm_spec, device).map_err(invalid)?;
    rm_vs.freeze();
    let (critic_vs, critic) = match cfg.critic_init {
        CriticInit::Reward => load_checkpoint(&cfg.reward_model, rm_spec, device),
        CriticInit::Policy => load_checkpoint(
            &cfg.policy,
            LoadSpec {
                lm_head: false,
                score: ScoreHead::Fresh,
            },
            device,
        ),
    }
    .map_err(invalid)?;

    let max_prompt = cfg
        .max_prompt_len
        .unwrap_or((actor.config.max_position - cfg.max_new_tokens).max(1) as usize);
    let opts = LoadOptions {
        tokenizer: &tok,
        template,
        fields: &cfg.fields,
        max_len: max_prompt,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (prompts, report) = opts.prompts(&cfg.prompts).map_err(invalid)?;
    info!(
        "{}: {} prompts ({} longer than {max_prompt} tokens skipped)",
        cfg.prompts.display(),
        prompts.len(),
        report.skipped
    );
    if args.validate {
        println!(
            "{}",
            serde_yaml::to_string(&cfg).context("printing the resolved config")?
        );
        return Ok(());
    }

    let mut run = RunDir::create(&args.out)?;
    stage::write_resolved(&run.out, &cfg)?;
    let (mut actor_opt, mut critic_opt) = match cfg.optimizer {
        OptimizerMode::Separate => (
            AdamW::new(&actor_vs, cfg.optim.adamw()),
            Some(AdamW::new(&critic_vs, cfg.critic_optim.adamw())),
        ),
        OptimizerMode::Shared => (
            AdamW::over(
                &[("actor.", &actor_vs), ("critic.", &critic_vs)],
                cfg.optim.adamw(),
            ),
            None,
        ),
    };
    let hash = config_hash(&cfg);
    let mut kl_ctl = AdaptiveKl {
        coef: cfg.kl.coef,
        target: cfg.kl.target.unwrap_or(1.0),
        horizon: cfg.kl.horizon,
    };

    let loaded = {
        let mut opts_mut: Vec<&mut AdamW> = std::iter::once(&mut actor_opt)
            .chain(critic_opt.as_mut())
            .collect();
        run.resume_or_start(&[&actor_vs, &critic_vs], &mut opts_mut, &hash)?
    };
    let mut progress = loaded;
    kl_ctl.coef = progress
        .extra
        .get("kl_coef")
        .and_then(|v| v.as_f64())
        .unwrap_or(kl_ctl.coef);
    let mut stats: RewardStats = progress
        .extra
        .get("reward_stats")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();

    let models = Models {
        actor: &actor,
        reference: &reference,
        reward: &reward,
        critic: &critic,
        template,
        precision: cfg.precision,
    };
    let bar = stage::progress_bar(cfg.iterations, progress.step);
    while progress.step < cfg.iterations {
        let iter = progress.step;
        // 1. A batch of prompts (a seeded pass over the prompt set) and the actor's replies.
        let per_pass = prompts.len().div_ceil(cfg.batch_size) as u64;
        let order = shuffled(
            prompts.len(),
            cfg.seed ^ (iter / per_pass).wrapping_mul(0x9E37),
        );
        let start = ((iter % per_pass) as usize) * cfg.batch_size;
        let batch: Vec<&Vec<u32>> = order[start..(start + cfg.batch_size).min(order.len())]
            .iter()
            .map(|&i| &prompts[i].0)
            .collect();
        let gen_start = Instant::now();
        let seeds: Vec<u64> = (0..batch.len() as u64)
            .map(|i| cfg.seed ^ (iter << 20) ^ i)
            .collect();
        let sampling = temper_core::SamplingConfig {
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            eos_token_id: Some(template.eos as i64),
            pad_token_id: template.pad as i64,
        };
        let ro = rollout::rollout(&models, &batch, &sampling, &seeds)?;
        let gen_secs = gen_start.elapsed().as_secs_f64();
        let train_start = Instant::now();

        // 2. Scores from the reward model at each sequence's last real token, then the
        //    optional missing-EOS penalty, normalisation and clipping.
        let raw_score = ro.scores.shallow_clone(); // (B,)
        let mut score = raw_score.shallow_clone();
        if let Some(p) = cfg.missing_eos_penalty {
            score = &score + ro.has_eos.logical_not().to_kind(Kind::Float) * p;
        }
        if cfg.reward_normalize {
            stats.update(&Vec::<f64>::try_from(score.to_kind(Kind::Double))?);
            score = (score - stats.mean) / stats.std().max(1e-6);
        }
        if let Some(c) = cfg.reward_clip {
            score = score.clamp(-c, c);
        }

        // 3. Per-token KL to the reference, as a penalty; the score on the last real token.
        let kl = rl::kl_penalty(&ro.logprobs, &ro.ref_logprobs, &ro.mask, cfg.kl.estimator); // (B, N)
        let rewards = rl::token_rewards(&score, &kl, &ro.mask, kl_ctl.coef);

        // 4. Advantages by GAE over response tokens, returns, whitening.
        let (mut adv, returns) = rl::gae(&rewards, &ro.values, &ro.mask, cfg.gamma, cfg.lam);
        if cfg.whiten_advantages {
            adv = rl::masked_whiten(&adv, &ro.mask);
        }

        // 5. PPO epochs over shuffled minibatches.
        let m = rollout::optimize(
            &models,
            &ro,
            &adv,
            &returns,
            rollout::OptimizeSettings {
                epochs: cfg.ppo_epochs,
                minibatch: cfg.minibatch_size,
                cliprange: cfg.cliprange,
                cliprange_value: cfg.cliprange_value,
                vf_coef: cfg.vf_coef,
                entropy_coef: cfg.entropy_coef,
                temperature: cfg.temperature,
                actor_lr: cfg.optim.lr_at(iter, cfg.iterations),
                actor_clip: cfg.optim.grad_clip,
                critic_lr: cfg.critic_optim.lr_at(iter, cfg.iterations),
                critic_clip: cfg.critic_optim.grad_clip,
                seed: cfg.seed ^ (iter << 8),
                iteration: iter,
                last_saved: iter / cfg.save_every * cfg.save_every,
            },
            &mut actor_opt,
            critic_opt.as_mut(),
        )?;

        // 6. The KL coefficient: adaptive towards the target, or fixed.
        let seq_kl = (kl.sum_dim_intlist(1, false, Kind::Float))
            .mean(Kind::Float)
            .double_value(&[]);
        if cfg.kl.target.is_some() {
            kl_ctl.update(seq_kl, batch.len());
        }

        let train_secs = train_start.elapsed().as_secs_f64();
        progress.step += 1;
        let step = progress.step;
        let gen_tokens = ro
            .mask
            .to_kind(Kind::Float)
            .sum(Kind::Float)
            .double_value(&[]);
        progress.tokens_seen += gen_tokens as u64;
        let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
        let fields = [
            ("reward/mean", scalar(&score.mean(Kind::Float))),
            ("reward/std", scalar(&score.std(true))),
            ("score/mean", scalar(&raw_score.mean(Kind::Float))),
            ("kl/mean", seq_kl),
            ("kl/coef", kl_ctl.coef),
            ("policy/loss", m.policy_loss),
            ("policy/clipfrac", m.clipfrac),
            ("policy/approx_kl", m.approx_kl),
            ("policy/entropy", m.entropy),
            ("value/loss", m.value_loss),
            ("value/clipfrac", m.value_clipfrac),
            (
                "value/explained_var",
                scalar(&rl::explained_variance(&ro.values, &returns, &ro.mask)),
            ),
            ("response/len_mean", gen_tokens / batch.len() as f64),
            (
                "response/eos_rate",
                scalar(&ro.has_eos.to_kind(Kind::Float).mean(Kind::Float)),
            ),
            ("lr", cfg.optim.lr_at(iter, cfg.iterations)),
            ("grad_norm", m.grad_norm),
            ("tokens", progress.tokens_seen as f64),
            ("tokens_per_s", gen_tokens / gen_secs),
            (
                "train_tokens_per_s",
                scalar(&ro.attention.to_kind(Kind::Float).sum(Kind::Float)) * cfg.ppo_epochs as f64
                    / train_secs,
            ),
        ];
        run.log(step, "train", &fields)?;
        bar.set_position(step);
        info!("iteration {step}/{}: reward {:.3}, score {:.3}, kl {seq_kl:.3} (coef {:.4}), len {:.1}", cfg.iterations, fields[0].1, fields[2].1, kl_ctl.coef, fields[12].1);
        if step % cfg.sample_every == 0 || step == cfg.iterations {
            let records = rollout::sample_records(&tok, &ro, &raw_score, &kl, step, 4)?;
            run.log_samples(&records)?;
        }
        progress.extra.insert("kl_coef".into(), json!(kl_ctl.coef));
        progress.extra.insert(
            "reward_stats".into(),
            serde_json::to_value(&stats).context("stats")?,
        );
        if step % cfg.save_every == 0 || step == cfg.iterations {
            let opts: Vec<&AdamW> = std::iter::once(&actor_opt)
                .chain(critic_opt.as_ref())
                .collect();
            run.save_state(&[&actor_vs, &critic_vs], &opts, &progress)?;
        }
    }
    bar.finish_and_clear();

    run.save_final(&actor, &actor_vs, &tokenizer_path)?;
    save_checkpoint(&critic, &critic_vs, &run.out.join("critic"))?;
    let rows = std::fs::read_to_string(run.out.join("metrics.jsonl")).context("reading metrics")?;
    let last: serde_json::Value = rows
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let mut summary = serde_json::Map::new();
    for k in [
        "reward/mean",
        "score/mean",
        "kl/mean",
        "kl/coef",
        "response/len_mean",
        "response/eos_rate",
    ] {
        summary.insert(k.into(), last[k].clone());
    }
    summary.insert("iterations".into(), progress.step.into());
    summary.insert("tokens".into(), progress.tokens_seen.into());
    run.write_summary("ok", summary)?;
    Ok(())
}
