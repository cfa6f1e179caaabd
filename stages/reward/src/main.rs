//! temper-reward: a Bradley–Terry reward model. The backbone comes from a checkpoint (usually
//! SFT), a fresh scalar head reads the score at each sequence's last real token (the reply's
//! EOS) or averages it over the reply (`pooling`), and the loss is
//! −log σ(r_chosen − r_rejected − margin). The checkpoint holds backbone and head
//! (`score.weight`), loadable by PPO as a reward model and as a critic.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use temper_core::checkpoint::ScoreHead;
use temper_core::checkpoint::{check_save, SaveOptions};
use temper_core::dist::{Placement, Ranks, World};
use temper_core::losses::bradley_terry_loss;
use temper_core::peft::{check_peft, PeftConfig};
use temper_core::schedule::check_optim;
use temper_core::{
    load_with_tokenizer, resume_or_start, save_state, with_autocast, BatchTensors, DeviceSpec,
    LoadSpec, Loaded, OptimSettings, Precision, ScorePooling, ScoreSign,
};
use temper_data::{
    seed_for, shuffled, ChatTemplate, Epochs, Example, Fields, LoadOptions, Overlong, RenderedPair,
};
use temper_stage::cadence::{every_10, every_100};
use temper_stage::{
    check_finite, checked_config, invalid, step_fields, Cadence, ConfigFile, Every, Inputs,
    MetricsLog, StageArgs, StageError, StageKind, Throughput,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Checkpoint folder for the backbone (with its tokenizer.json).
    init: PathBuf,
    /// Preference pairs: prompt, chosen, rejected (.jsonl or .parquet).
    data: PathBuf,
    #[serde(default)]
    eval_data: Option<PathBuf>,
    #[serde(default)]
    fields: Fields,
    #[serde(default)]
    max_len: Option<usize>,
    #[serde(default)]
    overlong: Overlong,
    /// Required reward gap: loss = −log σ(r_chosen − r_rejected − margin).
    #[serde(default)]
    margin: f64,
    /// Where the score is read: `last_token` (the reply's EOS, as transformers'
    /// classification heads) or `response_mean` (the mean over the reply's tokens). Saved in
    /// the checkpoint, so PPO and evaluation read the model the same way.
    #[serde(default)]
    pooling: ScorePooling,
    /// Multiply the score by a sign read from each pair's label, e.g.
    /// `{field: sentiment, map: {positive: 1, negative: -1}}`: the model then learns what the
    /// label-independent part of the preference is (here: sentiment), and the label enters
    /// through the sign. Saved in the checkpoint; PPO and evaluation apply it the same way.
    #[serde(default)]
    score_sign_by: Option<ScoreSign>,
    /// A field of the pairs (e.g. `sentiment`) to report held-out accuracy by, as
    /// `accuracy/<value>`: a reward model that ignores the instruction shows up as one group
    /// high and the other below chance.
    #[serde(default)]
    group_by: Option<String>,
    /// Parameter-efficient training (lora: the score head trains with the adapter; head: only
    /// the score head over the frozen backbone; freeze); default: every parameter trains.
    #[serde(default)]
    peft: Option<PeftConfig>,
    steps: u64,
    /// Pairs per micro-batch (each pair is two sequences).
    batch_size: usize,
    #[serde(default)]
    optim: OptimSettings,
    #[serde(default = "every_100")]
    eval_every: Every,
    #[serde(default = "every_100")]
    save_every: Every,
    #[serde(default = "every_10")]
    log_every: Every,
    /// How the final checkpoint is written: `dtype` (fp32, bf16, fp16; default the init's)
    /// and `max_shard_size` (`5GB`; default one file).
    #[serde(default)]
    save: SaveOptions,
    #[serde(default)]
    device: DeviceSpec,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    seed: u64,
}

fn main() {
    temper_stage::stage_main(
        "temper-reward",
        "Bradley–Terry reward model on preference pairs.",
        run,
    )
}

type Pair = RenderedPair;

/// Range checks and the inputs' presence; nothing is read yet.
fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    check_peft(cfg, "peft", c.peft.as_ref())?;
    check_optim(cfg, "optim", &c.optim)?;
    check_save(cfg, &c.save)?;
    cfg.ensure(c.steps >= 1, "steps", "must be at least 1")?;
    cfg.ensure(c.batch_size >= 1, "batch_size", "must be at least 1")?;
    cfg.ensure(c.max_len != Some(0), "max_len", "must be at least 1")?;
    cfg.ensure(c.margin.is_finite(), "margin", "must be a number")?;
    inputs.checkpoint(cfg, "init", &c.init, true)?;
    inputs.file(cfg, "data", &c.data)?;
    if let Some(e) = &c.eval_data {
        inputs.file(cfg, "eval_data", e)?;
    }
    Ok(())
}

