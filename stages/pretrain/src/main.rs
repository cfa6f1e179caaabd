//! temper-pretrain: next-token training on a text corpus, from scratch (shape from `model:`) or
//! from a checkpoint (`init:`, continued pretraining). Evaluates loss and perplexity on the
//! corpus's held-out documents and on any extra streams (e.g. general English while adapting
//! to a domain, to see forgetting). Set up, loop, save — nothing else lives here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Tensor};
use temper_core::checkpoint::{check_save, SaveDtype, SaveOptions};
use temper_core::device::check_memory;
use temper_core::dist::GradSync;
use temper_core::model::MemorySaving;
use temper_core::peft::{check_peft, PeftConfig, Tuning};
use temper_core::schedule::check_optim;
use temper_core::train::{self, Stepped, TrainRun};
use temper_core::{
    load_checkpoint, DeviceSpec, Heads, LoadSpec, ModelShape, OptimSettings, Precision, Transformer,
};
use temper_data::stream::{build_stream, StreamSettings, TokenStream};
use temper_data::tokenizer::{EOS, PAD};
use temper_data::{seed_for, shuffled, Epochs, Fields, TextSplit, TextTokenizer};
use temper_stage::cadence::{every_10, every_100};
use temper_stage::{
    invalid, CachePath, Cadence, ConfigFile, Every, InputPath, Inputs, MetricsLog, StageArgs,
    StageError, StageKind, Summary,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// tokenizer.json (ignored in favour of the checkpoint's own when `init` holds one).
    tokenizer: InputPath,
    /// Training corpus: .txt, .jsonl or .parquet files with a text field.
    data: Vec<InputPath>,
    /// Extra evaluation streams by name, e.g. general English while adapting to a domain.
    #[serde(default)]
    eval_data: BTreeMap<String, EvalStream>,
    /// Checkpoint folder to continue from; without it the model starts from `model:`.
    #[serde(default)]
    init: Option<InputPath>,
    /// Model shape for training from scratch (vocab_size defaults to the tokenizer's).
    #[serde(default)]
    model: Option<ModelShape>,
    /// Tokens per training sequence.
    block_size: usize,
    #[serde(default = "default_val_fraction")]
    val_fraction: f64,
    #[serde(default = "default_split")]
    text_split: TextSplit,
    #[serde(default)]
    fields: Fields,
    /// Optimizer steps.
    /// Parameter-efficient continued pretraining over `init` (lora, freeze); default: every
    /// parameter trains.
    #[serde(default)]
    peft: Option<PeftConfig>,
    steps: u64,
    /// Sequences per micro-batch.
    batch_size: usize,
    #[serde(default)]
    optim: OptimSettings,
    #[serde(default = "every_100")]
    eval_every: Every,
    /// Batches of held-out blocks per evaluation (0 = all).
    #[serde(default = "default_eval_batches")]
    eval_batches: usize,
    #[serde(default = "every_100")]
    save_every: Every,
    #[serde(default = "every_10")]
    log_every: Every,
    /// How the final checkpoint is written: `dtype` (fp32, bf16, fp16; default the init's,
    /// fp32 from scratch) and `max_shard_size` (`5GB`; default one file).
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
    /// Where tokenized corpora are cached (default ~/.cache/temper/tokens). Not part of the
    /// cache key: where a cache lives changes no result.
    #[serde(default)]
    cache_dir: Option<CachePath>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalStream {
    files: Vec<InputPath>,
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
fn default_eval_batches() -> usize {
    20
}

fn main() {
    temper_stage::stage_main(
        "temper-pretrain",
        "Next-token training from scratch or from a checkpoint (continued pretraining).",
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
    cfg.ensure(c.block_size >= 2, "block_size", "must be at least 2")?;
    cfg.ensure(
        (0.0..1.0).contains(&c.val_fraction),
        "val_fraction",
        format!("must be in [0, 1), got {}", c.val_fraction),
    )?;
    cfg.ensure(
        c.init.is_some() != c.model.is_some(),
        "model",
        "set exactly one of `init` (continue from a checkpoint) and `model` (train from scratch)",
    )?;
    cfg.ensure(!c.data.is_empty(), "data", "list at least one file")?;
    cfg.ensure(
        c.peft.is_none() || c.init.is_some(),
        "peft",
        "needs `init`: parameter-efficient methods adapt an existing model",
    )?;
    if let Some(shape) = &c.model {
        shape.check().map_err(|e| cfg.error("model", e))?;
        cfg.ensure(
            c.block_size as i64 <= shape.max_position,
            "block_size",
            format!(
                "exceeds the model's {} positions (`model.max_position`)",
                shape.max_position
            ),
        )?;
    }
    inputs.file(cfg, "tokenizer", &c.tokenizer)?;
    for f in &c.data {
        inputs.file(cfg, "data", f)?;
    }
    for (name, e) in &c.eval_data {
        for f in &e.files {
            inputs.file(cfg, &format!("eval_data.{name}.files"), f)?;
        }
    }
    if let Some(init) = &c.init {
        inputs.checkpoint(cfg, "init", init, false)?;
    }
    Ok(())
}

/// Everything the loop needs, loaded and cross-checked before anything is written.
struct Setup {
    tokenizer_path: PathBuf,
    device: Device,
    vs: VarStore,
    model: Transformer,
    tuning: Tuning,
    stream: TokenStream,
    /// (name, held-out tokens): the corpus's own held-out blocks, then the extra streams.
    evals: Vec<(String, Vec<u32>)>,
}

fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    let tokenizer_path = match &c.init {
        Some(init) if init.join("tokenizer.json").exists() => init.join("tokenizer.json"),
        _ => c.tokenizer.to_path_buf(),
    };
    let tok = TextTokenizer::load(&tokenizer_path).map_err(invalid)?;
    let (eos, pad) = (tok.require(EOS).map_err(invalid)?, tok.id(PAD).unwrap_or(0));
    tch::manual_seed(c.seed as i64);
    let (mut vs, mut model) = match (&c.init, &c.model) {
        (Some(init), _) => load_checkpoint(init, LoadSpec::CAUSAL_LM, device).map_err(invalid)?,
        (None, Some(shape)) => {
            let mc = shape
                .resolve(tok.vocab_size(), eos, pad)
                .map_err(|e| cfg.error("model", e))?;
            check_memory(device, mc.training_bytes(1, 1), "this model")
                .map_err(|m| cfg.error("model", m))?;
            let vs = VarStore::new(device);
            let heads = Heads {
                lm: true,
                score: false,
            };
            let model = Transformer::new(&vs.root(), &mc, heads).map_err(invalid)?;
            (vs, model)
        }
        (None, None) => unreachable!("check() requires init or model"),
    };
    temper_core::checkpoint::check_vocab(tok.vocab_size(), &model.config, &tokenizer_path)
        .map_err(invalid)?;
    let tuning = temper_core::peft::apply(&mut model, &mut vs, c.peft.as_ref())
        .and_then(|mut t| {
            temper_core::peft::init_prompt_text(&model, c.peft.as_ref(), |s| tok.encode(s))?;
            t.plan_updates(c.steps as usize)?;
            Ok(t)
        })
        .map_err(|e| cfg.error(&e.field, e.message))?;
    cfg.ensure(
        c.block_size as i64 <= model.token_room(),
        "block_size",
        format!(
            "exceeds the {} positions the model has for tokens",
            model.token_room()
        ),
    )?;
    let estimate = model
        .config
        .training_bytes(c.batch_size as i64, c.block_size as i64);
    check_memory(
        device,
        estimate,
        "training at this batch_size and block_size",
    )
    .map_err(|m| cfg.error("batch_size", m))?;
    let settings = |val_fraction| StreamSettings {
        block_size: c.block_size,
        val_fraction,
        text_split: c.text_split,
        fields: c.fields.clone(),
    };
    let cache = c
        .cache_dir
        .as_ref()
        .map_or_else(default_cache_dir, |d| d.to_path_buf());
    let stream =
        build_stream(&c.data, &tok, &settings(c.val_fraction), Some(&cache)).map_err(invalid)?;
    let mut evals = vec![("eval".to_string(), stream.val.clone())];
    for (name, e) in &c.eval_data {
        let all = e.split == EvalSplit::All;
        let fraction = if all { 0.0 } else { c.val_fraction };
        let s = build_stream(&e.files, &tok, &settings(fraction), Some(&cache)).map_err(invalid)?;
        evals.push((name.clone(), if all { s.train } else { s.val }));
    }
    tracing::info!(
        "corpus: {} documents, {} train blocks, {} held-out blocks of {} tokens{}",
        stream.stats.documents,
        stream.train_blocks(),
        stream.val_blocks(),
        c.block_size,
        if stream.from_cache { " (cached)" } else { "" }
    );
    Ok(Setup {
        tokenizer_path,
        device,
        vs,
        model,
        tuning,
        stream,
        evals,
    })
}

fn default_cache_dir() -> PathBuf {
    std::env::var_os("TEMPER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/temper")
        })
        .join("tokens")
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    // Data parallel (torchrun / Slurm): every rank trains on its share of each batch; rank 0
    // alone writes (the others log into a scratch folder).
    let Some(st) = train::start(args, StageKind::Pretrain, check, |c| c.device, prepare)? else {
        return Ok(());
    };
    let (c, s) = (&st.cfg.value, &st.setup);
    let (stores, mut opt) = (
        s.tuning.stores(&s.vs),
        s.tuning.optimizer(&s.vs, c.optim.adamw()),
    );
    let every = Cadence::new(c.log_every, c.eval_every, c.save_every, c.steps);
    // Gradients averaged over the ranks in buckets, reduced while the last backward runs.
    let (mut run, sync) = TrainRun::open(st.world, &args.out, &st.cfg, &stores, &mut opt, every)?;
    let (b, t, accum) = (c.batch_size, c.block_size, c.optim.grad_accum);
    let (rank, n_ranks) = (run.world.rank(), run.world.size());
    let n_blocks = s.stream.train_blocks();
    // Block k of the run is block order[k % n] of epoch k / n: a function of the step alone,
    // so a resumed run reads exactly the batches an uninterrupted one would.
    let mut blocks = Epochs::new(|e| shuffled(n_blocks, seed_for(c.seed, "epoch", e)));
    let mut last_eval = None;
    if run.progress.step == 0 {
        // A baseline before any update (for continued pretraining: where the domain starts).
        last_eval = evaluate(s, c, &mut run.log, 0)?;
    }
    while run.progress.step < c.steps {
        let step = run.progress.step;
        let lr = c.optim.lr_at(step, c.steps);
        let mut step_loss = 0.0;
        s.tuning.set_training(true); // adapter dropout, when there is one
        for micro in 0..accum {
            // This rank's rows of the global batch (b × ranks): with 2 ranks of b, the blocks
            // one process with batch 2b reads, split in halves.
            let first = ((step * accum + micro) * n_ranks as u64 + rank as u64) * b as u64;
            let ids: Vec<i64> = (first..first + b as u64)
                .flat_map(|k| s.stream.block(&s.stream.train, *blocks.get(k)))
                .map(|&x| x as i64)
                .collect();
            let ids = Tensor::from_slice(&ids)
                .view([b as i64, t as i64])
                .to_device(s.device);
            let loss = micro_step(s, c, &sync, &ids, micro + 1 == accum)?;
            run.guard(loss, &stores, &[&opt])?;
            step_loss += loss / accum as f64;
        }
        // The mean gradient over the global batch; every rank then takes the same step.
        sync.finish()?;
        let loss = run.world.mean(step_loss)?;
        let grad_norm = opt.update_then(c.optim.grad_clip, lr, || s.tuning.after_update())?;
        let done = Stepped::new(loss, lr, grad_norm, (b * t * n_ranks) as u64 * accum);
        let step = run.stepped(done, &[("ppl", loss.exp())], format!("loss {loss:.4}"))?;
        if run.every.eval_due(step) {
            last_eval = evaluate(s, c, &mut run.log, step)?;
        }
        run.save_when_due(&stores, &[&opt])?;
    }
    let Some(done) = run.finish()? else {
        return Ok(());
    };
    // An adapter's base is the `init` folder, unless that was itself an adapter (merged).
    let init = c.init.as_deref();
    let base = init.filter(|i| !temper_core::peft::is_adapter(i));
    let stored = init.map_or(SaveDtype::F32, SaveDtype::of_checkpoint);
    let write = c.save.resolve(stored);
    let tuning = &s.tuning;
    let dir = done.out.join("checkpoint");
    tuning.save_into(&dir, &s.model, &s.vs, &s.tokenizer_path, base, write)?;
    let summary = done.summary(tuning.summary_fields(&s.vs), last_eval);
    done.write(summary)
}

