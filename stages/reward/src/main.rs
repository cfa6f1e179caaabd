//! temper-reward: a Bradley–Terry reward model. The backbone comes from a checkpoint (usually
//! SFT), a fresh scalar head reads the score at each sequence's last real token (the reply's
//! EOS) or averages it over the reply (`pooling`), and the loss is
//! −log σ(r_chosen − r_rejected − margin). The checkpoint holds backbone
//! and head (`score.weight`), loadable by PPO as a reward model and as a critic.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use temper_core::checkpoint::ScoreHead;
use temper_core::losses::bradley_terry_loss;
use temper_core::stage::{self, check_finite, invalid, optimizer_step, StageArgs, StageError};
use temper_core::{
    config_hash, load_checkpoint, resolve_device, with_autocast, AdamW, DeviceSpec, LoadSpec,
    OptimSettings, Precision, RunDir, ScorePooling, Transformer,
};
use temper_data::{
    pad_right, shuffled, ChatTemplate, Example, Fields, LoadOptions, Overlong, TextTokenizer,
};
use tracing::info;

/// Bradley–Terry reward model on preference pairs.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    stage: StageArgs,
}

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
    steps: u64,
    /// Pairs per micro-batch (each pair is two sequences).
    batch_size: usize,
    #[serde(default)]
    optim: OptimSettings,
    #[serde(default = "default_every")]
    eval_every: u64,
    #[serde(default = "default_every")]
    save_every: u64,
    #[serde(default = "default_log_every")]
    log_every: u64,
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

fn main() {
    let args = Args::parse();
    stage::main_with("temper-reward", || run(&args.stage));
}

type Pair = (Example, Example);

