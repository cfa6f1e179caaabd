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
mod setup;
mod update;

use std::time::Instant;

use temper_core::train::{self, TrainRun};
use temper_data::PromptRecord;
use temper_stage::{Cadence, Every, StageArgs, StageError, StageKind};

use crate::config::check;
use crate::setup::Setup;
use crate::update::Rollout;
use temper_core::reward_set::Scored;

fn main() {
    temper_stage::stage_main(
        "temper-grpo",
        "Critic-free RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++.",
        run,
    )
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    // Data parallel (torchrun / Slurm): `prompts_per_iteration` prompts per rank.
    let Some(st) = train::start(args, StageKind::Grpo, check, |c| c.device, setup::prepare)? else {
        return Ok(());
    };
    let (c, s) = (&st.cfg.value, &st.setup);
    let (stores, mut opt) = s.policy.trained(c.optim.adamw());
    let every = Cadence::new(Every::new(1), c.sample_every, c.save_every, c.iterations);
    // Gradients averaged over the ranks in buckets, reduced while each backward runs.
    let (mut run, sync) = TrainRun::open(st.world, &args.out, &st.cfg, &stores, &mut opt, every)?;
    while run.progress.step < c.iterations {
        let iter = run.progress.step;
        // 1. Prompts (a seeded pass over the set), each repeated G times, and the replies.
        //    With several ranks each samples its share (whole groups) with the seeds one
        //    process would use for those rows.
        let (rows, seeds, mine) = update::group_rows(s, c, &run.world, iter);
        s.policy.tuning.set_training(false);
        let ro = update::rollout(s, c, &rows[mine.clone()], &seeds[mine.clone()])?;

        // 2. Rewards: each function's score, weighted and summed.
        let score_start = Instant::now();
        let scored = score(s, &rows[mine.clone()], &ro)?;
        let reward_s = score_start.elapsed().as_secs_f64();

        // 3. Advantages over the whole rollout (and, for REINFORCE++, the per-token KL
        //    inside them); DAPO's dynamic sampling masks groups without signal.
        let (all, adv, mask) =
            update::scored_advantages(c, &run.world, &ro, &scored, rows.len(), mine.clone())?;

        // 4. `updates_per_iteration` passes of the clipped loss over shuffled minibatches.
        s.policy.tuning.set_training(true);
        let train_start = Instant::now();
        let part = update::Part {
            iteration: iter,
            world: &run.world,
            sync: &sync,
            offset: mine.start,
            rows: rows.len(),
        };
        let m = update::optimize(s, c, &ro, &adv, &mask, &mut opt, part)?;
        let train_s = train_start.elapsed().as_secs_f64();
        let step = run.iterated(all.tokens() as u64, format!("reward {:.3}", scored.mean()));
        let mut fields = update::iteration_fields(&ro, &all, &m, c, iter);
        fields.extend([
            ("tokens".into(), run.progress.tokens_seen as f64),
            ("time/reward_s".into(), reward_s),
            ("time/train_s".into(), train_s),
        ]);
        run.log.log_train(step, &fields)?;
        if run.every.eval_due(step) {
            run.log
                .log_samples(&update::sample_records(s, &ro, &scored, step)?)?;
        }
        run.save_when_due(&stores, &[&opt])?;
    }
    let Some(done) = run.finish()? else {
        return Ok(());
    };
    s.policy.save_final(&done.out, &c.save)?;
    let keep = |k: &str| {
        k.starts_with("reward")
            || k.starts_with("kl")
            || k.starts_with("response/")
            || k == "frac_zero_std_groups"
    };
    let summary = done.iterations_summary(keep, s.policy.param_fields())?;
    done.write(summary)
}

/// The rewards of this rank's replies to the prompts at `rows`.
fn score(s: &Setup, rows: &[usize], ro: &Rollout) -> anyhow::Result<Scored> {
    let records: Vec<&PromptRecord> = rows.iter().map(|&i| &s.prompts[i].1).collect();
    let stops = s.template.stop_ids();
    s.rewards
        .score(&records, &ro.replies(), &s.policy.tokenizer, &stops)
}
