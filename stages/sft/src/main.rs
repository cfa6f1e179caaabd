//! temper-sft: supervised fine-tuning on chat-templated conversations. The loss covers the
//! assistant's replies (and their EOS) only, unless `train_on_prompt`; at each evaluation it
//! logs the held-out loss and samples replies to a few held-out prompts into samples.jsonl.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use temper_core::chat_model::{ChatModel, ChatSettings};
use temper_core::checkpoint::{check_save, SaveOptions};
use temper_core::dist::{GradSync, World};
use temper_core::model::MemorySaving;
use temper_core::peft::{check_peft, PeftConfig};
use temper_core::sample::{check_sampling, generate, SamplingConfig, SamplingKeys};
use temper_core::schedule::check_optim;
use temper_core::scoring::decode_replies;
use temper_core::train::{self, Stepped, TrainRun};
use temper_core::{BatchTensors, DeviceSpec, LoadSpec, OptimSettings, Precision};
use temper_data::{
    length_grouped_batches, pack, seed_for, shuffled, Epochs, Example, Fields, Overlong,
};
use temper_stage::cadence::{every_10, every_100};
use temper_stage::{
    invalid, Cadence, ConfigFile, Every, InputPath, Inputs, MetricsLog, StageArgs, StageError,
    StageKind, Summary,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Checkpoint folder to fine-tune (with its tokenizer.json).
    init: InputPath,
    /// SFT examples: alpaca rows or `messages` lists (.jsonl or .parquet).
    data: InputPath,
    #[serde(default)]
    eval_data: Option<InputPath>,
    #[serde(default)]
    fields: Fields,
    /// Longest example in tokens; defaults to the model's max_position.
    #[serde(default)]
    max_len: Option<usize>,
    #[serde(default)]
    overlong: Overlong,
    #[serde(default)]
    train_on_prompt: bool,
    /// Concatenate examples into rows of max_len tokens (less padding, cross-example attention).
    #[serde(default)]
    packing: bool,
    /// Parameter-efficient fine-tuning (lora, freeze, head); default: every parameter trains.
    #[serde(default)]
    peft: Option<PeftConfig>,
    steps: u64,
    batch_size: usize,
    #[serde(default)]
    optim: OptimSettings,
    #[serde(default = "every_100")]
    eval_every: Every,
    #[serde(default = "every_100")]
    save_every: Every,
    #[serde(default = "every_10")]
    log_every: Every,
    /// Held-out prompts to sample a reply for at each evaluation.
    #[serde(default = "default_samples")]
    samples: usize,
    #[serde(default = "default_max_new")]
    max_new_tokens: i64,
    #[serde(default = "default_temperature")]
    temperature: f64,
    /// How the final checkpoint is written: `dtype` (fp32, bf16, fp16; default the init's)
    /// and `max_shard_size` (`5GB`; default one file).
    #[serde(default)]
    save: SaveOptions,
    #[serde(default)]
    device: DeviceSpec,
    #[serde(default)]
    precision: Precision,
    /// Recompute each block's activations in the backward pass instead of keeping them:
    /// one block's activations in memory at a time, for about a third more compute.
    #[serde(default)]
    activation_checkpointing: bool,
    /// Compute the vocabulary logits and their loss this many positions at a time (0: all at
    /// once), so the B × T × V logits never exist whole.
    #[serde(default)]
    loss_chunk: usize,
    #[serde(default)]
    seed: u64,
}

fn default_samples() -> usize {
    4
}
fn default_max_new() -> i64 {
    48
}
fn default_temperature() -> f64 {
    0.7
}

fn main() {
    temper_stage::stage_main(
        "temper-sft",
        "Prompt-masked supervised fine-tuning on chat-templated examples.",
        run,
    )
}

/// Range checks and the inputs' presence; nothing is read yet.
fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let c = &cfg.value;
    check_peft(cfg, "peft", c.peft.as_ref())?;
    c.memory_saving().check(cfg, c.peft.as_ref())?;
    check_optim(cfg, "optim", &c.optim)?;
    check_save(cfg, &c.save)?;
    cfg.ensure(c.steps >= 1, "steps", "must be at least 1")?;
    cfg.ensure(c.batch_size >= 1, "batch_size", "must be at least 1")?;
    cfg.ensure(c.max_len != Some(0), "max_len", "must be at least 1")?;
    let sampling = SamplingKeys {
        max_new_tokens: c.max_new_tokens,
        temperature: c.temperature,
        top_k: None,
        top_p: None,
        needs_temperature: None,
    };
    check_sampling(cfg, sampling)?;
    inputs.checkpoint(cfg, "init", &c.init, true)?;
    inputs.file(cfg, "data", &c.data)?;
    if let Some(e) = &c.eval_data {
        inputs.file(cfg, "eval_data", e)?;
    }
    Ok(())
}

