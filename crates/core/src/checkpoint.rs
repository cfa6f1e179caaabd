//! Checkpoints in Hugging Face's layout: `model.safetensors` with transformers' key names and
//! an HF-style `config.json`. Loading is strict: every tensor the model expects must be in the
//! file with the right shape, and every tensor in the file must be used, except for buffers
//! transformers itself regenerates (`attn.bias`, `rotary_emb.inv_freq`) and heads the caller
//! did not ask for (a reward model's `score` when loading a policy, say).

use std::collections::HashMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::Device;
use temper_data::TextTokenizer;

use crate::config::{Arch, ModelConfig};
use crate::error::{CoreError, Result};
use crate::model::{Heads, Transformer};
use crate::optim::{AdamW, AdamWConfig};
use crate::peft::{PeftConfig, PeftError, Tuning};
use crate::safetensors::Entry;
pub use crate::save::{
    check_save, parse_size, save_checkpoint, save_checkpoint_with, save_full_checkpoint, SaveDtype,
    SaveOptions, WriteOptions,
};

pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Sharded checkpoints (as the Hub has big models): the index naming each tensor's shard.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";
/// What an `init:` (or policy, reward model, baseline) folder must hold.
pub const CHECKPOINT_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"];

/// A checkpoint loaded with the tokenizer it was saved with, and what a stage trains of it.
pub struct Loaded {
    pub vs: VarStore,
    pub model: Transformer,
    pub tokenizer: TextTokenizer,
    pub tokenizer_path: std::path::PathBuf,
    /// The folder it was loaded from.
    pub origin: std::path::PathBuf,
    /// Full fine-tuning unless [`Loaded::tune`] applied a `peft:` block.
    pub tuning: Tuning,
    /// The dtype the weights were stored in (the default for saving).
    pub stored_dtype: SaveDtype,
}

/// Loads `dir` as `spec` says, with `dir/tokenizer.json`, checking they fit each other.
pub fn load_with_tokenizer(dir: &Path, spec: LoadSpec, device: Device) -> Result<Loaded> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = TextTokenizer::load(&tokenizer_path)?;
    let (vs, model) = load_checkpoint(dir, spec, device)?;
    check_vocab(tokenizer.vocab_size(), &model.config, dir)?;
    Ok(Loaded {
        vs,
        model,
        tokenizer,
        tokenizer_path,
        origin: dir.to_path_buf(),
        tuning: Tuning::full(),
        stored_dtype: SaveDtype::of_checkpoint(dir),
    })
}

impl Loaded {
    /// Applies a stage's `peft:` block (None: full fine-tuning) and logs what trains;
    /// `updates` is the number of optimizer updates the stage will make (AdaLoRA's schedule).
    pub fn tune(
        &mut self,
        config: Option<&PeftConfig>,
        updates: usize,
    ) -> std::result::Result<(), PeftError> {
        self.tuning = crate::peft::apply(&mut self.model, &mut self.vs, config)?;
        self.tuning.plan_updates(updates)?;
        crate::peft::init_prompt_text(&self.model, config, |t| self.tokenizer.encode(t))?;
        let (trainable, total) = self.tuning.counts(&self.vs);
        tracing::info!(
            "training {trainable} of {total} parameters ({:.3}%){}",
            100.0 * trainable as f64 / total.max(1) as f64,
            match config {
                Some(c) => format!(
                    " with peft {}",
                    serde_json::to_string(c).unwrap_or_default()
                ),
                None => String::new(),
            }
        );
        Ok(())
    }

    /// The variable stores to checkpoint in the state, in a fixed order.
    pub fn stores(&self) -> Vec<&VarStore> {
        self.tuning.stores(&self.vs)
    }

    pub fn optimizer(&self, config: AdamWConfig) -> AdamW {
        self.tuning.optimizer(&self.vs, config)
    }

    /// What a training run keeps in its state and steps: the trained variables' stores and
    /// their optimizer.
    pub fn trained(&self, config: AdamWConfig) -> (Vec<&VarStore>, AdamW) {
        (self.stores(), self.optimizer(config))
    }

