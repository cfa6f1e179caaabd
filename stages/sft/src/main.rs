//! temper-sft: supervised fine-tuning on chat-templated conversations. The loss covers the
//! assistant's replies (and their EOS) only, unless `train_on_prompt`; at each evaluation it
//! logs the held-out loss and samples replies to a few held-out prompts into samples.jsonl.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use temper_core::checkpoint::{check_save, SaveOptions};
use temper_core::dist::{Placement, Ranks, World};
use temper_core::model::MemorySaving;
use temper_core::peft::{check_peft, PeftConfig};
use temper_core::sample::{generate, SamplingConfig};
use temper_core::schedule::check_optim;
use temper_core::scoring::decode_replies;
use temper_core::{
    load_with_tokenizer, resume_or_start, save_state, BatchTensors, DeviceSpec, LoadSpec, Loaded,
    OptimSettings, Precision,
};
use temper_data::{
    length_grouped_batches, pack, seed_for, shuffled, ChatTemplate, Epochs, Example, Fields,
    LoadOptions, Overlong,
};
use temper_stage::cadence::{every_10, every_100};
use temper_stage::{
    check_finite, checked_config, invalid, step_fields, Cadence, ConfigFile, Every, Inputs,
    MetricsLog, StageArgs, StageError, StageKind, Throughput,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Checkpoint folder to fine-tune (with its tokenizer.json).
    init: PathBuf,
    /// SFT examples: alpaca rows or `messages` lists (.jsonl or .parquet).
    data: PathBuf,
    #[serde(default)]
    eval_data: Option<PathBuf>,
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
    cfg.ensure(
        c.max_new_tokens >= 1,
        "max_new_tokens",
        "must be at least 1",
    )?;
    cfg.ensure(
        c.temperature.is_finite() && c.temperature >= 0.0,
        "temperature",
        "must be ≥ 0 (0 is greedy)",
    )?;
    inputs.checkpoint(cfg, "init", &c.init, true)?;
    inputs.file(cfg, "data", &c.data)?;
    if let Some(e) = &c.eval_data {
        inputs.file(cfg, "eval_data", e)?;
    }
    Ok(())
}

/// The model and the rendered data, cross-checked before anything is written.
struct Setup {
    m: Loaded,
    template: ChatTemplate,
    train: Vec<Example>,
    eval: Vec<Example>,
    /// Held-out prompts to sample from at evaluations, with their reference replies.
    prompts: Vec<(Vec<u32>, String)>,
    report: temper_data::LoadReport,
}

