//! temper-pretrain: next-token training on a text corpus, from scratch (shape from `model:`) or
//! from a checkpoint (`init:`, continued pretraining). Evaluates loss and perplexity on the
//! corpus's held-out documents and on any extra streams (e.g. general English while adapting
//! to a domain, to see forgetting). Set up, loop, save — nothing else lives here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use temper_core::stage::{self, check_finite, invalid, optimizer_step, StageArgs, StageError};
use temper_core::{
    causal_lm_loss, config_hash, load_checkpoint, resolve_device, with_autocast, AdamW, DeviceSpec,
    Heads, LoadSpec, OptimSettings, Precision, RunDir, Transformer,
};
use temper_data::stream::{build_stream, StreamSettings};
use temper_data::tokenizer::{EOS, PAD};
use temper_data::{shuffled, Fields, TextSplit, TextTokenizer};
use tracing::info;

/// Next-token training from scratch or from a checkpoint (continued pretraining).
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    stage: StageArgs,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// tokenizer.json (ignored in favour of the checkpoint's own when `init` holds one).
    tokenizer: PathBuf,
    /// Training corpus: .txt, .jsonl or .parquet files with a text field.
    data: Vec<PathBuf>,
    /// Extra evaluation streams by name, e.g. general English while adapting to a domain.
    #[serde(default)]
    eval_data: BTreeMap<String, EvalStream>,
    /// Checkpoint folder to continue from; without it the model starts from `model:`.
    #[serde(default)]
    init: Option<PathBuf>,
    /// Model shape for training from scratch (vocab_size defaults to the tokenizer's).
    #[serde(default)]
    model: Option<serde_yaml::Value>,
    /// Tokens per training sequence.
    block_size: usize,
    #[serde(default = "default_val_fraction")]
    val_fraction: f64,
    #[serde(default = "default_split")]
    text_split: TextSplit,
    #[serde(default)]
    fields: Fields,
    /// Optimizer steps.
    steps: u64,
    /// Sequences per micro-batch.
    batch_size: usize,
    #[serde(default)]
    optim: OptimSettings,
    #[serde(default = "default_every")]
    eval_every: u64,
    /// Batches of held-out blocks per evaluation (0 = all).
    #[serde(default = "default_eval_batches")]
    eval_batches: usize,
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
    /// Where tokenized corpora are cached (default ~/.cache/temper/tokens).
    #[serde(default)]
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalStream {
    files: Vec<PathBuf>,
    /// `heldout`: the documents the hash split holds out (use for a corpus also trained on);
    /// `all`: every document (use for a file that is held out as a whole).
    #[serde(default)]
    split: EvalSplit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EvalSplit {
    #[default]
    Heldout,
    All,
}

fn default_val_fraction() -> f64 {
    0.05
}
fn default_split() -> TextSplit {
    TextSplit::BlankLine
}
fn default_every() -> u64 {
    100
}
fn default_eval_batches() -> usize {
    20
}
fn default_log_every() -> u64 {
    10
}

fn main() {
    let args = Args::parse();
    stage::main_with("temper-pretrain", || run(&args.stage));
}

fn validate(cfg: &Config) -> Result<(), StageError> {
    let bad = |m: String| Err(invalid(anyhow!(m)));
    cfg.optim.validate().map_err(|m| invalid(anyhow!(m)))?;
    if cfg.steps == 0 || cfg.batch_size == 0 || cfg.block_size < 2 {
        return bad("steps and batch_size must be positive and block_size at least 2".into());
    }
    if cfg.init.is_none() == cfg.model.is_none() {
        return bad("set exactly one of `init` (continue from a checkpoint) and `model` (train from scratch)".into());
    }
    for f in cfg
        .data
        .iter()
        .chain(cfg.eval_data.values().flat_map(|e| &e.files))
        .chain([&cfg.tokenizer])
    {
        if !f.exists() {
            return bad(format!("{} not found", f.display()));
        }
    }
    if cfg.data.is_empty() {
        return bad("data: list at least one file".into());
    }
    if let Some(init) = &cfg.init {
        if !init.join("model.safetensors").exists() {
            return bad(format!(
                "init: {} holds no model.safetensors",
                init.display()
            ));
        }
    }
    Ok(())
}

fn cache_dir(cfg: &Config) -> PathBuf {
    cfg.cache_dir.clone().unwrap_or_else(|| {
        let base = std::env::var_os("TEMPER_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/temper")
            });
        base.join("tokens")
    })
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let cfg: Config = stage::read_config(&args.config)?;
    validate(&cfg)?;
    let tokenizer_path = match &cfg.init {
        Some(init) if init.join("tokenizer.json").exists() => init.join("tokenizer.json"),
        _ => cfg.tokenizer.clone(),
    };
    let tok = TextTokenizer::load(&tokenizer_path).map_err(invalid)?;
    let (eos, pad) = (tok.require(EOS).map_err(invalid)?, tok.id(PAD).unwrap_or(0));
    let device = resolve_device(cfg.device).map_err(invalid)?;
    tch::manual_seed(cfg.seed as i64);
    let (vs, model) = match (&cfg.init, &cfg.model) {
        (Some(init), _) => load_checkpoint(init, LoadSpec::CAUSAL_LM, device).map_err(invalid)?,
        (None, Some(shape)) => {
            let mc = stage::model_config_from(shape, tok.vocab_size(), eos, pad)?;
            let vs = tch::nn::VarStore::new(device);
            let model = Transformer::new(
                &vs.root(),
                &mc,
                Heads {
                    lm: true,
                    score: false,
                },
            )
            .map_err(invalid)?;
            (vs, model)
        }
        (None, None) => unreachable!("validate requires init or model"),
    };
    if tok.vocab_size() > model.config.vocab_size as usize {
        return Err(invalid(anyhow!(
            "tokenizer has {} tokens, the model only {}",
            tok.vocab_size(),
            model.config.vocab_size
        )));
    }
    if cfg.block_size as i64 > model.config.max_position {
        return Err(invalid(anyhow!(
            "block_size {} exceeds the model's max_position {}",
            cfg.block_size,
            model.config.max_position
        )));
    }
    let settings = |_: &str| StreamSettings {
        block_size: cfg.block_size,
        val_fraction: cfg.val_fraction,
        text_split: cfg.text_split,
        fields: cfg.fields.clone(),
    };
    let cache = cache_dir(&cfg);
    let stream =
        build_stream(&cfg.data, &tok, &settings("train"), Some(&cache)).map_err(invalid)?;
    // Each evaluation stream is a list of blocks: the held-out part of the training corpus,
    // then the extra streams.
    let mut evals: Vec<(String, Vec<u32>)> = vec![("eval".into(), stream.val.clone())];
    for (name, e) in &cfg.eval_data {
        let mut st = settings(name);
        if e.split == EvalSplit::All {
            st.val_fraction = 0.0;
        }
        let s = build_stream(&e.files, &tok, &st, Some(&cache)).map_err(invalid)?;
        evals.push((
            name.clone(),
            if e.split == EvalSplit::All {
                s.train
            } else {
                s.val
            },
        ));
    }
    info!(
        "corpus: {} documents, {} train blocks, {} held-out blocks of {} tokens{}",
        stream.stats.documents,
        stream.train_blocks(),
        stream.val_blocks(),
        cfg.block_size,
        if stream.from_cache { " (cached)" } else { "" }
    );
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

    let (b, t) = (cfg.batch_size, cfg.block_size);
    let n_blocks = stream.train_blocks();
    let mut epoch_order: Option<(usize, Vec<usize>)> = None;
    let bar = stage::progress_bar(cfg.steps, progress.step);
    let mut window = (std::time::Instant::now(), 0u64);
    let mut last_eval = BTreeMap::new();
    if progress.step == 0 {
        // A baseline before any update (for continued pretraining: where the domain starts).
        for (name, s) in &evals {
            if let Some(loss) = eval_loss(&model, s, &cfg, device)? {
                let prefix = if name == "eval" {
                    String::new()
                } else {
                    format!("{name}/")
                };
                run.log(
                    0,
                    "eval",
                    &[
                        (&format!("{prefix}loss"), loss),
                        (&format!("{prefix}ppl"), loss.exp()),
                    ],
                )?;
            }
        }
    }
    while progress.step < cfg.steps {
        let step = progress.step;
        let lr = cfg.optim.lr_at(step, cfg.steps);
        let mut step_loss = 0.0;
        for micro in 0..cfg.optim.grad_accum {
            // Sample k of the run is block order[k % n] of epoch k / n: a function of the step
            // alone, so a resumed run reads exactly the batches the uninterrupted one would.
            let first = ((step * cfg.optim.grad_accum + micro) as usize) * b;
            let mut ids = Vec::with_capacity(b * t);
            for k in first..first + b {
                let epoch = k / n_blocks;
                if epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    epoch_order = Some((
                        epoch,
                        shuffled(n_blocks, cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37)),
                    ));
                }
                let block = epoch_order.as_ref().expect("set above").1[k % n_blocks];
                ids.extend(stream.block(&stream.train, block).iter().map(|&x| x as i64));
            }
            let ids = Tensor::from_slice(&ids)
                .view([b as i64, t as i64])
                .to_device(device);
            let loss = with_autocast(device, cfg.precision, || -> anyhow::Result<Tensor> {
                let (_, logits) = model.forward(&ids, None)?;
                Ok(causal_lm_loss(&logits, &ids, &ids.ones_like()))
            })??;
            let value = loss.double_value(&[]);
            if let Err(e) = check_finite(value, step + 1, step) {
                run.save_state(&[&vs], &[&opt], &progress)?;
                return Err(e.into());
            }
            (loss / cfg.optim.grad_accum as f64).backward();
            step_loss += value / cfg.optim.grad_accum as f64;
        }
        let grad_norm = optimizer_step(&mut opt, cfg.optim.grad_clip, lr)?;
        progress.step += 1;
        progress.tokens_seen += (b * t) as u64 * cfg.optim.grad_accum;
        window.1 += (b * t) as u64 * cfg.optim.grad_accum;
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
        if step % cfg.eval_every == 0 || step == cfg.steps {
            for (name, s) in &evals {
                if let Some(loss) = eval_loss(&model, s, &cfg, device)? {
                    let prefix = if name == "eval" {
                        String::new()
                    } else {
                        format!("{name}/")
                    };
                    run.log(
                        step,
                        "eval",
                        &[
                            (&format!("{prefix}loss"), loss),
                            (&format!("{prefix}ppl"), loss.exp()),
                        ],
                    )?;
                    info!("step {step}: {name} loss {loss:.4}, ppl {:.2}", loss.exp());
                    last_eval.insert(name.clone(), loss);
                }
            }
        }
        if step % cfg.save_every == 0 || step == cfg.steps {
            run.save_state(&[&vs], &[&opt], &progress)?;
        }
    }
    bar.finish_and_clear();

    run.save_final(&model, &vs, &tokenizer_path)?;
    let mut summary = run.summary_base(&progress);
    for (name, loss) in &last_eval {
        let prefix = if name == "eval" {
            String::new()
        } else {
            format!("{name}/")
        };
        summary.insert(format!("{prefix}loss"), (*loss).into());
        summary.insert(format!("{prefix}ppl"), loss.exp().into());
    }
    run.write_summary("ok", summary)?;
    Ok(())
}

