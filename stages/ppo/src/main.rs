//! temper-ppo: RLHF with PPO. An actor (from SFT) generates replies to chat-templated prompts;
//! a frozen reward model scores them; a frozen reference (the same SFT weights) anchors them
//! through a per-token KL penalty; a critic (from the reward model, or the actor) estimates
//! values for GAE. Each iteration is the numbered steps in `run`'s loop. The full state
//! (actor, critic, optimizers, KL coefficient, reward statistics, iteration) is checkpointed
//! atomically; prompt order and sampling seeds are functions of the iteration, so a resumed run
//! reproduces the uninterrupted one on CPU. Data parallel under torchrun/Slurm: each rank
//! samples and scores its share of the prompts; reward statistics, whitening, the KL controller,
//! the metrics and every update are the whole batch's.

mod config;
mod rollout;
mod setup;
mod whole;

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};
use temper_core::dist::{GradSync, World};
use temper_core::rl::{self, RewardStats};
use temper_core::train::{self, TrainRun};
use temper_data::{pass_batch, seed_for, seeds_for};
use temper_rewards::{ProgramRewards, ProgramScores};
use temper_stage::{Cadence, Every, Progress, StageArgs, StageError, StageKind};

use crate::config::{check, Config};
use crate::setup::{sampling, Optimizers, Setup};

fn main() {
    temper_stage::stage_main(
        "temper-ppo",
        "RLHF with PPO: actor, critic, frozen reference and reward model.",
        run,
    )
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    // Data parallel (torchrun / Slurm): `batch_size` prompts per rank.
    let Some(mut st) = train::start(args, StageKind::Ppo, check, |c| c.device, setup::prepare)?
    else {
        return Ok(());
    };
    let (c, (s, program)) = (&st.cfg.value, &mut st.setup);
    let stores = s.stores();
    let mut opts = Optimizers::new(c, &s.actor, &s.critic);
    let every = Cadence::new(Every::new(1), c.sample_every, c.save_every, c.iterations);
    let mut resumed = opts.all_mut();
    let mut run = TrainRun::open_with(st.world, &args.out, &st.cfg, &stores, &mut resumed, every)?;
    let (actor_sync, critic_sync) = opts.grad_syncs(&run.world)?;
    let kl_control = c.kl.control();
    let mut kl_coef = extra(&run.progress, "kl_coef").unwrap_or(kl_control.initial_coef());
    let mut stats: RewardStats = extra(&run.progress, "reward_stats").unwrap_or_default();
    let models = s.models(c.precision);
    while run.progress.step < c.iterations {
        let iter = run.progress.step;
        // 1. A batch of prompts (a seeded pass over the prompt set) and the actor's replies,
        //    scored by the reward model (signed per prompt) and the program rewards.
        let b = sample(s, program, &models, c, &run.world, iter)?;
        let (ro, rows) = (&b.ro, b.rows);
        let train_start = Instant::now();

        // 2. Scores from the reward model plus the program rewards, then the optional
        //    missing-EOS penalty, normalisation and clipping.
        let score = whole::shape_scores(ro, b.program.as_ref(), c, &mut stats, &run.world, rows)?;

        // 3. Per-token KL to the reference, as a penalty; the score on the last real token.
        let kl = rl::kl_penalty(&ro.logprobs, &ro.ref_logprobs, &ro.mask, c.kl.estimator); // (B, N)
        let rewards = rl::token_rewards(&score, &kl, &ro.mask, kl_coef);

        // 4. Advantages by GAE over response tokens, returns, whitening (over every rank's).
        let (mut adv, returns) = rl::gae(&rewards, &ro.values, &ro.mask, c.gamma, c.lam);
        if c.whiten_advantages {
            adv = run.world.masked_whiten(&adv, &ro.mask)?;
        }

        // 5. PPO epochs over shuffled minibatches (of the whole rollout).
        let syncs = (&actor_sync, critic_sync.as_ref());
        let settings = optimize_settings(c, iter, &run.world, syncs, b.offset, rows);
        s.actor.tuning.set_training(true);
        s.critic.tuning.set_training(true);
        let (actor_opt, critic_opt) = (&mut opts.actor, opts.critic.as_mut());
        let m = rollout::optimize(&models, ro, &adv, &returns, settings, actor_opt, critic_opt)?;
        let train_s = train_start.elapsed().as_secs_f64();

        // 6. The whole batch's numbers, and the KL coefficient: adaptive towards the target,
        //    or fixed.
        let program = b.program.as_ref();
        let local = whole::Local::new(ro, &score, &kl, &returns, program, s.reward.is_some());
        let all = whole::Whole::new(&run.world, local, rows, train_s, c)?;
        kl_coef = kl_control.next_coef(kl_coef, all.kl(), rows);
        let step = run.iterated(all.tokens(), String::new());
        let lr = c.optim.lr_at(iter, c.iterations);
        let stepped = whole::Stepped::new(&m, kl_coef, lr, run.progress.tokens_seen);
        let fields = whole::iteration_fields(ro, &all, &stepped, train_s);
        run.log.log_train(step, &fields)?;
        if run.every.eval_due(step) {
            let records = rollout::sample_records(&s.actor.tokenizer, &b.stops, ro, &kl, step)?;
            run.log.log_samples(&records)?;
        }
        remember(&mut run.progress, kl_coef, &stats);
        run.save_when_due(&stores, &opts.all())?;
    }
    let Some(done) = run.finish()? else {
        return Ok(());
    };
    s.save_final(c, &done.out)?;
    let keep = |k: &str| SUMMARY_KEYS.contains(&k);
    let summary = done.iterations_summary(keep, s.actor.param_fields())?;
    done.write(summary)
}