fn prepare(cfg: &ConfigFile<Config>, device: tch::Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let mut m = load_with_tokenizer(&c.init, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
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
        .training_bytes(c.batch_size as i64, max_len as i64);
    temper_core::device::check_memory(device, estimate, "training at this batch_size and max_len")
        .map_err(|msg| cfg.error("batch_size", msg))?;
    let opts = LoadOptions {
        tokenizer: &m.tokenizer,
        template: template.clone(),
        fields: &c.fields,
        max_len,
        overlong: c.overlong,
        train_on_prompt: c.train_on_prompt,
    };
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
        train = pack(&ordered, max_len);
        tracing::info!("packed into {} rows of up to {max_len} tokens", train.len());
    }
    let (eval, prompts) = match &c.eval_data {
        Some(p) => (
            opts.sft(p).map_err(invalid)?.0,
            opts.sft_prompts(p, c.samples).map_err(invalid)?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    Ok(Setup {
        m,
        template,
        train,
        eval,
        prompts,
        report,
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let Some(cfg) = checked_config::<Config>(args, StageKind::Sft, check)? else {
        return Ok(()); // an input is pending: the rest is checked when it exists
    };
    // Data parallel (torchrun / Slurm): `batch_size` rows per rank; a bad environment stops
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
    let (model, device) = (&s.m.model, s.m.model.device());
    let stores = s.m.stores();
    let ranks = Ranks::open(&world, &args.out, "sft")?;
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
    let lengths: Vec<usize> = s.train.iter().map(Example::len).collect();
    // Micro-batch k of the run is batch k % n of epoch k / n: a function of the step alone.
    // With several ranks a batch holds batch_size × ranks rows and each rank takes its share.
    let global_batch = c.batch_size * world.size();
    let mut batches = Epochs::new(|e| {
        length_grouped_batches(&lengths, global_batch, seed_for(c.seed, "epoch", e))
    });
    let mut bar = ranks.progress(c.steps, progress.step);
    let mut throughput = Throughput::new();
    let mut last_eval = None;
    if progress.step == 0 {
        // A baseline before any update, so the curve shows what fine-tuning changed.
        last_eval = evaluate(&s, c, &world, &mut log, 0)?;
    }
    while progress.step < c.steps {
        let step = progress.step;
        let lr = c.optim.lr_at(step, c.steps);
        let accum = c.optim.grad_accum;
        let mut step_loss = 0.0;
        s.m.tuning.set_training(true); // adapter dropout, when there is one
        let mut step_tokens = 0;
        for micro in 0..accum {
            let global: Vec<&Example> = batches
                .get(step * accum + micro)
                .iter()
                .map(|&i| &s.train[i])
                .collect();
            // Each rank's mean counts by its share of the batch's targets, so the averaged
            // gradient is the whole batch's token mean, as one process would compute it.
            let all_targets: usize = global.iter().map(|e| targets(e)).sum();
            let rows = &global[world.shard(global.len())];
            let share =
                rows.iter().map(|e| targets(e)).sum::<usize>() as f64 / all_targets.max(1) as f64;
            if rows.is_empty() || share == 0.0 {
                continue; // nothing of this batch here; the gradient all-reduce still joins
            }
            let b = BatchTensors::pad(rows, s.template.pad, device);
            let weight = share * world.size() as f64 / accum as f64;
            let saving = c.memory_saving();
            let (ids, attn, mask) = (&b.ids, Some(&b.attention), &b.loss_mask);
            let value = if saving.any() {
                let v = model.lm_loss_backward(ids, attn, mask, c.precision, weight, saving)?;
                s.m.tuning.backward_regulariser(weight);
                v
            } else {
                let loss = model.lm_loss(ids, attn, mask, c.precision)?;
                let value = loss.double_value(&[]);
                if value.is_finite() {
                    if micro + 1 == accum {
                        sync.arm_last_backward();
                    }
                    (s.m.tuning.regularised(loss) * weight).backward();
                }
                value
            };
            if let Err(e) = check_finite(value, step + 1, step) {
                if world.is_main() {
                    save_state(&ranks.out, &log, &stores, &[&opt], &progress)?;
                }
                return Err(e.into());
            }
            step_loss += value * share / accum as f64;
            step_tokens += b.tokens;
        }
        // The mean gradient over the global batch; every rank then takes the same step.
        opt.ensure_gradients();
        sync.finish()?;
        let sums = world.sum_values(&[step_loss, step_tokens as f64])?;
        let (step_loss, step_tokens) = (sums[0], sums[1] as u64);
        progress.tokens_seen += step_tokens;
        throughput.add(step_tokens);
        let grad_norm = opt.update_then(c.optim.grad_clip, lr, || s.m.tuning.after_update())?;
        progress.step += 1;
        let step = progress.step;
        bar.set(step, format!("loss {step_loss:.4}"));
        if every.log_due(step) {
            let mut fields = step_fields(
                step_loss,
                lr,
                grad_norm,
                progress.tokens_seen,
                throughput.take(),
            );
            fields.push(("ppl", step_loss.exp()));
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
    summary.insert("train_examples".into(), s.train.len().into());
    summary.insert(
        "data".into(),
        serde_json::to_value(&s.report).context("report")?,
    );
    match last_eval {
        Some(loss) => {
            summary.insert("loss".into(), loss.into());
            summary.insert("ppl".into(), loss.exp().into());
        }
        // Resumed at the last step, after the final evaluation and save (stopped before the
        // summary): the loop did not run, and the final evaluation is the one logged then.
        None => summary.extend(log.eval_logged_at_resume()),
    }
    log.write_summary("ok", summary)?;
    Ok(())
}

/// Held-out loss (logged) and sampled replies (to samples.jsonl); None without eval data.
/// With several ranks each scores its share of the held-out set and the sums are reduced;
/// rank 0 alone samples.
fn evaluate(
    s: &Setup,
    c: &Config,
    world: &World,
    log: &mut MetricsLog,
    step: u64,
) -> anyhow::Result<Option<f64>> {
    if s.eval.is_empty() {
        return Ok(None);
    }
    s.m.tuning.set_training(false);
    let device = s.m.model.device();
    let batches = s.eval[world.shard(s.eval.len())]
        .chunks(c.batch_size)
        .map(|chunk| {
            let rows: Vec<&Example> = chunk.iter().collect();
            let b = BatchTensors::pad(&rows, s.template.pad, device);
            (b.ids, Some(b.attention), b.loss_mask)
        });
    let (total, weight) = s.m.model.lm_loss_sums(batches, c.precision)?;
    let sums = world.sum_values(&[total, weight])?;
    let loss = sums[0] / sums[1].max(1.0);
    log.log_eval(step, &[("loss", loss), ("ppl", loss.exp())])?;
    if !s.prompts.is_empty() && world.is_main() {
        let records = sample_replies(s, c, step)?;
        log.log_samples(&records)?;
    }
    Ok(Some(loss))
}

/// One reply per held-out prompt, seeded by step and prompt, for samples.jsonl.
fn sample_replies(s: &Setup, c: &Config, step: u64) -> anyhow::Result<Vec<serde_json::Value>> {
    let model = &s.m.model;
    let ids: Vec<Vec<i64>> = s
        .prompts
        .iter()
        .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
        .collect();
    let room = model.token_room() - ids.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let sampling = SamplingConfig {
        max_new_tokens: c.max_new_tokens.min(room).max(1),
        temperature: c.temperature,
        top_k: None,
        top_p: Some(0.95),
        eos_token_id: Some(s.template.eos as i64),
        also_stop: s.template.also_stop(),
        pad_token_id: s.template.pad as i64,
    };
    let base = seed_for(c.seed, "sample", step);
    let seeds: Vec<u64> = (0..ids.len() as u64)
        .map(|i| seed_for(base, "prompt", i))
        .collect();
    let g = generate(model, &ids, &sampling, &seeds)?;
    let replies = decode_replies(&s.m.tokenizer, &g.tokens, &g.mask, &s.template.stop_ids())?;
    let mut out = Vec::new();
    for ((prompt, reference), reply) in s.prompts.iter().zip(replies) {
        out.push(json!({
            "step": step,
            "prompt": s.m.tokenizer.decode(prompt)?,
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
