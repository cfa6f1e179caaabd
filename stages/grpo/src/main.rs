//! temper-grpo: critic-free RL. For each prompt the policy samples a group of `num_generations`
//! replies; programs (`exact_match`, `regex`, `length`, `lexicon`, a user `command`) and/or
//! reward models score them; each reply's advantage is its reward against its group's
//! (GRPO, Dr. GRPO), against the other replies' mean (RLOO), or a batch-whitened return with a
//! per-token KL penalty (REINFORCE++); the policy takes `updates_per_iteration` passes of the
//! clipped ratio loss (token or sequence ratios, DAPO's clip-higher, four aggregations). No
//! value model; a reference only when `beta` > 0 (the same weights with adapters bypassed for a
//! LoRA policy). Prompt order and sampling seeds are functions of the iteration, so a resumed
//! run reproduces the uninterrupted one on CPU. Data parallel under torchrun/Slurm: each rank
//! samples and scores its share of the prompts; advantages, metrics and every update are the
//! whole rollout's.

mod config;
mod rewards;
mod update;

use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind};
use temper_core::dist::{Placement, Ranks, World};
use temper_core::peft::Reference;
use temper_core::{
    load_checkpoint, load_with_tokenizer, resume_or_start, save_state, LoadSpec, Loaded,
    SamplingConfig, Transformer,
};
use temper_data::{pass_batch, seeds_for, ChatTemplate, LoadOptions, Overlong, PromptRecord};
use temper_stage::{
    checked_config, invalid, Cadence, ConfigFile, Every, MetricsLog, StageArgs, StageError,
    StageKind,
};

use crate::config::{check, Config};
use crate::rewards::RewardSet;

fn main() {
    temper_stage::stage_main(
        "temper-grpo",
        "Critic-free RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++.",
        run,
    )
}

/// The policy, the reference when one is needed, the rewards and the rendered prompts.
pub struct Setup {
    pub policy: Loaded,
    /// Held when `beta` > 0 and the policy is not LoRA (then: the policy, adapters bypassed).
    pub reference: Option<Transformer>,
    pub rewards: RewardSet,
    pub template: ChatTemplate,
    pub prompts: Vec<(Vec<u32>, PromptRecord)>,
}

impl Setup {
    pub fn reference(&self, c: &Config) -> Option<Reference<'_>> {
        if !c.needs_reference() {
            return None;
        }
        Some(match &self.reference {
            Some(r) => Reference::Model(r),
            None => Reference::Bypassed(&self.policy.model, &self.policy.tuning),
        })
    }
}

fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let mut policy =
        load_with_tokenizer(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    policy
        // With dynamic sampling fewer may happen: AdaLoRA's schedule then ends early.
        .tune(c.peft.as_ref(), c.planned_updates())
        .map_err(|e| cfg.error(&e.field, e.message))?;
    let template = ChatTemplate::new(&policy.tokenizer).map_err(invalid)?;
    let reference = match c.needs_reference() && !policy.tuning.is_lora() {
        true => {
            let dir = c.reference.as_ref().unwrap_or(&c.policy);
            let (mut vs, model) =
                load_checkpoint(dir, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
            vs.freeze();
            Some(model)
        }
        false => None,
    };
    let max_position = policy.model.token_room();
    cfg.ensure(
        c.max_new_tokens < max_position,
        "max_new_tokens",
        format!("must leave room for a prompt in the model's {max_position} positions"),
    )?;
    let max_prompt = c
        .max_prompt_len
        .unwrap_or((max_position - c.max_new_tokens) as usize);
    let opts = LoadOptions {
        tokenizer: &policy.tokenizer,
        template: template.clone(),
        fields: &c.fields,
        max_len: max_prompt,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (prompts, report) = opts.prompts(&c.prompts).map_err(invalid)?;
    let rewards = RewardSet::load(cfg, &policy, device)?;
    rewards.check_prompts(cfg, &prompts)?;
    tracing::info!(
        "{}: {} prompts ({} longer than {max_prompt} tokens skipped); {} × {} replies per iteration",
        c.prompts.display(),
        prompts.len(),
        report.skipped,
        c.prompts_per_iteration,
        c.num_generations,
    );
    Ok(Setup {
        policy,
        reference,
        rewards,
        template,
        prompts,
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Grpo, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    // Data parallel (torchrun / Slurm): `prompts_per_iteration` prompts per rank; a bad
    // environment stops here, before anything is read.
    let placement = Placement::from_env().map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let device = placement
        .device(cfg.value.device)
        .map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let mut s = prepare(&cfg, device)?;
    if args.validate {
        return cfg.print_resolved();
    }
    let world = World::join_placed(placement, device).map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let c = &cfg.value;
    let ranks = Ranks::open(&world, &args.out, "grpo")?;
    if world.is_main() {
        cfg.write_resolved(&ranks.out)?;
    }
    let mut log = MetricsLog::open(&ranks.log_dir)?;
    let mut opt = s.policy.optimizer(c.optim.adamw());
    let mut progress = ranks.resume(&world, |out| {
        let stores = s.policy.stores();
        resume_or_start(out, &mut log, &stores, &mut [&mut opt], &cfg.hash)
    })?;
    world.start_together(progress.step, &opt.parameters())?;
    // Gradients averaged over the ranks in buckets, reduced while each backward runs.
    let sync = world.grad_sync(&opt.parameters())?;
    let every = Cadence::new(Every::new(1), c.sample_every, c.save_every, c.iterations);
    let mut bar = ranks.progress(c.iterations, progress.step);
    let g = c.num_generations;
    while progress.step < c.iterations {
        let iter = progress.step;
        // 1. Prompts (a seeded pass over the set), each repeated G times, and the replies.
        //    With several ranks the pass takes prompts for all of them and each rank samples
        //    its share (whole groups) with the seeds one process would use for those rows.
        let picked = pass_batch(
            s.prompts.len(),
            c.prompts_per_iteration * world.size(),
            c.seed,
            iter,
        );
        let rows: Vec<usize> = picked
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, g))
            .collect();
        let seeds = seeds_for(c.seed, "rollout", iter, rows.len());
        let mine = world.shard(picked.len());
        let mine = mine.start * g..mine.end * g;
        s.policy.tuning.set_training(false);
        let ro = update::rollout(&s, c, &rows[mine.clone()], &seeds[mine.clone()])?;

        // 2. Rewards: each function's score, weighted and summed.
        let score_start = Instant::now();
        let records: Vec<&PromptRecord> = rows[mine.clone()]
            .iter()
            .map(|&i| &s.prompts[i].1)
            .collect();
        let scored = s
            .rewards
            .score(&records, &ro, &s.policy.tokenizer, &s.template.stop_ids())?;
        let reward_s = score_start.elapsed().as_secs_f64();

        // 3. Advantages over the whole rollout (and, for REINFORCE++, the per-token KL
        //    inside them).
        let zero_std = temper_core::critic_free::zero_std_groups(&scored.total, g as i64);
        let all = update::Gathered::new(&world, &ro, &scored, &zero_std, rows.len())?;
        let adv = update::advantages(c, &all.total, mine.clone(), &ro, &world)?;
        // DAPO's dynamic sampling: groups where every reply scored the same carry no signal
        // and are left out of the loss.
        let mask = if c.dynamic_sampling {
            &ro.mask * zero_std.logical_not().to_kind(Kind::Float).unsqueeze(1)
        } else {
            ro.mask.shallow_clone()
        };

        // 4. `updates_per_iteration` passes of the clipped loss over shuffled minibatches.
        s.policy.tuning.set_training(true);
        let train_start = Instant::now();
        let part = update::Part {
            iteration: iter,
            world: &world,
            sync: &sync,
            offset: mine.start,
            rows: rows.len(),
        };
        let m = update::optimize(&s, c, &ro, &adv, &mask, &mut opt, part)?;
        progress.step += 1;
        let step = progress.step;
        progress.tokens_seen += all.tokens() as u64;
        let mut fields = update::iteration_fields(&ro, &all, &m, c, iter);
        fields.push(("tokens".into(), progress.tokens_seen as f64));
        fields.push(("time/reward_s".into(), reward_s));
        fields.push(("time/train_s".into(), train_start.elapsed().as_secs_f64()));
        let named: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        log.log_train(step, &named)?;
        bar.set(step, format!("reward {:.3}", scored.mean()));
        if every.eval_due(step) {
            log.log_samples(&update::sample_records(&s, &ro, &scored, step)?)?;
        }
        if every.save_due(step) && world.is_main() {
            save_state(&ranks.out, &log, &s.policy.stores(), &[&opt], &progress)?;
        }
        every.stop_if_asked(step)?;
    }
    bar.finish();
    if !world.is_main() {
        return ranks.finish();
    }
    s.policy.save_final(&ranks.out, &c.save)?;
    let mut summary = summary(&ranks.out)?;
    summary.insert("iterations".into(), progress.step.into());
    summary.insert("tokens".into(), progress.tokens_seen.into());
    for (k, v) in s.policy.param_fields() {
        summary.insert(k.into(), v.into());
    }
    log.write_summary("ok", summary)?;
    Ok(())
}

/// The last iteration's reward, KL and length numbers, for summary.json.
fn summary(out: &std::path::Path) -> anyhow::Result<temper_stage::Summary> {
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).context("reading metrics")?;
    let last: serde_json::Value = rows
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let mut summary = temper_stage::Summary::new();
    if let Some(o) = last.as_object() {
        for (k, v) in o {
            let keep = k.starts_with("reward")
                || k.starts_with("kl")
                || k.starts_with("response/")
                || k == "frac_zero_std_groups";
            if keep {
                summary.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(summary)
}

/// Sampling as configured, stopping at the template's EOS.
pub fn sampling(c: &Config, template: &ChatTemplate) -> SamplingConfig {
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
