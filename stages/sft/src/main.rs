//! temper-sft: supervised fine-tuning on chat-templated conversations. The loss covers the
//! assistant's replies (and their EOS) only, unless `train_on_prompt`; at each evaluation it
//! logs the held-out loss and samples replies to a few held-out prompts into samples.jsonl.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};
use temper_core::sample::{generate, SamplingConfig};
use temper_core::stage::{self, check_finite, invalid, optimizer_step, StageArgs, StageError};
use temper_core::{
    causal_lm_loss, config_hash, load_checkpoint, resolve_device, with_autocast, AdamW, DeviceSpec,
    LoadSpec, OptimSettings, Precision, RunDir, Transformer,
};
use temper_data::{
    length_grouped_batches, pack, pad_right, shuffled, ChatTemplate, Example, Fields, LoadOptions,
    Overlong, TextTokenizer,
};
use tracing::info;

/// Prompt-masked supervised fine-tuning on chat-templated examples.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    stage: StageArgs,
}

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
    steps: u64,
    batch_size: usize,
    #[serde(default)]
    optim: OptimSettings,
    #[serde(default = "default_every")]
    eval_every: u64,
    #[serde(default = "default_every")]
    save_every: u64,
    #[serde(default = "default_log_every")]
    log_every: u64,
    /// Held-out prompts to sample a reply for at each evaluation.
    #[serde(default = "default_samples")]
    samples: usize,
    #[serde(default = "default_max_new")]
    max_new_tokens: i64,
    #[serde(default = "default_temperature")]
    temperature: f64,
    #[serde(default)]
    device: DeviceSpec,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    seed: u64,
}

fn default_every() -> u64 {
    100
}
fn default_log_every() -> u64 {
    10
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
    let args = Args::parse();
    stage::main_with("temper-sft", || run(&args.stage));
}