/// The model and the rendered data, cross-checked before anything is written.
struct Setup {
    chat: ChatModel,
    train: Vec<Example>,
    eval: Vec<Example>,
    /// Held-out prompts to sample from at evaluations, with their reference replies.
    prompts: Vec<(Vec<u32>, String)>,
    report: temper_data::LoadReport,
}

fn prepare(cfg: &ConfigFile<Config>, device: tch::Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let settings = ChatSettings {
        init: &c.init,
        spec: LoadSpec::CAUSAL_LM,
        peft: c.peft.as_ref(),
        steps: c.steps,
        max_len: c.max_len,
        rows_per_batch: c.batch_size,
    };
    let chat = ChatModel::load(cfg, settings, device)?;
    let opts = chat.load_options(&c.fields, c.overlong, c.train_on_prompt);
    let (mut train, report) = opts.sft(&c.data).map_err(invalid)?;
    tracing::info!(
        "{}: {} examples ({} truncated, {} skipped), mean {:.1} tokens",
        c.data.display(),
        report.kept,
        report.truncated,
        report.skipped,
        report.mean_tokens()
    );
    if c.packing {
        let order = shuffled(train.len(), seed_for(c.seed, "packing", 0));
        let ordered: Vec<Example> = order.into_iter().map(|i| train[i].clone()).collect();
        train = pack(&ordered, chat.max_len);
        tracing::info!(
            "packed into {} rows of up to {} tokens",
            train.len(),
            chat.max_len
        );
    }
    let (eval, prompts) = match &c.eval_data {
        Some(p) => (
            opts.sft(p).map_err(invalid)?.0,
            opts.sft_prompts(p, c.samples).map_err(invalid)?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    Ok(Setup {
        chat,
        train,
        eval,
        prompts,
        report,
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    // Data parallel (torchrun / Slurm): `batch_size` rows per rank.
    let Some(st) = train::start(args, StageKind::Sft, check, |c| c.device, prepare)? else {
        return Ok(());
    };
    let (c, s) = (&st.cfg.value, &st.setup);
    let m = &s.chat.m;
    let (stores, mut opt) = m.trained(c.optim.adamw());
    let every = Cadence::new(c.log_every, c.eval_every, c.save_every, c.steps);
    // Gradients averaged over the ranks in buckets, reduced while the last backward runs.
    let (mut run, sync) = TrainRun::open(st.world, &args.out, &st.cfg, &stores, &mut opt, every)?;
    let lengths: Vec<usize> = s.train.iter().map(Example::len).collect();
    // Micro-batch k of the run is batch k % n of epoch k / n: a function of the step alone.
    // With several ranks a batch holds batch_size × ranks rows and each rank takes its share.
    let global_batch = c.batch_size * run.world.size();
    let mut batches = Epochs::new(|e| {
        length_grouped_batches(&lengths, global_batch, seed_for(c.seed, "epoch", e))
    });
    let mut last_eval = None;
    if run.progress.step == 0 {
        // A baseline before any update, so the curve shows what fine-tuning changed.
        last_eval = evaluate(s, c, &run.world, &mut run.log, 0)?;
    }
    while run.progress.step < c.steps {
        let step = run.progress.step;
        let (lr, accum) = (c.optim.lr_at(step, c.steps), c.optim.grad_accum);
        let (mut step_loss, mut step_tokens) = (0.0, 0);
        m.tuning.set_training(true); // adapter dropout, when there is one
        for micro in 0..accum {
            let batch = batches.get(step * accum + micro);
            let Some(b) = micro_step(s, c, &run.world, &sync, batch, micro + 1 == accum)? else {
                continue; // nothing of this batch here; the gradient all-reduce still joins
            };
            run.guard(b.loss, &stores, &[&opt])?;
            step_loss += b.loss * b.share / accum as f64;
            step_tokens += b.tokens;
        }
        // The mean gradient over the global batch; every rank then takes the same step.
        opt.ensure_gradients();
        sync.finish()?;
        let sums = run.world.sum_values(&[step_loss, step_tokens as f64])?;
        let grad_norm = opt.update_then(c.optim.grad_clip, lr, || m.tuning.after_update())?;
        let (loss, done) = (
            sums[0],
            Stepped::new(sums[0], lr, grad_norm, sums[1] as u64),
        );
        let step = run.stepped(done, &[("ppl", loss.exp())], format!("loss {loss:.4}"))?;
        if run.every.eval_due(step) {
            last_eval = evaluate(s, c, &run.world, &mut run.log, step)?;
        }
        run.save_when_due(&stores, &[&opt])?;
    }
    let Some(done) = run.finish()? else {
        return Ok(());
    };
    m.save_final(&done.out, &c.save)?;
    let report = serde_json::to_value(&s.report).context("report")?;
    let mut summary = done.summary(m.param_fields(), last_eval);
    summary.insert("train_examples".into(), s.train.len().into());
    summary.insert("data".into(), report);
    done.write(summary)
}

/// One micro-batch's loss (backward done), its share of the batch's targets and its tokens;
/// None when this rank holds none of the batch. Each rank's mean counts by its share of the
/// batch's targets, so the averaged gradient is the whole batch's token mean, as one process
/// would compute it.
fn micro_step(
    s: &Setup,
    c: &Config,
    world: &World,
    sync: &GradSync,
    batch: &[usize],
    last: bool,
) -> anyhow::Result<Option<MicroBatch>> {
    let global: Vec<&Example> = batch.iter().map(|&i| &s.train[i]).collect();
    let all_targets: usize = global.iter().map(|e| targets(e)).sum();
    let rows = &global[world.shard(global.len())];
    let share = rows.iter().map(|e| targets(e)).sum::<usize>() as f64 / all_targets.max(1) as f64;
    if rows.is_empty() || share == 0.0 {
        return Ok(None);
    }
    let (model, tuning) = (&s.chat.m.model, &s.chat.m.tuning);
    let b = BatchTensors::pad(rows, s.chat.template.pad, model.device());
    let weight = share * world.size() as f64 / c.optim.grad_accum as f64;
    let saving = c.memory_saving();
    let (ids, attn, mask) = (&b.ids, Some(&b.attention), &b.loss_mask);
    let loss = if saving.any() {
        let v = model.lm_loss_backward(ids, attn, mask, c.precision, weight, saving)?;
        tuning.backward_regulariser(weight);
        v
    } else {
        let loss = model.lm_loss(ids, attn, mask, c.precision)?;
        let value = loss.double_value(&[]);
        if value.is_finite() {
            if last {
                sync.arm_last_backward();
            }
            (tuning.regularised(loss) * weight).backward();
        }
        value
    };
    Ok(Some(MicroBatch {
        loss,
        share,
        tokens: b.tokens,
    }))
}

struct MicroBatch {
    loss: f64,
    share: f64,
    tokens: u64,
}

/// Held-out loss (logged) and sampled replies (to samples.jsonl); the summary's loss and
/// perplexity, None without eval data. With several ranks each scores its share of the
/// held-out set and the sums are reduced; rank 0 alone samples.
fn evaluate(
    s: &Setup,
    c: &Config,
    world: &World,
    log: &mut MetricsLog,
    step: u64,
) -> anyhow::Result<Option<Summary>> {
    if s.eval.is_empty() {
        return Ok(None);
    }
    let m = &s.chat.m;
    m.tuning.set_training(false);
    let device = m.model.device();
    let batches = s.eval[world.shard(s.eval.len())]
        .chunks(c.batch_size)
        .map(|chunk| {
            let rows: Vec<&Example> = chunk.iter().collect();
            let b = BatchTensors::pad(&rows, s.chat.template.pad, device);
            (b.ids, Some(b.attention), b.loss_mask)
        });
    let (total, weight) = m.model.lm_loss_sums(batches, c.precision)?;
    let sums = world.sum_values(&[total, weight])?;
    let loss = sums[0] / sums[1].max(1.0);
    log.log_eval(step, &[("loss", loss), ("ppl", loss.exp())])?;
    if !s.prompts.is_empty() && world.is_main() {
        let records = sample_replies(s, c, step)?;
        log.log_samples(&records)?;
    }
    Ok(Some(
        [
            ("loss".to_string(), loss.into()),
            ("ppl".into(), loss.exp().into()),
        ]
        .into_iter()
        .collect(),
    ))
}

/// One reply per held-out prompt, seeded by step and prompt, for samples.jsonl.
fn sample_replies(s: &Setup, c: &Config, step: u64) -> anyhow::Result<Vec<serde_json::Value>> {
    let (m, template) = (&s.chat.m, &s.chat.template);
    let ids: Vec<Vec<i64>> = s
        .prompts
        .iter()
        .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
        .collect();
    let room = m.model.token_room() - ids.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let sampling = SamplingConfig {
        top_p: Some(0.95),
        ..SamplingConfig::chat(template, c.max_new_tokens.min(room).max(1), c.temperature)
    };
    let base = seed_for(c.seed, "sample", step);
    let seeds: Vec<u64> = (0..ids.len() as u64)
        .map(|i| seed_for(base, "prompt", i))
        .collect();
    let g = generate(&m.model, &ids, &sampling, &seeds)?;
    let replies = decode_replies(&m.tokenizer, &g.tokens, &g.mask, &template.stop_ids())?;
    let mut out = Vec::new();
    for ((prompt, reference), reply) in s.prompts.iter().zip(replies) {
        out.push(json!({
            "step": step,
            "prompt": m.tokenizer.decode(prompt)?,
            "response": reply.text,
            "reference": reference,
            "ended_with_eos": reply.ended_with_eos,
        }));
    }
    Ok(out)
}

/// The positions of an example that are trained targets (the loss mask past its first token).
fn targets(e: &Example) -> usize {
    e.loss_mask.iter().skip(1).filter(|&&m| m != 0).count()
}

impl Config {
    fn memory_saving(&self) -> MemorySaving {
        MemorySaving {
            checkpoint_blocks: self.activation_checkpointing,
            loss_chunk: self.loss_chunk,
        }
    }
}