/// Mean next-token loss over (up to `eval_batches` batches of) a stream's blocks.
fn eval_loss(
    model: &Transformer,
    tokens: &[u32],
    cfg: &Config,
    device: Device,
) -> anyhow::Result<Option<f64>> {
    let n = tokens.len() / cfg.block_size;
    let limit = if cfg.eval_batches == 0 {
        n
    } else {
        n.min(cfg.eval_batches * cfg.batch_size)
    };
    if limit == 0 {
        return Ok(None);
    }
    let (mut total, mut count) = (0.0, 0.0);
    for chunk in (0..limit).collect::<Vec<_>>().chunks(cfg.batch_size) {
        let ids: Vec<i64> = chunk
            .iter()
            .flat_map(|&i| {
                tokens[i * cfg.block_size..(i + 1) * cfg.block_size]
                    .iter()
                    .map(|&x| x as i64)
            })
            .collect();
        let ids = Tensor::from_slice(&ids)
            .view([chunk.len() as i64, cfg.block_size as i64])
            .to_device(device);
        let loss = tch::no_grad(|| {
            with_autocast(device, cfg.precision, || -> anyhow::Result<f64> {
                let (_, logits) = model.forward(&ids, None)?;
                Ok(causal_lm_loss(&logits, &ids, &ids.ones_like())
                    .to_kind(Kind::Double)
                    .double_value(&[]))
            })
        })??;
        total += loss * chunk.len() as f64;
        count += chunk.len() as f64;
    }
    Ok(Some(total / count))
}
