//! temper-ppo: RLHF with PPO. An actor (from SFT) generates replies to chat-templated prompts;
//! a frozen reward model scores them; a frozen reference (the same SFT weights) anchors them
//! through a per-token KL penalty; a critic (from the reward model, or the actor) estimates
//! values for GAE. Each iteration is the numbered steps in `main`'s loop. The full state
//! (actor, critic, optimizers, KL coefficient, reward statistics, iteration) is checkpointed
//! atomically; prompt order and sampling seeds are functions of the iteration, so a resumed run
//! reproduces the uninterrupted one on CPU. Data parallel under torchrun/Slurm: each rank
//! samples and scores its share of the prompts; reward statistics, whitening, the KL controller,
//! the metrics and every update are the whole batch's.

mod config;
mod rollout;
mod whole;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::{Device, Tensor};
use temper_core::checkpoint::SaveDtype;
use temper_core::checkpoint::ScoreHead;
use temper_core::dist::{GradSync, Placement, Ranks, World};
use temper_core::peft::{Reference, Tuning};
use temper_core::rewards::ProgramRewards;
use temper_core::rl::{self, RewardStats};
use temper_core::{
    load_checkpoint, load_with_tokenizer, resume_or_start, save_state, AdamW, LoadSpec, Loaded,
    Precision, SamplingConfig, Transformer,
};
use temper_data::{pass_batch, seed_for, seeds_for, ChatTemplate, LoadOptions, Overlong};
use temper_stage::{
    checked_config, invalid, Cadence, ConfigFile, Every, MetricsLog, StageArgs, StageError,
    StageKind,
};

use crate::config::{check, Config, CriticInit, OptimizerMode};
use crate::rollout::Models;

fn main() {
    temper_stage::stage_main(
        "temper-ppo",
        "RLHF with PPO: actor, critic, frozen reference and reward model.",
        run,
    )
}

/// The four models and the rendered prompts. Frozen models are loaded with gradients off and
/// only run under no_grad.
struct Setup {
    actor: Loaded,
    /// The frozen reference, unless the actor is LoRA (then: the actor, adapters bypassed).
    reference: Option<Transformer>,
    /// The reward model, unless only program rewards score.
    reward: Option<Transformer>,
    critic: Critic,
    template: ChatTemplate,
    prompts: Vec<Vec<u32>>,
    /// Each prompt's reward sign (the reward model's `temper_score_sign`; 1 without one).
    signs: Vec<f64>,
    /// Each prompt's other fields, which program rewards read (an answer, a label).
    fields: Vec<BTreeMap<String, Value>>,
}

impl Setup {
    fn models(&self, precision: Precision) -> Models<'_> {
        Models {
            actor: &self.actor.model,
            actor_tuning: &self.actor.tuning,
            reference: match &self.reference {
                Some(r) => Reference::Model(r),
                None => Reference::Bypassed(&self.actor.model, &self.actor.tuning),
            },
            reward: self.reward.as_ref(),
            critic: &self.critic.model,
            template: self.template.clone(),
            precision,
        }
    }
}

/// The value model and what of it trains.
struct Critic {
    vs: VarStore,
    model: Transformer,
    tuning: Tuning,
}

/// The actor's optimizer and, unless they share it, the critic's.
fn optimizers(c: &Config, actor: &Loaded, critic: &Critic) -> (AdamW, Option<AdamW>) {
    match c.optimizer {
        OptimizerMode::Separate => (
            actor.optimizer(c.optim.adamw()),
            Some(critic.tuning.optimizer(&critic.vs, c.critic_optim.adamw())),
        ),
        OptimizerMode::Shared => {
            fn named<'a>(prefix: &str, stores: Vec<&'a VarStore>) -> Vec<(String, &'a VarStore)> {
                let names = ["", "adapter."].map(|a| format!("{prefix}{a}"));
                stores.into_iter().zip(names).map(|(v, n)| (n, v)).collect()
            }
            let mut all = named("actor.", actor.stores());
            all.extend(named("critic.", critic.tuning.stores(&critic.vs)));
            let refs: Vec<(&str, &VarStore)> = all.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            (AdamW::over(&refs, c.optim.adamw()), None)
        }
    }
}