fn validate(cfg: &Config) -> Result<(), StageError> {
    cfg.optim.validate().map_err(|m| invalid(anyhow!(m)))?;
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(invalid(anyhow!("steps and batch_size must be positive")));
    }
    for f in [Some(&cfg.data), cfg.eval_data.as_ref()]
        .into_iter()
        .flatten()
    {
        if !f.exists() {
            return Err(invalid(anyhow!("{} not found", f.display())));
        }
    }
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        if !cfg.init.join(f).exists() {
            return Err(invalid(anyhow!("init: {} lacks {f}", cfg.init.display())));
        }
    }
    Ok(())
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let cfg: Config = stage::read_config(&args.config)?;
    validate(&cfg)?;
    let device = resolve_device(cfg.device).map_err(invalid)?;
    tch::manual_seed(cfg.seed as i64);
    let tokenizer_path = cfg.init.join("tokenizer.json");
    let tok = TextTokenizer::load(&tokenizer_path).map_err(invalid)?;
    let template = ChatTemplate::new(&tok).map_err(invalid)?;
    let (vs, model) = load_checkpoint(&cfg.init, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    let max_len = cfg.max_len.unwrap_or(model.config.max_position as usize);
    if max_len as i64 > model.config.max_position {
        return Err(invalid(anyhow!(
            "max_len {max_len} exceeds the model's max_position {}",
            model.config.max_position
        )));
    }
    let opts = LoadOptions {
        tokenizer: &tok,
        template,
        fields: &cfg.fields,
        max_len,
        overlong: cfg.overlong,
        train_on_prompt: cfg.train_on_prompt,
    };
    let (mut train, report) = opts.sft(&cfg.data).map_err(invalid)?;
    info!(
        "{}: {} examples ({} truncated, {} skipped), mean {:.1} tokens",
        cfg.data.display(),
        report.kept,
        report.truncated,
        report.skipped,
        report.mean_tokens()
    );
    if cfg.packing {
        let order = shuffled(train.len(), cfg.seed);
        let ordered: Vec<Example> = order.into_iter().map(|i| train[i].clone()).collect();
        train = pack(&ordered, max_len);
        info!("packed into {} rows of up to {max_len} tokens", train.len());
    }
    let (eval, prompts) = match &cfg.eval_data {
        Some(p) => (
            opts.sft(p).map_err(invalid)?.0,
            opts.sft_prompts(p, cfg.samples).map_err(invalid)?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    if args.validate {
        println!(
            "{}",
            serde_yaml::to_string(&cfg).context("printing the resolved config")?
        );
        return Ok(());
    }

    let mut run = RunDir::create(&args.out)?;
    stage::write_resolved(&run.out, &cfg)?;
    let mut opt = AdamW::new(&vs, cfg.optim.adamw());
    let hash = config_hash(&cfg);
    let mut progress = run.resume_or_start(&[&vs], &mut [&mut opt], &hash)?;

    let lengths: Vec<usize> = train.iter().map(Example::len).collect();
    let mut epoch_batches: Option<(u64, Vec<Vec<usize>>)> = None;
    let bar = stage::progress_bar(cfg.steps, progress.step);
    let mut window = (std::time::Instant::now(), 0u64);
    let mut last_eval = None;
    if progress.step == 0 && !eval.is_empty() {
        // A baseline before any update, so the curve shows what fine-tuning changed.
        let loss = eval_loss(
            &model,
            &eval,
            cfg.batch_size,
            template.pad,
            device,
            cfg.precision,
        )?;
        run.log(0, "eval", &[("loss", loss), ("ppl", loss.exp())])?;
        info!("step 0: eval loss {loss:.4}, ppl {:.2}", loss.exp());
        if !prompts.is_empty() {
            let records = sample_replies(&model, &tok, &template, &prompts, &cfg, 0)?;
            run.log_samples(&records)?;
        }
    }
    while progress.step < cfg.steps {
        let step = progress.step;
        let lr = cfg.optim.lr_at(step, cfg.steps);
        let mut step_loss = 0.0;
        for micro in 0..cfg.optim.grad_accum {
            // Micro-batch k is batch k % n of epoch k / n: a function of the step alone, so a
            // resumed run reads exactly the batches an uninterrupted one would.
            let k = step * cfg.optim.grad_accum + micro;
            let epoch = k / lengths.len().div_ceil(cfg.batch_size) as u64;
            if epoch_batches.as_ref().is_none_or(|(e, _)| *e != epoch) {
                epoch_batches = Some((
                    epoch,
                    length_grouped_batches(
                        &lengths,
                        cfg.batch_size,
                        cfg.seed ^ epoch.wrapping_mul(0x9E37),
                    ),
                ));
            }
            let batches = &epoch_batches.as_ref().expect("set above").1;
            let rows: Vec<&Example> = batches[(k % batches.len() as u64) as usize]
                .iter()
                .map(|&i| &train[i])
                .collect();
            let (loss, tokens) = batch_loss(&model, &rows, template.pad, device, cfg.precision)?;
            let value = loss.double_value(&[]);
            if let Err(e) = check_finite(value, step + 1, step) {
                run.save_state(&[&vs], &[&opt], &progress)?;
                return Err(e.into());
            }
            (loss / cfg.optim.grad_accum as f64).backward();
            step_loss += value / cfg.optim.grad_accum as f64;
            progress.tokens_seen += tokens;
            window.1 += tokens;
        }
        let grad_norm = optimizer_step(&mut opt, cfg.optim.grad_clip, lr)?;
        progress.step += 1;
        let step = progress.step;
        bar.set_position(step);
        bar.set_message(format!("loss {step_loss:.4}"));
        if step % cfg.log_every == 0 || step == cfg.steps {
            let tps = window.1 as f64 / window.0.elapsed().as_secs_f64();
            window = (std::time::Instant::now(), 0);
            run.log(
                step,
                "train",
                &[
                    ("loss", step_loss),
                    ("ppl", step_loss.exp()),
                    ("lr", lr),
                    ("grad_norm", grad_norm),
                    ("tokens", progress.tokens_seen as f64),
                    ("tokens_per_s", tps),
                ],
            )?;
            info!("step {step}/{}: loss {step_loss:.4}, lr {lr:.2e}, grad_norm {grad_norm:.3}, {tps:.0} tok/s", cfg.steps);
        }
        if (step % cfg.eval_every == 0 || step == cfg.steps) && !eval.is_empty() {
            let loss = eval_loss(
                &model,
                &eval,
                cfg.batch_size,
                template.pad,
                device,
                cfg.precision,
            )?;
            run.log(step, "eval", &[("loss", loss), ("ppl", loss.exp())])?;
            info!("step {step}: eval loss {loss:.4}, ppl {:.2}", loss.exp());
            last_eval = Some(loss);
            if !prompts.is_empty() {
                let records = sample_replies(&model, &tok, &template, &prompts, &cfg, step)?;
                run.log_samples(&records)?;
            }
        }
        if step % cfg.save_every == 0 || step == cfg.steps {
            run.save_state(&[&vs], &[&opt], &progress)?;
        }
    }
    bar.finish_and_clear();

    run.save_final(&model, &vs, &tokenizer_path)?;
    let mut summary = run.summary_base(&progress);
    summary.insert("train_examples".into(), train.len().into());
    summary.insert(
        "data".into(),
        serde_json::to_value(&report).context("report")?,
    );
    if let Some(loss) = last_eval {
        summary.insert("loss".into(), loss.into());
        summary.insert("ppl".into(), loss.exp().into());
    }
    run.write_summary("ok", summary)?;
    Ok(())
}

/// Masked next-token loss of a padded batch, and its number of real tokens.
fn batch_loss(
    model: &Transformer,
    rows: &[&Example],
    pad: u32,
    device: Device,
    precision: Precision,
) -> anyhow::Result<(Tensor, u64)> {
    let b = pad_right(rows, pad);
    let shape = [b.rows as i64, b.cols as i64];
    let ids = Tensor::from_slice(&b.ids).view(shape).to_device(device);
    let attn = Tensor::from_slice(&b.attention_mask)
        .view(shape)
        .to_device(device);
    let loss_mask = Tensor::from_slice(&b.loss_mask)
        .view(shape)
        .to_device(device);
    let loss = with_autocast(device, precision, || -> anyhow::Result<Tensor> {
        let (_, logits) = model.forward(&ids, Some(&attn))?;
        Ok(causal_lm_loss(&logits, &ids, &loss_mask))
    })??;
    Ok((loss, b.attention_mask.iter().sum::<i64>() as u64))
}

/// Token-weighted mean loss over all held-out examples.
fn eval_loss(
    model: &Transformer,
    eval: &[Example],
    batch_size: usize,
    pad: u32,
    device: Device,
    precision: Precision,
) -> anyhow::Result<f64> {
    let (mut total, mut weight) = (0.0, 0.0);
    for chunk in eval.chunks(batch_size) {
        let rows: Vec<&Example> = chunk.iter().collect();
        let targets: f64 = chunk
            .iter()
            .map(|e| e.loss_mask.iter().skip(1).map(|&m| m as f64).sum::<f64>())
            .sum();
        let (loss, _) = tch::no_grad(|| batch_loss(model, &rows, pad, device, precision))?;
        total += loss.to_kind(Kind::Double).double_value(&[]) * targets;
        weight += targets;
    }
    Ok(total / weight.max(1.0))
}

/// Samples one reply per held-out prompt (seeded by step and prompt) for samples.jsonl.
fn sample_replies(
    model: &Transformer,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    prompts: &[(Vec<u32>, String)],
    cfg: &Config,
    step: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
        .collect();
    let room = model.config.max_position - ids.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let sampling = SamplingConfig {
        max_new_tokens: cfg.max_new_tokens.min(room).max(1),
        temperature: cfg.temperature,
        top_k: None,
        top_p: Some(0.95),
        eos_token_id: Some(template.eos as i64),
        pad_token_id: template.pad as i64,
    };
    let seeds: Vec<u64> = (0..ids.len() as u64)
        .map(|i| cfg.seed ^ (step << 16) ^ i)
        .collect();
    let g = generate(model, &ids, &sampling, &seeds)?;
    let mut out = Vec::new();
    for (i, (prompt, reference)) in prompts.iter().enumerate() {
        let toks = Vec::<i64>::try_from(g.tokens.get(i as i64))?;
        let mask = Vec::<bool>::try_from(g.mask.get(i as i64))?;
        let reply: Vec<u32> = toks
            .iter()
            .zip(&mask)
            .filter(|(&t, &m)| m && t != template.eos as i64)
            .map(|(&t, _)| t as u32)
            .collect();
        out.push(json!({
            "step": step,
            "prompt": tok.decode(prompt)?,
            "response": tok.decode(&reply)?,
            "reference": reference,
            "ended_with_eos": toks.iter().zip(&mask).any(|(&t, &m)| m && t == template.eos as i64),
        }));
    }
    Ok(out)
}