/// An iteration's rollout on this rank: its replies with their signed reward-model scores
/// and program rewards, the rows of the whole batch and where this rank's start.
struct Sampled {
    ro: rollout::Rollout,
    program: Option<ProgramScores>,
    rows: usize,
    offset: usize,
    stops: Vec<u32>,
}

/// Step 1: a seeded pass over the prompts takes the batch for every rank; this rank samples
/// its share with the seeds one process would use for those rows.
fn sample(
    s: &Setup,
    program: &mut ProgramRewards,
    models: &rollout::Models,
    c: &Config,
    world: &World,
    iter: u64,
) -> anyhow::Result<Sampled> {
    let picked = pass_batch(s.prompts.len(), c.batch_size * world.size(), c.seed, iter);
    let seeds = seeds_for(c.seed, "rollout", iter, picked.len());
    let mine = world.shard(picked.len());
    let local = &picked[mine.clone()];
    let batch: Vec<&Vec<u32>> = local.iter().map(|&i| &s.prompts[i]).collect();
    s.actor.tuning.set_training(false); // adapter dropout off while sampling and scoring
    s.critic.tuning.set_training(false);
    let sampling = sampling(c, &s.template);
    let signs: Vec<f32> = local.iter().map(|&i| s.signs[i] as f32).collect();
    let ro = rollout::rollout(models, &batch, &signs, &sampling, &seeds[mine.clone()])?;
    let fields: Vec<&BTreeMap<String, Value>> = local.iter().map(|&i| &s.fields[i]).collect();
    let stops = s.template.stop_ids();
    let program = rollout::program_scores(program, &ro, &fields, &s.actor.tokenizer, &stops)?;
    Ok(Sampled {
        ro,
        program,
        rows: picked.len(),
        offset: mine.start,
        stops,
    })
}

/// The final iteration's numbers a summary carries.
const SUMMARY_KEYS: [&str; 6] = [
    "reward/mean",
    "score/mean",
    "kl/mean",
    "kl/coef",
    "response/len_mean",
    "response/eos_rate",
];

/// Keeps the KL coefficient and the reward statistics in the state, for a resume.
fn remember(progress: &mut Progress, kl_coef: f64, stats: &RewardStats) {
    progress.extra.insert("kl_coef".into(), json!(kl_coef));
    progress.extra.insert("reward_stats".into(), json!(stats));
}

/// A stage-specific value kept in the state (the KL coefficient, reward statistics).
fn extra<T: serde::de::DeserializeOwned>(p: &Progress, key: &str) -> Option<T> {
    p.extra
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
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