/// The model with its fresh head and the rendered pairs.
struct Setup {
    m: Loaded,
    template: ChatTemplate,
    train: Vec<Pair>,
    eval: Vec<Pair>,
}

fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Fresh,
    };
    let mut m = load_with_tokenizer(&c.init, spec, device).map_err(invalid)?;
    m.model.config.score_pooling = c.pooling;
    m.model.config.score_sign = c.score_sign_by.clone();
    m.tune(c.peft.as_ref(), c.steps as usize)
        .map_err(|e| cfg.error(&e.field, e.message))?;
    let template = ChatTemplate::new(&m.tokenizer).map_err(invalid)?;
    let max_len = c.max_len.unwrap_or(m.model.token_room() as usize);
    cfg.ensure(
        max_len as i64 <= m.model.token_room(),
        "max_len",
        format!(
            "exceeds the {} positions the model has for tokens",
            m.model.token_room()
        ),
    )?;
    let estimate = m
        .model
        .config
        .training_bytes(2 * c.batch_size as i64, max_len as i64);
    temper_core::device::check_memory(device, estimate, "training at this batch_size and max_len")
        .map_err(|msg| cfg.error("batch_size", msg))?;
    let opts = LoadOptions {
        tokenizer: &m.tokenizer,
        template: template.clone(),
        fields: &c.fields,
        max_len,
        overlong: c.overlong,
        train_on_prompt: false,
    };
    let (train, report) = opts.pairs(&c.data).map_err(invalid)?;
    tracing::info!(
        "{}: {} pairs ({} truncated, {} skipped)",
        c.data.display(),
        train.len(),
        report.truncated,
        report.skipped
    );
    let eval = match &c.eval_data {
        Some(p) => opts.pairs(p).map_err(invalid)?.0,
        None => Vec::new(),
    };
    if let Some(sign) = &c.score_sign_by {
        for (file, pairs) in [
            (&c.data, &train),
            (c.eval_data.as_ref().unwrap_or(&c.data), &eval),
        ] {
            for p in pairs {
                sign.sign(&p.meta)
                    .map_err(|e| cfg.error("score_sign_by", format!("{}: {e}", file.display())))?;
            }
        }
    }
    Ok(Setup {
        m,
        template,
        train,
        eval,
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Reward, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    // Data parallel (torchrun / Slurm): `batch_size` pairs per rank; a bad environment stops
    // here, before anything is read.
    let placement = Placement::from_env().map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let device = placement
        .device(cfg.value.device)
        .map_err(|e| invalid(anyhow::anyhow!(e)))?;
    let s = prepare(&cfg, device)?;
    if args.validate {
        return cfg.print_resolved();
    }
    let world = World::join_placed(placement, device).map_err(|e| invalid(anyhow::anyhow!(e)))?;

    let c = &cfg.value;
    let stores = s.m.stores();
    let ranks = Ranks::open(&world, &args.out, "reward")?;
    if world.is_main() {
        cfg.write_resolved(&ranks.out)?;
    }
    let mut log = MetricsLog::open(&ranks.log_dir)?;
    let mut opt = s.m.optimizer(c.optim.adamw());
    let mut progress = ranks.resume(&world, |out| {
        resume_or_start(out, &mut log, &stores, &mut [&mut opt], &cfg.hash)
    })?;
    world.start_together(progress.step, &opt.parameters())?;
    // Gradients averaged over the ranks in buckets, reduced while the last backward runs.
    let sync = world.grad_sync(&opt.parameters())?;
    let every = Cadence::new(c.log_every, c.eval_every, c.save_every, c.steps);
    // Micro-batch k of the run is batch k % n of epoch k / n: a function of the step alone.
    // With several ranks a batch holds batch_size × ranks pairs and each rank takes its share.
    let n = s.train.len();
    let global_batch = c.batch_size * world.size();
    let mut batches = Epochs::new(|e| {
        let order = shuffled(n, seed_for(c.seed, "epoch", e));
        order.chunks(global_batch).map(<[usize]>::to_vec).collect()
    });
    let mut bar = ranks.progress(c.steps, progress.step);
    let mut throughput = Throughput::new();
    let mut last_eval = None;
    if progress.step == 0 {
        // A baseline before any update: an untrained head is at chance.
        last_eval = evaluate(&s, c, &world, &mut log, 0)?;
    }
    while progress.step < c.steps {
        let step = progress.step;
        let lr = c.optim.lr_at(step, c.steps);
        let accum = c.optim.grad_accum;
        let (mut step_loss, mut step_acc, mut step_tokens) = (0.0, 0.0, 0);
        s.m.tuning.set_training(true); // adapter dropout, when there is one
        for micro in 0..accum {
            let global = batches.get(step * accum + micro);
            let mine = &global[world.shard(global.len())];
            if mine.is_empty() {
                continue; // nothing of this batch here; the gradient all-reduce still joins
            }
            let pairs: Vec<&Pair> = mine.iter().map(|&i| &s.train[i]).collect();
            let out = pair_scores(&s, &pairs, c.precision)?;
            let loss = bradley_terry_loss(&out.chosen, &out.rejected, c.margin);
            let value = loss.double_value(&[]);
            if let Err(e) = check_finite(value, step + 1, step) {
                if world.is_main() {
                    save_state(&ranks.out, &log, &stores, &[&opt], &progress)?;
                }
                return Err(e.into());
            }
            // Each rank's mean counts by its share of the batch's pairs, so the averaged
            // gradient is the whole batch's mean, as one process would compute it.
            let share = mine.len() as f64 / global.len() as f64;
            let weight = share * world.size() as f64 / accum as f64;
            if micro + 1 == accum {
                sync.arm_last_backward();
            }
            (s.m.tuning.regularised(loss) * weight).backward();
            step_loss += value * share / accum as f64;
            step_acc += out.accuracy() * share / accum as f64;
            step_tokens += out.tokens;
        }
        opt.ensure_gradients();
        sync.finish()?;
        let sums = world.sum_values(&[step_loss, step_acc, step_tokens as f64])?;
        let (step_loss, step_acc, step_tokens) = (sums[0], sums[1], sums[2] as u64);
        progress.tokens_seen += step_tokens;
        throughput.add(step_tokens);
        let grad_norm = opt.update_then(c.optim.grad_clip, lr, || s.m.tuning.after_update())?;
        progress.step += 1;
        let step = progress.step;
        bar.set(step, format!("loss {step_loss:.4} acc {step_acc:.2}"));
        if every.log_due(step) {
            let mut fields = step_fields(
                step_loss,
                lr,
                grad_norm,
                progress.tokens_seen,
                throughput.take(),
            );
            fields.push(("accuracy", step_acc));
            log.log_train(step, &fields)?;
        }
        if every.eval_due(step) {
            last_eval = evaluate(&s, c, &world, &mut log, step)?;
        }
        if every.save_due(step) && world.is_main() {
            save_state(&ranks.out, &log, &stores, &[&opt], &progress)?;
        }
        every.stop_if_asked(step)?;
    }
    bar.finish();
    if !world.is_main() {
        return ranks.finish();
    }

    s.m.save_final(&ranks.out, &c.save)?;
    let mut summary = log.summary_base(&progress);
    for (k, v) in s.m.param_fields() {
        summary.insert(k.into(), v.into());
    }
    summary.insert("train_pairs".into(), s.train.len().into());
    match last_eval {
        Some(fields) => summary.extend(fields.into_iter().map(|(k, v)| (k, v.into()))),
        // Resumed at the last step, after the final evaluation and save (stopped before the
        // summary): the loop did not run, and the final evaluation is the one logged then.
        None => summary.extend(log.eval_logged_at_resume()),
    }
    log.write_summary("ok", summary)?;
    Ok(())
}

struct PairScores {
    chosen: Tensor,   // (B,)
    rejected: Tensor, // (B,)
    tokens: u64,
}

impl PairScores {
    fn accuracy(&self) -> f64 {
        self.chosen
            .gt_tensor(&self.rejected)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    }
}

/// Scores both sides of each pair in one forward pass over a (2B, T) batch.
fn pair_scores(s: &Setup, pairs: &[&Pair], precision: Precision) -> anyhow::Result<PairScores> {
    let model = &s.m.model;
    let rows: Vec<&Example> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let b = BatchTensors::pad(&rows, s.template.pad, model.device());
    let scores = with_autocast(model.device(), precision, || -> anyhow::Result<Tensor> {
        let hidden = model.hidden_states(&b.ids, Some(&b.attention), None)?;
        Ok(model
            .sequence_scores(&hidden, &b.attention, &b.loss_mask)?
            .to_kind(Kind::Float))
    })??;
    let n = pairs.len() as i64;
    let (chosen, rejected) = (scores.narrow(0, 0, n), scores.narrow(0, n, n));
    let (chosen, rejected) = match &model.config.score_sign {
        Some(sign) => {
            let signs: Vec<f32> = pairs
                .iter()
                .map(|p| sign.sign(&p.meta).map(|x| x as f32))
                .collect::<Result<_, _>>()?;
            let signs = Tensor::from_slice(&signs).to_device(model.device());
            (chosen * &signs, rejected * &signs)
        }
        None => (chosen, rejected),
    };
    Ok(PairScores {
        chosen,
        rejected,
        tokens: b.tokens,
    })
}

/// Held-out loss, accuracy (overall and per `group_by` value), margin and mean rewards,
/// logged; None without eval data. With several ranks each scores its share of the pairs and
/// every rank assembles all the scores.
fn evaluate(
    s: &Setup,
    c: &Config,
    world: &World,
    log: &mut MetricsLog,
    step: u64,
) -> anyhow::Result<Option<Vec<(String, f64)>>> {
    s.m.tuning.set_training(false);
    if s.eval.is_empty() {
        return Ok(None);
    }
    let device = s.m.model.device();
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for chunk in s.eval[world.shard(s.eval.len())].chunks(c.batch_size) {
        let pairs: Vec<&Pair> = chunk.iter().collect();
        let out = tch::no_grad(|| pair_scores(s, &pairs, c.precision))?;
        chosen.push(out.chosen);
        rejected.push(out.rejected);
    }
    let mine = |parts: &[Tensor]| {
        if parts.is_empty() {
            Tensor::zeros([0], (Kind::Float, device))
        } else {
            Tensor::cat(parts, 0)
        }
    };
    let ch = world.gather_shards(&mine(&chosen), s.eval.len())?;
    let rj = world.gather_shards(&mine(&rejected), s.eval.len())?;
    let scalar = |t: Tensor| t.to_kind(Kind::Double).double_value(&[]);
    let mut fields = vec![
        (
            "loss".to_string(),
            scalar(bradley_terry_loss(&ch, &rj, c.margin)),
        ),
        (
            "accuracy".into(),
            scalar(ch.gt_tensor(&rj).to_kind(Kind::Float).mean(Kind::Float)),
        ),
        ("margin".into(), scalar((&ch - &rj).mean(Kind::Float))),
        ("reward_chosen".into(), scalar(ch.mean(Kind::Float))),
        ("reward_rejected".into(), scalar(rj.mean(Kind::Float))),
    ];
    if let Some(field) = &c.group_by {
        let right = Vec::<bool>::try_from(ch.gt_tensor(&rj))?;
        for (group, acc) in group_accuracy(&s.eval, field, &right) {
            fields.push((format!("accuracy/{group}"), acc));
        }
    }
    let refs: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    log.log_eval(step, &refs)?;
    Ok(Some(fields))
}

/// Accuracy within each value of `field` (pairs without it are left out), in value order.
fn group_accuracy(pairs: &[Pair], field: &str, right: &[bool]) -> Vec<(String, f64)> {
    let mut groups: std::collections::BTreeMap<&str, (f64, f64)> = Default::default();
    for (p, &ok) in pairs.iter().zip(right) {
        if let Some(g) = p.label(field) {
            let e = groups.entry(g).or_default();
            *e = (e.0 + f64::from(u8::from(ok)), e.1 + 1.0);
        }
    }
    groups
        .into_iter()
        .map(|(g, (hits, n))| (g.to_string(), hits / n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_per_group_by_hand() {
        let pair = |g: Option<&str>| RenderedPair {
            chosen: Example::default(),
            rejected: Example::default(),
            meta: g
                .map(|g| [("sentiment".to_string(), serde_json::json!(g))].into())
                .unwrap_or_default(),
        };
        let pairs = [
            pair(Some("positive")),
            pair(Some("negative")),
            pair(Some("positive")),
            pair(None),
        ];
        let got = group_accuracy(&pairs, "sentiment", &[true, false, false, true]);
        assert_eq!(
            got,
            [("negative".to_string(), 0.0), ("positive".to_string(), 0.5)]
        );
    }
}
