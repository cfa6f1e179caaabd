//! temper-reward: a Bradley–Terry reward model. The backbone comes from a checkpoint (usually
//! SFT), a fresh scalar head reads the score at each sequence's last real token (the reply's
//! EOS) or averages it over the reply (`pooling`), and the loss is
//! −log σ(r_chosen − r_rejected − margin). The checkpoint holds backbone and head
//! (`score.weight`), loadable by PPO as a reward model and as a critic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use temper_core::chat_model::{ChatModel, ChatSettings};
use temper_core::checkpoint::{check_save, SaveOptions, ScoreHead};
use temper_core::dist::{GradSync, World};
use temper_core::losses::bradley_terry_loss;
use temper_core::peft::{check_peft, PeftConfig};
use temper_core::schedule::check_optim;
use temper_core::train::{self, Stepped, TrainRun};
use temper_core::{
    with_autocast, BatchTensors, DeviceSpec, LoadSpec, OptimSettings, Precision, ScorePooling,
    ScoreSign,
};
use temper_data::{seed_for, shuffled, Epochs, Example, Fields, Overlong, RenderedPair};
use temper_stage::cadence::{every_10, every_100};
use temper_stage::{
    invalid, Cadence, ConfigFile, Every, InputPath, Inputs, MetricsLog, StageArgs, StageError,
    StageKind, Summary,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Checkpoint folder for the backbone (with its tokenizer.json).
    init: InputPath,
    /// Preference pairs: prompt, chosen, rejected (.jsonl or .parquet).
    data: InputPath,
    #[serde(default)]
    eval_data: Option<InputPath>,
    /// More held-out pair sets, by name, each evaluated with `eval_data` and logged as
    /// `<name>/accuracy`, `<name>/loss`, … (e.g. `{human: rm_eval.parquet}`: how a model
    /// trained on the policy's own labelled replies does on human-rated pairs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    eval_sets: BTreeMap<String, InputPath>,
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
    for (name, path) in &c.eval_sets {
        cfg.ensure(
            !name.is_empty()
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                && !EVAL_FIELDS.contains(&name.as_str()),
            &format!("eval_sets.{name}"),
            format!(
                "name a set with letters, digits and `_`, other than {}",
                EVAL_FIELDS.join(", ")
            ),
        )?;
        inputs.file(cfg, &format!("eval_sets.{name}"), path)?;
    }
    Ok(())
}

/// What one held-out evaluation logs (besides `accuracy/<group>`).
const EVAL_FIELDS: [&str; 5] = [
    "loss",
    "accuracy",
    "margin",
    "reward_chosen",
    "reward_rejected",
];

/// The model with its fresh head and the rendered pairs.
struct Setup {
    chat: ChatModel,
    train: Vec<Pair>,
    eval: Vec<Pair>,
    /// `eval_sets`, in name order.
    more_eval: Vec<(String, Vec<Pair>)>,
}

fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let settings = ChatSettings {
        init: &c.init,
        spec: LoadSpec {
            lm_head: false,
            score: ScoreHead::Fresh,
        },
        peft: c.peft.as_ref(),
        steps: c.steps,
        max_len: c.max_len,
        rows_per_batch: 2 * c.batch_size,
    };
    let mut chat = ChatModel::load(cfg, settings, device)?;
    chat.m.model.config.score_pooling = c.pooling;
    chat.m.model.config.score_sign = c.score_sign_by.clone();
    let opts = chat.load_options(&c.fields, c.overlong, false);
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
    let mut more_eval = Vec::new();
    for (name, path) in &c.eval_sets {
        more_eval.push((name.clone(), opts.pairs(path).map_err(invalid)?.0));
    }
    if let Some(sign) = &c.score_sign_by {
        let sets = [
            (&c.data, &train),
            (c.eval_data.as_ref().unwrap_or(&c.data), &eval),
        ];
        let more = c.eval_sets.values().zip(more_eval.iter().map(|(_, p)| p));
        for (file, pairs) in sets.into_iter().chain(more) {
            for p in pairs {
                sign.sign(&p.meta)
                    .map_err(|e| cfg.error("score_sign_by", format!("{}: {e}", file.display())))?;
            }
        }
    }
    Ok(Setup {
        chat,
        train,
        eval,
        more_eval,
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    // Data parallel (torchrun / Slurm): `batch_size` pairs per rank.
    let Some(st) = train::start(args, StageKind::Reward, check, |c| c.device, prepare)? else {
        return Ok(());
    };
    let (c, s) = (&st.cfg.value, &st.setup);
    let m = &s.chat.m;
    let (stores, mut opt) = m.trained(c.optim.adamw());
    let every = Cadence::new(c.log_every, c.eval_every, c.save_every, c.steps);
    // Gradients averaged over the ranks in buckets, reduced while the last backward runs.
    let (mut run, sync) = TrainRun::open(st.world, &args.out, &st.cfg, &stores, &mut opt, every)?;
    // Micro-batch k of the run is batch k % n of epoch k / n: a function of the step alone.
    // With several ranks a batch holds batch_size × ranks pairs and each rank takes its share.
    let (n, global_batch) = (s.train.len(), c.batch_size * run.world.size());
    let mut batches = Epochs::new(|e| {
        let order = shuffled(n, seed_for(c.seed, "epoch", e));
        order.chunks(global_batch).map(<[usize]>::to_vec).collect()
    });
    let mut last_eval = None;
    if run.progress.step == 0 {
        // A baseline before any update: an untrained head is at chance.
        last_eval = evaluate(s, c, &run.world, &mut run.log, 0)?;
    }
    while run.progress.step < c.steps {
        let step = run.progress.step;
        let (lr, accum) = (c.optim.lr_at(step, c.steps), c.optim.grad_accum);
        let (mut step_loss, mut step_acc, mut step_tokens) = (0.0, 0.0, 0);
        m.tuning.set_training(true); // adapter dropout, when there is one
        for micro in 0..accum {
            let batch = batches.get(step * accum + micro);
            let Some(b) = micro_step(s, c, &run.world, &sync, batch, micro + 1 == accum)? else {
                continue; // nothing of this batch here; the gradient all-reduce still joins
            };
            run.guard(b.loss, &stores, &[&opt])?;
            step_loss += b.loss * b.share / accum as f64;
            step_acc += b.accuracy * b.share / accum as f64;
            step_tokens += b.tokens;
        }
        opt.ensure_gradients();
        sync.finish()?;
        let sums = run
            .world
            .sum_values(&[step_loss, step_acc, step_tokens as f64])?;
        let grad_norm = opt.update_then(c.optim.grad_clip, lr, || m.tuning.after_update())?;
        let (loss, acc) = (sums[0], sums[1]);
        let done = Stepped::new(loss, lr, grad_norm, sums[2] as u64);
        let shown = format!("loss {loss:.4} acc {acc:.2}");
        let step = run.stepped(done, &[("accuracy", acc)], shown)?;
        if run.every.eval_due(step) {
            last_eval = evaluate(s, c, &run.world, &mut run.log, step)?;
        }
        run.save_when_due(&stores, &[&opt])?;
    }
    let Some(done) = run.finish()? else {
        return Ok(());
    };
    m.save_final(&done.out, &c.save)?;
    let mut summary = done.summary(m.param_fields(), last_eval);
    summary.insert("train_pairs".into(), s.train.len().into());
    done.write(summary)
}

/// One micro-batch of pairs: its loss (backward done), accuracy, share of the batch and
/// tokens; None when this rank holds none of it. Each rank's mean counts by its share of the
/// batch's pairs, so the averaged gradient is the whole batch's mean, as one process would
/// compute it.
fn micro_step(
    s: &Setup,
    c: &Config,
    world: &World,
    sync: &GradSync,
    global: &[usize],
    last: bool,
) -> anyhow::Result<Option<MicroBatch>> {
    let mine = &global[world.shard(global.len())];
    if mine.is_empty() {
        return Ok(None);
    }
    let pairs: Vec<&Pair> = mine.iter().map(|&i| &s.train[i]).collect();
    let out = pair_scores(s, &pairs, c.precision)?;
    let loss = bradley_terry_loss(&out.chosen, &out.rejected, c.margin);
    let value = loss.double_value(&[]);
    let share = mine.len() as f64 / global.len() as f64;
    if value.is_finite() {
        let weight = share * world.size() as f64 / c.optim.grad_accum as f64;
        if last {
            sync.arm_last_backward();
        }
        (s.chat.m.tuning.regularised(loss) * weight).backward();
    }
    Ok(Some(MicroBatch {
        loss: value,
        accuracy: out.accuracy(),
        share,
        tokens: out.tokens,
    }))
}

struct MicroBatch {
    loss: f64,
    accuracy: f64,
    share: f64,
    tokens: u64,
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
    let model = &s.chat.m.model;
    let rows: Vec<&Example> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let b = BatchTensors::pad(&rows, s.chat.template.pad, model.device());
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

/// Held-out loss, accuracy (overall and per `group_by` value), margin and mean rewards of
/// `eval_data`, then of each of `eval_sets` under its name, logged; None without eval data.
fn evaluate(
    s: &Setup,
    c: &Config,
    world: &World,
    log: &mut MetricsLog,
    step: u64,
) -> anyhow::Result<Option<Summary>> {
    s.chat.m.tuning.set_training(false);
    let mut fields = Vec::new();
    if !s.eval.is_empty() {
        fields = evaluate_set(s, c, world, &s.eval)?;
    }
    for (name, pairs) in &s.more_eval {
        let set = evaluate_set(s, c, world, pairs)?;
        fields.extend(set.into_iter().map(|(k, v)| (format!("{name}/{k}"), v)));
    }
    if fields.is_empty() {
        return Ok(None);
    }
    let refs: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    log.log_eval(step, &refs)?;
    Ok(Some(
        fields.into_iter().map(|(k, v)| (k, v.into())).collect(),
    ))
}

/// One held-out set's numbers. With several ranks each scores its share of the pairs and
/// every rank assembles all the scores.
fn evaluate_set(
    s: &Setup,
    c: &Config,
    world: &World,
    eval: &[Pair],
) -> anyhow::Result<Vec<(String, f64)>> {
    let device = s.chat.m.model.device();
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for chunk in eval[world.shard(eval.len())].chunks(c.batch_size) {
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
    let ch = world.gather_shards(&mine(&chosen), eval.len())?;
    let rj = world.gather_shards(&mine(&rejected), eval.len())?;
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
        for (group, acc) in group_accuracy(eval, field, &right) {
            fields.push((format!("accuracy/{group}"), acc));
        }
    }
    Ok(fields)
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