    /// Summary fields: trainable and total parameter counts (and QLoRA's memory saving).
    pub fn param_fields(&self) -> Vec<(&'static str, i64)> {
        self.tuning.summary_fields(&self.vs)
    }

    /// The stage's final model in `<out>/checkpoint/`: PEFT files over the loaded folder for
    /// LoRA, a full checkpoint otherwise, written as the stage's `save:` key says.
    pub fn save_final(&self, out: &Path, save: &SaveOptions) -> Result<std::path::PathBuf> {
        // An adapter folder was merged in memory: there is no base on disk to point at.
        let base = (!crate::peft::is_adapter(&self.origin)).then_some(self.origin.as_path());
        let write = save.resolve(self.stored_dtype);
        let dir = out.join("checkpoint");
        let (model, vs, tokenizer) = (&self.model, &self.vs, &self.tokenizer_path);
        self.tuning
            .save_into(&dir, model, vs, tokenizer, base, write)?;
        Ok(dir)
    }
}

/// What to do with the scalar head when loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreHead {
    /// No scalar head; a `score.weight` in the file is ignored.
    Absent,
    /// The file must hold `score.weight` (a reward model or critic checkpoint).
    Load,
    /// Freshly initialised head on a loaded backbone (a reward model started from SFT); a
    /// `score.weight` in the file is used if present.
    Fresh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    pub lm_head: bool,
    pub score: ScoreHead,
}

impl LoadSpec {
    /// A causal language model: backbone and LM head.
    pub const CAUSAL_LM: LoadSpec = LoadSpec {
        lm_head: true,
        score: ScoreHead::Absent,
    };
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CoreError + '_ {
    move |source| CoreError::Io {
        path: path.into(),
        source,
    }
}

/// A tokenizer must fit the model it feeds: every id it produces needs an embedding row.
pub fn check_vocab(tokenizer_vocab: usize, model: &ModelConfig, dir: &Path) -> Result<()> {
    if tokenizer_vocab as i64 > model.vocab_size {
        return Err(CoreError::Config {
            path: dir.join(CONFIG_FILE),
            field: "vocab_size".into(),
            message: format!(
                "the model has {} embedding rows but its tokenizer has {tokenizer_vocab} tokens; use the tokenizer the model was trained with",
                model.vocab_size
            ),
        });
    }
    Ok(())
}

/// Builds the model `dir/config.json` describes on `device` and loads `dir/model.safetensors`
/// into it strictly.
pub fn load_checkpoint(
    dir: &Path,
    spec: LoadSpec,
    device: Device,
) -> Result<(VarStore, Transformer)> {
    if crate::peft::is_adapter(dir) {
        return crate::peft::files::load_adapter_checkpoint(dir, spec, device);
    }
    let config = ModelConfig::from_hf_json(&dir.join(CONFIG_FILE))?;
    load_checkpoint_as(dir, &config, spec, device)
}

/// The model config of a checkpoint folder, full or adapter, without reading weights.
pub fn model_config(dir: &Path) -> Result<ModelConfig> {
    if crate::peft::is_adapter(dir) {
        crate::peft::files::adapter_model_config(dir)
    } else {
        ModelConfig::from_hf_json(&dir.join(CONFIG_FILE))
    }
}

/// Builds the model `config` describes and loads `dir/model.safetensors` into it strictly.
pub(crate) fn load_checkpoint_as(
    dir: &Path,
    config: &ModelConfig,
    spec: LoadSpec,
    device: Device,
) -> Result<(VarStore, Transformer)> {
    let vs = VarStore::new(device);
    let heads = Heads {
        lm: spec.lm_head,
        score: spec.score != ScoreHead::Absent,
    };
    let model = Transformer::new(&vs.root(), config, heads)?;
    let single = dir.join(WEIGHTS_FILE);
    if !single.exists() && dir.join(WEIGHTS_INDEX).exists() {
        let entries = shard_entries(dir)?;
        load_entries(&vs, config, entries, &dir.join(WEIGHTS_INDEX), spec)?;
    } else {
        load_weights(&vs, config, &single, spec)?;
    }
    Ok((vs, model))
}