fn run(args: &StageArgs) -> Result<(), StageError> {
    let cfg: Config = stage::read_config(&args.config)?;
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
    let device = resolve_device(cfg.device).map_err(invalid)?;
    tch::manual_seed(cfg.seed as i64);
    let tokenizer_path = cfg.init.join("tokenizer.json");
    let tok = TextTokenizer::load(&tokenizer_path).map_err(invalid)?;
    let template = ChatTemplate::new(&tok).map_err(invalid)?;
    let spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Fresh,
    };
    let (vs, mut model) = load_checkpoint(&cfg.init, spec, device).map_err(invalid)?;
    model.config.score_pooling = cfg.pooling;
    let max_len = cfg.max_len.unwrap_or(model.config.max_position as usize);
    let opts = LoadOptions {
        tokenizer: &tok,
        template,
        fields: &cfg.fields,
        max_len,
        overlong: cfg.overlong,
        train_on_prompt: false,
    };
    let (train, report) = opts.pairs(&cfg.data).map_err(invalid)?;
    info!(
        "{}: {} pairs ({} truncated, {} skipped)",
        cfg.data.display(),
        train.len(),
        report.truncated,
        report.skipped
    );
    let eval = match &cfg.eval_data {
        Some(p) => opts.pairs(p).map_err(invalid)?.0,
        None => Vec::new(),
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

    let per_epoch = train.len().div_ceil(cfg.batch_size) as u64;
    let mut epoch_order: Option<(u64, Vec<usize>)> = None;
    let bar = stage::progress_bar(cfg.steps, progress.step);
    let mut window = (std::time::Instant::now(), 0u64);
    let mut last_eval = None;
    if progress.step == 0 && !eval.is_empty() {
        // A baseline before any update: an untrained head is at chance.
        let m = evaluate(&model, &eval, &cfg, template.pad, device)?;
        run.log(
            0,
            "eval",
            &[
                ("loss", m.loss),
                ("accuracy", m.accuracy),
                ("margin", m.margin),
                ("reward_chosen", m.chosen),
                ("reward_rejected", m.rejected),
            ],
        )?;
    }
    while progress.step < cfg.steps {
        let step = progress.step;
        let lr = cfg.optim.lr_at(step, cfg.steps);
        let (mut step_loss, mut step_acc) = (0.0, 0.0);
        for micro in 0..cfg.optim.grad_accum {
            let k = step * cfg.optim.grad_accum + micro;
            let epoch = k / per_epoch;
            if epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                epoch_order = Some((
                    epoch,
                    shuffled(train.len(), cfg.seed ^ epoch.wrapping_mul(0x9E37)),
                ));
            }
            let order = &epoch_order.as_ref().expect("set above").1;
            let start = ((k % per_epoch) as usize) * cfg.batch_size;
            let pairs: Vec<&Pair> = order[start..(start + cfg.batch_size).min(order.len())]
                .iter()
                .map(|&i| &train[i])
                .collect();
            let out = pair_scores(&model, &pairs, template.pad, device, cfg.precision)?;
            let loss = bradley_terry_loss(&out.chosen, &out.rejected, cfg.margin);
            let value = loss.double_value(&[]);
            if let Err(e) = check_finite(value, step + 1, step) {
                run.save_state(&[&vs], &[&opt], &progress)?;
                return Err(e.into());
            }
            (loss / cfg.optim.grad_accum as f64).backward();
            step_loss += value / cfg.optim.grad_accum as f64;
            step_acc += out.accuracy() / cfg.optim.grad_accum as f64;
            progress.tokens_seen += out.tokens;
            window.1 += out.tokens;
        }
        let grad_norm = optimizer_step(&mut opt, cfg.optim.grad_clip, lr)?;
        progress.step += 1;
        let step = progress.step;
        bar.set_position(step);
        bar.set_message(format!("loss {step_loss:.4} acc {step_acc:.2}"));
        if step % cfg.log_every == 0 || step == cfg.steps {
            let tps = window.1 as f64 / window.0.elapsed().as_secs_f64();
            window = (std::time::Instant::now(), 0);
            run.log(
                step,
                "train",
                &[
                    ("loss", step_loss),
                    ("accuracy", step_acc),
                    ("lr", lr),
                    ("grad_norm", grad_norm),
                    ("tokens", progress.tokens_seen as f64),
                    ("tokens_per_s", tps),
                ],
            )?;
            info!(
                "step {step}/{}: loss {step_loss:.4}, accuracy {step_acc:.3}, {tps:.0} tok/s",
                cfg.steps
            );
        }
        if (step % cfg.eval_every == 0 || step == cfg.steps) && !eval.is_empty() {
            let m = evaluate(&model, &eval, &cfg, template.pad, device)?;
            run.log(
                step,
                "eval",
                &[
                    ("loss", m.loss),
                    ("accuracy", m.accuracy),
                    ("margin", m.margin),
                    ("reward_chosen", m.chosen),
                    ("reward_rejected", m.rejected),
                ],
            )?;
            info!(
                "step {step}: eval loss {:.4}, accuracy {:.3}, margin {:.3}",
                m.loss, m.accuracy, m.margin
            );
            last_eval = Some(m);
        }
        if step % cfg.save_every == 0 || step == cfg.steps {
            run.save_state(&[&vs], &[&opt], &progress)?;
        }
    }
    bar.finish_and_clear();

    run.save_final(&model, &vs, &tokenizer_path)?;
    let mut summary = run.summary_base(&progress);
    summary.insert("train_pairs".into(), train.len().into());
    if let Some(m) = last_eval {
        for (k, v) in [
            ("loss", m.loss),
            ("accuracy", m.accuracy),
            ("margin", m.margin),
            ("reward_chosen", m.chosen),
            ("reward_rejected", m.rejected),
        ] {
            summary.insert(k.into(), v.into());
        }
    }
    run.write_summary("ok", summary)?;
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
fn pair_scores(
    model: &Transformer,
    pairs: &[&Pair],
    pad: u32,
    device: Device,
    precision: Precision,
) -> anyhow::Result<PairScores> {
    let rows: Vec<&Example> = pairs
        .iter()
        .map(|p| &p.0)
        .chain(pairs.iter().map(|p| &p.1))
        .collect();
    let b = pad_right(&rows, pad);
    let shape = [b.rows as i64, b.cols as i64];
    let ids = Tensor::from_slice(&b.ids).view(shape).to_device(device);
    let attn = Tensor::from_slice(&b.attention_mask)
        .view(shape)
        .to_device(device);
    let reply = Tensor::from_slice(&b.loss_mask)
        .view(shape)
        .to_device(device);
    let scores = with_autocast(device, precision, || -> anyhow::Result<Tensor> {
        let hidden = model.hidden_states(&ids, Some(&attn), None)?;
        Ok(model
            .sequence_scores(&hidden, &attn, &reply)?
            .to_kind(Kind::Float))
    })??;
    let n = pairs.len() as i64;
    Ok(PairScores {
        chosen: scores.narrow(0, 0, n),
        rejected: scores.narrow(0, n, n),
        tokens: b.attention_mask.iter().sum::<i64>() as u64,
    })
}

struct EvalMetrics {
    loss: f64,
    accuracy: f64,
    margin: f64,
    chosen: f64,
    rejected: f64,
}

fn evaluate(
    model: &Transformer,
    eval: &[Pair],
    cfg: &Config,
    pad: u32,
    device: Device,
) -> anyhow::Result<EvalMetrics> {
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for chunk in eval.chunks(cfg.batch_size) {
        let pairs: Vec<&Pair> = chunk.iter().collect();
        let s = tch::no_grad(|| pair_scores(model, &pairs, pad, device, cfg.precision))?;
        chosen.push(s.chosen);
        rejected.push(s.rejected);
    }
    let (c, r) = (Tensor::cat(&chosen, 0), Tensor::cat(&rejected, 0));
    let scalar = |t: Tensor| t.to_kind(Kind::Double).double_value(&[]);
    Ok(EvalMetrics {
        loss: scalar(bradley_terry_loss(&c, &r, cfg.margin)),
        accuracy: scalar(c.gt_tensor(&r).to_kind(Kind::Float).mean(Kind::Float)),
        margin: scalar((&c - &r).mean(Kind::Float)),
        chosen: scalar(c.mean(Kind::Float)),
        rejected: scalar(r.mean(Kind::Float)),
    })
}