fn prepare(
    cfg: &ConfigFile<Config>,
    device: Device,
) -> Result<(Setup, ProgramRewards), StageError> {
    let c = &cfg.value;
    let program = ProgramRewards::new(&c.rewards)
        .map_err(|(i, e)| cfg.error(&format!("rewards.{i}"), e.to_string()))?;
    tch::manual_seed(c.seed as i64);
    let mut actor = load_with_tokenizer(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    actor
        .tune(
            c.peft.as_ref(),
            c.iterations as usize * c.ppo_epochs * c.batch_size.div_ceil(c.minibatch_size.max(1)),
        )
        .map_err(|e| cfg.error(&e.field, e.message))?;
    if let Some(rm) = &c.reward_model {
        let same_tokenizer = std::fs::read(&actor.tokenizer_path).ok()
            == std::fs::read(rm.join("tokenizer.json")).ok();
        cfg.ensure(
            same_tokenizer,
            "reward_model",
            "uses a different tokenizer from the policy; PPO needs them to agree token for token",
        )?;
    }
    let template = ChatTemplate::new(&actor.tokenizer).map_err(invalid)?;
    let reference = match actor.tuning.is_lora() {
        true => {
            tracing::info!("reference: the actor with its adapters bypassed (no second copy)");
            None
        }
        false => {
            let (mut ref_vs, reference) =
                load_checkpoint(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
            ref_vs.freeze();
            Some(reference)
        }
    };
    let rm_spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let reward = match &c.reward_model {
        Some(rm) => {
            let (mut rm_vs, reward) = load_checkpoint(rm, rm_spec, device).map_err(invalid)?;
            rm_vs.freeze();
            Some(reward)
        }
        None => None,
    };
    let critic_from = critic_base(c);
    cfg.ensure(
        !(c.critic_init == CriticInit::Reward
            && temper_core::peft::is_unmergeable_adapter(critic_from)),
        "critic_init",
        "the reward model is a bottleneck-adapter checkpoint, whose adapters cannot be folded into a critic to train; set `critic_init: policy`",
    )?;
    let (mut critic_vs, mut critic_model) = match c.critic_init {
        CriticInit::Reward => load_checkpoint(critic_from, rm_spec, device),
        CriticInit::Policy => {
            let spec = LoadSpec {
                lm_head: false,
                score: ScoreHead::Fresh,
            };
            load_checkpoint(&c.policy, spec, device)
        }
    }
    .map_err(invalid)?;
    let critic_tuning =
        temper_core::peft::apply(&mut critic_model, &mut critic_vs, c.critic_peft.as_ref())
            .map_err(|e| cfg.error(&e.field.replacen("peft", "critic_peft", 1), e.message))?;
    let critic = Critic {
        vs: critic_vs,
        model: critic_model,
        tuning: critic_tuning,
    };
    let max_position = actor.model.token_room();
    cfg.ensure(
        c.max_new_tokens < max_position,
        "max_new_tokens",
        format!("must leave room for a prompt in the model's {max_position} positions"),
    )?;
    let max_prompt = c
        .max_prompt_len
        .unwrap_or((max_position - c.max_new_tokens) as usize);
    let opts = LoadOptions {
        tokenizer: &actor.tokenizer,
        template: template.clone(),
        fields: &c.fields,
        max_len: max_prompt,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (prompts, report) = opts.prompts(&c.prompts).map_err(invalid)?;
    let signs = match reward.as_ref().and_then(|r| r.config.score_sign.as_ref()) {
        Some(sign) => prompts
            .iter()
            .map(|(_, r)| sign.sign(&r.meta))
            .collect::<Result<Vec<f64>, _>>()
            .map_err(|e| cfg.error("prompts", e))?,
        None => vec![1.0; prompts.len()],
    };
    for (row, (_, record)) in prompts.iter().enumerate() {
        if let Err(problem) = program.check_fields(&record.meta) {
            let at = format!("{} row {}: {problem}", c.prompts.display(), row + 1);
            return Err(cfg.error("prompts", at));
        }
    }
    tracing::info!(
        "{}: {} prompts ({} longer than {max_prompt} tokens skipped)",
        c.prompts.display(),
        prompts.len(),
        report.skipped
    );
    let (prompts, fields) = prompts.into_iter().map(|(ids, r)| (ids, r.meta)).unzip();
    let setup = Setup {
        actor,
        reference,
        reward,
        critic,
        template,
        signs,
        prompts,
        fields,
    };
    Ok((setup, program))
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Ppo, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    // Data parallel (torchrun / Slurm): `batch_size` prompts per rank; a bad environment stops
    // here, before anything is read.
    let placement = Placement::from_env().map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let device = placement
        .device(cfg.value.device)
        .map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let (s, mut program) = prepare(&cfg, device)?;
    if args.validate {
        return cfg.print_resolved();
    }
    let world = World::join_placed(placement, device).map_err(|e| invalid(anyhow::anyhow!(e)))?;

    let c = &cfg.value;
    let stores: Vec<&VarStore> = s
        .actor
        .stores()
        .into_iter()
        .chain(s.critic.tuning.stores(&s.critic.vs))
        .collect();
    let ranks = Ranks::open(&world, &args.out, "ppo")?;
    if world.is_main() {
        cfg.write_resolved(&ranks.out)?;
    }
    let mut log = MetricsLog::open(&ranks.log_dir)?;
    let (mut actor_opt, mut critic_opt) = optimizers(c, &s.actor, &s.critic);
    let mut progress = {
        let mut opts: Vec<&mut AdamW> = std::iter::once(&mut actor_opt)
            .chain(critic_opt.as_mut())
            .collect();
        ranks.resume(&world, |out| {
            resume_or_start(out, &mut log, &stores, &mut opts, &cfg.hash)
        })?
    };
    for opt in std::iter::once(&actor_opt).chain(critic_opt.as_ref()) {
        world.start_together(progress.step, &opt.parameters())?;
    }
    // Gradients averaged over the ranks in buckets, reduced while each backward runs.
    let actor_sync = world.grad_sync(&actor_opt.parameters())?;
    let critic_sync = match &critic_opt {
        Some(opt) => Some(world.grad_sync(&opt.parameters())?),
        None => None,
    };
    let kl_control = c.kl.control();
    let mut kl_coef = extra(&progress, "kl_coef").unwrap_or(kl_control.initial_coef());
    let mut stats: RewardStats = extra(&progress, "reward_stats").unwrap_or_default();
    let models = s.models(c.precision);
    let every = Cadence::new(Every::new(1), c.sample_every, c.save_every, c.iterations);
    let mut bar = ranks.progress(c.iterations, progress.step);
    while progress.step < c.iterations {
        let iter = progress.step;
        // 1. A batch of prompts (a seeded pass over the prompt set) and the actor's replies.
        //    With several ranks the pass takes prompts for all of them and each rank samples
        //    its share with the seeds one process would use for those rows.
        let picked = pass_batch(s.prompts.len(), c.batch_size * world.size(), c.seed, iter);
        let seeds = seeds_for(c.seed, "rollout", iter, picked.len());
        let mine = world.shard(picked.len());
        let local = &picked[mine.clone()];
        let batch: Vec<&Vec<u32>> = local.iter().map(|&i| &s.prompts[i]).collect();
        s.actor.tuning.set_training(false); // adapter dropout off while sampling and scoring
        s.critic.tuning.set_training(false);
        let sampling = sampling(c, &s.template);
        let mut ro = rollout::rollout(&models, &batch, &sampling, &seeds[mine.clone()])?;
        let signs: Vec<f32> = local.iter().map(|&i| s.signs[i] as f32).collect();
        ro.scores = &ro.scores * Tensor::from_slice(&signs).to_device(ro.scores.device());
        let fields: Vec<&BTreeMap<String, Value>> = local.iter().map(|&i| &s.fields[i]).collect();
        let stops = s.template.stop_ids();
        let program =
            rollout::program_scores(&mut program, &ro, &fields, &s.actor.tokenizer, &stops)?;
        let train_start = Instant::now();

        // 2. Scores from the reward model plus the program rewards, then the optional
        //    missing-EOS penalty, normalisation and clipping.
        let rows = picked.len();
        let score = whole::shape_scores(&ro, program.as_ref(), c, &mut stats, &world, rows)?;

        // 3. Per-token KL to the reference, as a penalty; the score on the last real token.
        let kl = rl::kl_penalty(&ro.logprobs, &ro.ref_logprobs, &ro.mask, c.kl.estimator); // (B, N)
        let rewards = rl::token_rewards(&score, &kl, &ro.mask, kl_coef);

        // 4. Advantages by GAE over response tokens, returns, whitening (over every rank's).
        let (mut adv, returns) = rl::gae(&rewards, &ro.values, &ro.mask, c.gamma, c.lam);
        if c.whiten_advantages {
            adv = world.masked_whiten(&adv, &ro.mask)?;
        }

        // 5. PPO epochs over shuffled minibatches (of the whole rollout).
        let syncs = (&actor_sync, critic_sync.as_ref());
        let settings = optimize_settings(c, iter, &world, syncs, mine.start, rows);
        s.actor.tuning.set_training(true);
        s.critic.tuning.set_training(true);
        let m = rollout::optimize(
            &models,
            &ro,
            &adv,
            &returns,
            settings,
            &mut actor_opt,
            critic_opt.as_mut(),
        )?;
        let train_s = train_start.elapsed().as_secs_f64();

        // 6. The KL coefficient: adaptive towards the target, or fixed.
        let local = whole::Local {
            ro: &ro,
            score: &score,
            kl: &kl,
            returns: &returns,
            program: program.as_ref(),
            has_reward_model: s.reward.is_some(),
            train_s,
        };
        let all = whole::Whole::new(&world, local, rows, c)?;
        kl_coef = kl_control.next_coef(kl_coef, all.kl(), rows);

        progress.step += 1;
        let step = progress.step;
        progress.tokens_seen += all.tokens();
        let stepped = whole::Stepped {
            m: &m,
            kl_coef,
            lr: c.optim.lr_at(iter, c.iterations),
            tokens_seen: progress.tokens_seen,
        };
        let fields = whole::iteration_fields(&ro, &all, &stepped, train_s);
        let named: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        log.log_train(step, &named)?;
        bar.set(step, "");
        if every.eval_due(step) {
            let tok = &s.actor.tokenizer;
            log.log_samples(&rollout::sample_records(tok, &stops, &ro, &kl, step)?)?;
        }
        progress.extra.insert("kl_coef".into(), json!(kl_coef));
        let stats_json = serde_json::to_value(&stats).context("stats")?;
        progress.extra.insert("reward_stats".into(), stats_json);
        if every.save_due(step) && world.is_main() {
            let opts: Vec<&AdamW> = std::iter::once(&actor_opt)
                .chain(critic_opt.as_ref())
                .collect();
            save_state(&ranks.out, &log, &stores, &opts, &progress)?;
        }
        every.stop_if_asked(step)?;
    }
    bar.finish();
    if !world.is_main() {
        return ranks.finish();
    }

    s.actor.save_final(&ranks.out, &c.save)?;
    // The critic beside it; a LoRA critic's base is the folder it was loaded from.
    let critic_base = critic_base(c);
    s.critic.tuning.save_into(
        &ranks.out.join("critic"),
        &s.critic.model,
        &s.critic.vs,
        &s.actor.tokenizer_path,
        (!temper_core::peft::is_adapter(critic_base)).then_some(critic_base),
        c.save.resolve(SaveDtype::of_checkpoint(critic_base)),
    )?;
    let mut summary = summary(&ranks.out, &progress)?;
    for (k, v) in s.actor.param_fields() {
        summary.insert(k.into(), v.into());
    }
    log.write_summary("ok", summary)?;
    Ok(())
}

/// The checkpoint the critic starts from (`check` made sure a reward-model start has one).
fn critic_base(c: &Config) -> &std::path::Path {
    match (c.critic_init, &c.reward_model) {
        (CriticInit::Reward, Some(rm)) => rm,
        _ => &c.policy,
    }
}

/// A stage-specific value kept in the state (the KL coefficient, reward statistics).
fn extra<T: serde::de::DeserializeOwned>(p: &temper_stage::Progress, key: &str) -> Option<T> {
    p.extra
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

fn sampling(c: &Config, template: &ChatTemplate) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        eos_token_id: Some(template.eos as i64),
        also_stop: template.also_stop(),
        pad_token_id: template.pad as i64,
    }
}

fn optimize_settings<'w>(
    c: &Config,
    iter: u64,
    world: &'w World,
    (actor_sync, critic_sync): (&'w GradSync, Option<&'w GradSync>),
    offset: usize,
    rows: usize,
) -> rollout::OptimizeSettings<'w> {
    rollout::OptimizeSettings {
        world,
        actor_sync,
        critic_sync,
        offset,
        rows,
        epochs: c.ppo_epochs,
        minibatch: c.minibatch_size,
        cliprange: c.cliprange,
        cliprange_value: c.cliprange_value,
        vf_coef: c.vf_coef,
        entropy_coef: c.entropy_coef,
        temperature: c.temperature,
        actor_lr: c.optim.lr_at(iter, c.iterations),
        actor_clip: c.optim.grad_clip,
        critic_lr: c.critic_optim.lr_at(iter, c.iterations),
        critic_clip: c.critic_optim.grad_clip,
        seed: seed_for(c.seed, "ppo-minibatch", iter),
        iteration: iter,
        last_saved: iter / c.save_every.get() * c.save_every.get(),
    }
}

/// The final iteration's key numbers, for summary.json.
fn summary(
    out: &std::path::Path,
    progress: &temper_stage::Progress,
) -> anyhow::Result<temper_stage::Summary> {
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).context("reading metrics")?;
    let last: serde_json::Value = rows
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let mut summary = temper_stage::Summary::new();
    for k in [
        "reward/mean",
        "score/mean",
        "kl/mean",
        "kl/coef",
        "response/len_mean",
        "response/eos_rate",
    ] {
        if !last[k].is_null() {
            summary.insert(k.into(), last[k].clone());
        }
    }
    summary.insert("iterations".into(), progress.step.into());
    summary.insert("tokens".into(), progress.tokens_seen.into());
    Ok(summary)
}
