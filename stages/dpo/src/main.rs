//! temper-dpo: preference optimisation without RL. The policy learns from preference pairs
//! directly — DPO (`sigmoid`, with `label_smoothing` for cDPO), `ipo`, `hinge` (SLiC), the
//! reference-free `orpo` and `simpo` — or from unpaired desirable/undesirable examples (`kto`).
//! The reference is the policy's starting checkpoint unless `reference` says otherwise; with
//! `precompute_reference` its log-probs are computed once, cached in the stage folder, and the
//! reference is not held during training. Metrics use TRL's names; evaluation adds the KL to
//! the reference on replies the policy samples.

mod config;
mod evaluate;
mod losses;
mod reference;
mod setup;

use temper_core::dist::{GradSync, World};
use temper_core::train::{self, Stepped, TrainRun};
use temper_data::Epochs;
use temper_stage::{Cadence, StageArgs, StageError, StageKind};

use crate::config::{check, Config};
use crate::evaluate::{data_loss, evaluate};
use crate::losses::LossSettings;
use crate::reference::{reference_cache, CachedLogps};
use crate::setup::{epoch_batches, Setup};

fn main() {
    temper_stage::stage_main(
        "temper-dpo",
        "Preference optimisation without RL: DPO, cDPO, IPO, hinge, ORPO, SimPO and KTO on preference pairs.",
        run,
    )
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    // Data parallel (torchrun / Slurm): `batch_size` pairs per rank.
    let Some(st) = train::start(args, StageKind::Dpo, check, |c| c.device, setup::prepare)? else {
        return Ok(());
    };
    let (c, s) = (&st.cfg.value, &st.setup);
    let m = &s.chat.m;
    let (stores, mut opt) = m.trained(c.optim.adamw());
    let every = Cadence::new(c.log_every, c.eval_every, c.save_every, c.steps);
    // Gradients averaged over the ranks in buckets, reduced while the last backward runs.
    let (mut run, sync) = TrainRun::open(st.world, &args.out, &st.cfg, &stores, &mut opt, every)?;
    // Rank 0 computes (or finds) the reference's log-probs and writes them; the others read.
    let (global_batch, main) = (c.batch_size * run.world.size(), run.world.is_main());
    let cache = run.ranks.resume(&run.world, |out| {
        reference_cache(s, c, out, &st.cfg.hash, global_batch, main)
    })?;
    let settings = c.loss_settings();
    let mut batches = Epochs::new(epoch_batches(s.train.len(), global_batch, c));
    let mut last_eval = None;
    if run.progress.step == 0 {
        last_eval = evaluate(s, c, &settings, cache.as_ref(), &mut run.log, 0)?;
    }
    while run.progress.step < c.steps {
        let step = run.progress.step;
        let (lr, accum) = (c.optim.lr_at(step, c.steps), c.optim.grad_accum);
        let (mut step_loss, mut step_metrics, mut step_tokens) = (0.0, Vec::new(), 0);
        m.tuning.set_training(true); // adapter dropout, when there is one
        for micro in 0..accum {
            let global = batches.get(step * accum + micro);
            let cached = cache.as_ref().map(|x| &x.train);
            let part = Part {
                world: &run.world,
                sync: &sync,
                last: micro + 1 == accum,
            };
            let b = micro_step(s, c, &settings, global, cached, part)?;
            run.guard(b.loss, &stores, &[&opt])?;
            step_loss += b.loss * b.share / accum as f64;
            accumulate(&mut step_metrics, &b.metrics, accum);
            step_tokens += b.tokens;
        }
        // The mean gradient over the global batch; every rank then takes the same step.
        sync.finish()?;
        let mut local = vec![step_loss, step_tokens as f64];
        local.extend(step_metrics.iter().map(|(_, v)| *v));
        let sums = run.world.sum_values(&local)?;
        for ((_, v), total) in step_metrics.iter_mut().zip(&sums[2..]) {
            *v = *total;
        }
        let grad_norm = opt.update_then(c.optim.grad_clip, lr, || m.tuning.after_update())?;
        let (loss, done) = (
            sums[0],
            Stepped::new(sums[0], lr, grad_norm, sums[1] as u64),
        );
        let step = run.stepped(done, &step_metrics, format!("loss {loss:.4}"))?;
        if run.every.eval_due(step) {
            last_eval = evaluate(s, c, &settings, cache.as_ref(), &mut run.log, step)?;
        }
        run.save_when_due(&stores, &[&opt])?;
    }
    let Some(done) = run.finish()? else {
        return Ok(());
    };
    m.save_final(&done.out, &c.save)?;
    let summary = done.summary(m.param_fields(), last_eval);
    done.write(summary)
}

/// Where a micro-batch runs: the ranks, the gradient sync, and whether it ends the step.
struct Part<'a> {
    world: &'a World,
    sync: &'a GradSync,
    last: bool,
}

/// One micro-batch's loss (backward done), its share of the batch, its metrics weighted by
/// that share, and its tokens. A rank left without any pairs (a short last batch) scores the
/// first pair with weight 0, so it still joins the all-reduces with the same gradients and
/// metric names as the others.
fn micro_step(
    s: &Setup,
    c: &Config,
    settings: &LossSettings,
    global: &[usize],
    cached: Option<&CachedLogps>,
    part: Part,
) -> anyhow::Result<MicroBatch> {
    let range = part.world.shard(global.len());
    let (idx, share) = if range.is_empty() {
        (&global[..1], 0.0)
    } else {
        (
            &global[range.clone()],
            range.len() as f64 / global.len() as f64,
        )
    };
    let b = data_loss(s, settings, c.precision, &s.train, idx, cached)?;
    let value = b.loss.double_value(&[]);
    if value.is_finite() {
        let weight = share * part.world.size() as f64 / c.optim.grad_accum as f64;
        if part.last {
            part.sync.arm_last_backward();
        }
        (s.chat.m.tuning.regularised(b.loss) * weight).backward();
    }
    Ok(MicroBatch {
        loss: value,
        share,
        metrics: b.metrics.iter().map(|(k, v)| (*k, v * share)).collect(),
        tokens: if share > 0.0 { b.tokens } else { 0 },
    })
}

struct MicroBatch {
    loss: f64,
    share: f64,
    metrics: Vec<(&'static str, f64)>,
    tokens: u64,
}

/// Running mean of a micro-batch's metrics over the step's `accum` micro-batches.
fn accumulate(into: &mut Vec<(&'static str, f64)>, add: &[(&'static str, f64)], accum: u64) {
    if into.is_empty() {
        into.extend(add.iter().map(|(k, _)| (*k, 0.0)));
    }
    for ((_, acc), (_, v)) in into.iter_mut().zip(add) {
        *acc += v / accum as f64;
    }
}