/// One micro-batch's mean loss over the rows `ids` (B, T), backward done.
fn micro_step(
    s: &Setup,
    c: &Config,
    sync: &GradSync,
    ids: &Tensor,
    last: bool,
) -> anyhow::Result<f64> {
    let saving = c.memory_saving();
    let weight = 1.0 / c.optim.grad_accum as f64;
    let mask = ids.ones_like();
    if saving.any() {
        let v = s
            .model
            .lm_loss_backward(ids, None, &mask, c.precision, weight, saving)?;
        s.tuning.backward_regulariser(weight);
        return Ok(v);
    }
    let loss = s.model.lm_loss(ids, None, &mask, c.precision)?;
    let value = loss.double_value(&[]);
    if value.is_finite() {
        if last {
            sync.arm_last_backward();
        }
        (s.tuning.regularised(loss) / c.optim.grad_accum as f64).backward();
    }
    Ok(value)
}

/// Metric-name prefix of an evaluation stream: none for the corpus's own held-out part.
fn prefix(name: &str) -> String {
    if name == "eval" {
        String::new()
    } else {
        format!("{name}/")
    }
}

/// Loss and perplexity on every evaluation stream, logged; returns stream → loss.
fn evaluate(
    s: &Setup,
    c: &Config,
    log: &mut MetricsLog,
    step: u64,
) -> anyhow::Result<Option<Summary>> {
    s.tuning.set_training(false);
    let mut out = Summary::new();
    for (name, tokens) in &s.evals {
        let n = tokens.len() / c.block_size;
        let limit = if c.eval_batches == 0 {
            n
        } else {
            n.min(c.eval_batches * c.batch_size)
        };
        if limit == 0 {
            continue;
        }
        let batches = (0..limit).collect::<Vec<_>>();
        let batches = batches.chunks(c.batch_size).map(|chunk| {
            let ids: Vec<i64> = chunk
                .iter()
                .flat_map(|&i| &tokens[i * c.block_size..(i + 1) * c.block_size])
                .map(|&x| x as i64)
                .collect();
            let ids = Tensor::from_slice(&ids)
                .view([chunk.len() as i64, c.block_size as i64])
                .to_device(s.device);
            let mask = ids.ones_like();
            (ids, None, mask)
        });
        let loss = s.model.mean_lm_loss(batches, c.precision)?;
        let p = prefix(name);
        log.log_eval(
            step,
            &[
                (&format!("{p}loss"), loss),
                (&format!("{p}ppl"), loss.exp()),
            ],
        )?;
        out.insert(format!("{p}loss"), loss.into());
        out.insert(format!("{p}ppl"), loss.exp().into());
    }
    Ok((!out.is_empty()).then_some(out))
}

impl Config {
    fn memory_saving(&self) -> MemorySaving {
        MemorySaving {
            checkpoint_blocks: self.activation_checkpointing,
            loss_chunk: self.loss_chunk,
        }
    }
}