/// The tensors of a sharded checkpoint, from the shards' headers; a shard the index lists but
/// the folder lacks, or a tensor missing from its shard, is named.
fn shard_entries(dir: &Path) -> Result<Vec<Entry>> {
    let index_path = dir.join(WEIGHTS_INDEX);
    let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| CoreError::Json {
            path: index_path.clone(),
            source,
        })?;
    let bad = |field: &str, message: String| CoreError::Config {
        path: index_path.clone(),
        field: field.into(),
        message,
    };
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| bad("weight_map", "missing or not a mapping".into()))?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort();
    shards.dedup();
    let mut entries = Vec::new();
    for shard in shards {
        let file = dir.join(shard);
        if !file.exists() {
            return Err(bad(
                "weight_map",
                format!(
                    "shard `{shard}` is listed but not in the folder; the checkpoint is incomplete"
                ),
            ));
        }
        entries.extend(crate::safetensors::entries(&file)?);
    }
    if let Some((name, shard)) = map
        .iter()
        .find(|(k, _)| !entries.iter().any(|e| &e.name == *k))
    {
        return Err(bad(
            "weight_map",
            format!("`{name}` is listed in {shard} but that shard does not hold it"),
        ));
    }
    Ok(entries)
}

/// Copies the tensors of a safetensors file into the variables of `vs`, strictly.
pub fn load_weights(
    vs: &VarStore,
    config: &ModelConfig,
    file: &Path,
    spec: LoadSpec,
) -> Result<()> {
    if !file.exists() {
        return Err(CoreError::Io {
            path: file.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "checkpoint weights not found",
            ),
        });
    }
    let entries = crate::safetensors::entries(file)?;
    load_entries(vs, config, entries, file, spec)
}

/// Checks the tensors `entries` describe (read from `file`) against the variables of `vs` —
/// names and shapes, strictly, before reading any data — then reads them one at a time into
/// the variables, converting any dtype (bf16, fp16) to the variable's.
fn load_entries(
    vs: &VarStore,
    config: &ModelConfig,
    entries: Vec<Entry>,
    file: &Path,
    spec: LoadSpec,
) -> Result<()> {
    let mut tensors: HashMap<String, Entry> =
        entries.into_iter().map(|e| (e.name.clone(), e)).collect();
    // GPT-2 checkpoints saved from the bare GPT2Model (the hub's `gpt2`) lack the prefix.
    if config.arch == Arch::Gpt2 && !tensors.keys().any(|k| k.starts_with("transformer.")) {
        tensors = tensors
            .into_iter()
            .map(|(k, t)| match k.as_str() {
                "lm_head.weight" | "score.weight" => (k, t),
                _ => (format!("transformer.{k}"), t),
            })
            .collect();
    }
    let vars = vs.variables();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, var) in &vars {
        match tensors.get(name) {
            None if name == "score.weight" && spec.score == ScoreHead::Fresh => {}
            None => missing.push(name.clone()),
            Some(t) if t.shape != var.size() => {
                mismatched.push((name.clone(), var.size(), t.shape.clone()))
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k) && !ignorable(k, spec, config.tie_embeddings()))
        .cloned()
        .collect();
    missing.sort();
    unexpected.sort();
    mismatched.sort();
    if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
        return Err(CoreError::CheckpointMismatch {
            path: file.into(),
            missing,
            unexpected,
            mismatched,
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vars {
            if let Some(entry) = tensors.get(&name) {
                entry.read_into(&mut var)?;
            }
        }
        Ok(())
    })
}

/// Tensors a file may hold that the model does not use, by design.
fn ignorable(key: &str, spec: LoadSpec, tied: bool) -> bool {
    key.ends_with(".attn.bias") // GPT-2's causal-mask buffer in older checkpoints
        || key.ends_with(".attn.masked_bias")
        || key.ends_with(".rotary_emb.inv_freq") // recomputed from rope_theta
        || (key == "lm_head.weight" && (!spec.lm_head || tied)) // tied: the embedding is the head
        || (key == "score.weight" && spec.score == ScoreHead::Absent)
}
