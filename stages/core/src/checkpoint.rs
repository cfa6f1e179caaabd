//! Checkpoints in Hugging Face's layout: `model.safetensors` with transformers' key names and
//! an HF-style `config.json`. Loading is strict: every tensor the model expects must be in the
//! file with the right shape, and every tensor in the file must be used, except for buffers
//! transformers itself regenerates (`attn.bias`, `rotary_emb.inv_freq`) and heads the caller
//! did not ask for (a reward model's `score` when loading a policy, say).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use temper_data::TextTokenizer;

use crate::config::{Arch, ModelConfig};
use crate::error::{CoreError, Result};
use crate::model::{Heads, Transformer};
use crate::optim::{AdamW, AdamWConfig};
use crate::peft::{PeftConfig, PeftError, Tuning};
use crate::safetensors::Entry;

pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Sharded checkpoints (as the Hub has big models): the index naming each tensor's shard.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";
/// What an `init:` (or policy, reward model, baseline) folder must hold.
pub const CHECKPOINT_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"];

/// The dtype a checkpoint's weights are stored in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SaveDtype {
    #[default]
    #[serde(rename = "fp32", alias = "float32")]
    F32,
    #[serde(rename = "bf16", alias = "bfloat16")]
    Bf16,
    #[serde(rename = "fp16", alias = "float16")]
    F16,
}

impl SaveDtype {
    pub fn kind(self) -> Kind {
        match self {
            SaveDtype::F32 => Kind::Float,
            SaveDtype::Bf16 => Kind::BFloat16,
            SaveDtype::F16 => Kind::Half,
        }
    }

    /// transformers' name (`torch_dtype` in config.json).
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }

    /// The dtype a config.json says its weights are in (`dtype`, or `torch_dtype` in older
    /// files); fp32 when it says nothing or something else.
    pub fn of_checkpoint(dir: &Path) -> SaveDtype {
        // An adapter's weights are stored as its base's are.
        let dir = &crate::peft::files::base_dir(dir, None).unwrap_or_else(|_| dir.to_path_buf());
        let value: Option<serde_json::Value> = std::fs::read_to_string(dir.join(CONFIG_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let name = value.as_ref().and_then(|v| {
            v.get("dtype")
                .or_else(|| v.get("torch_dtype"))
                .and_then(|d| d.as_str())
        });
        match name {
            Some("bfloat16") => SaveDtype::Bf16,
            Some("float16") => SaveDtype::F16,
            _ => SaveDtype::F32,
        }
    }
}

/// How a stage writes its final full checkpoint (the `save:` key of training stages). Training
/// always runs on fp32 master weights; this is only the file.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveOptions {
    /// fp32, bf16 or fp16; default: the dtype the `init` checkpoint was stored in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<SaveDtype>,
    /// Split the weights into shards of at most this size (`"5GB"`, `"500MB"`, `"2GiB"`, as
    /// transformers' `max_shard_size`) with a `model.safetensors.index.json`, as the Hub stores
    /// big models; default: one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<String>,
}

/// Bytes in a size such as `5GB` (10^9), `2GiB` (2^30), `40KB` or `1000` (bytes).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = num * scale;
    (bytes.is_finite() && bytes >= 1.0).then_some(bytes as u64)
}

impl SaveOptions {
    /// The options for a model whose weights came stored in `stored`.
    pub fn resolve(&self, stored: SaveDtype) -> WriteOptions {
        WriteOptions {
            dtype: self.dtype.unwrap_or(stored),
            max_shard_bytes: self.max_shard_size.as_deref().and_then(parse_size),
        }
    }
}

/// What [`save_checkpoint_with`] writes: the dtype and the shard size, resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    pub dtype: SaveDtype,
    pub max_shard_bytes: Option<u64>,
}

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
    /// Applies a stage's `peft:` block (None: full fine-tuning) and logs what trains.
    pub fn tune(&mut self, config: Option<&PeftConfig>) -> std::result::Result<(), PeftError> {
        self.tuning = crate::peft::apply(&mut self.model, &mut self.vs, config)?;
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
        self.tuning.save_final(
            out,
            &self.model,
            &self.vs,
            &self.tokenizer_path,
            base,
            write,
        )
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CoreError + '_ {
    move |source| CoreError::Io {
        path: path.into(),
        source,
    }
}

/// Writes `model.safetensors` and `config.json` into `dir` (created if needed), in fp32 and
/// one file. Each file is written under a temporary name and renamed, so a crash never leaves
/// a half-written file under the final name.
pub fn save_checkpoint(model: &Transformer, vs: &VarStore, dir: &Path) -> Result<()> {
    save_checkpoint_with(model, vs, dir, WriteOptions::default())
}

/// As [`save_checkpoint`], in `opts.dtype`, and sharded when the weights exceed
/// `opts.max_shard_bytes` (`model-0000i-of-0000n.safetensors` and the index transformers
/// reads). Files of the other layout left by an earlier save are removed, so the folder holds
/// exactly one. Also writes `generation_config.json` from the config's token ids (a model's
/// own, carried with its tokenizer, replaces it).
pub fn save_checkpoint_with(
    model: &Transformer,
    vs: &VarStore,
    dir: &Path,
    opts: WriteOptions,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let kind = opts.dtype.kind();
    let tensors: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(name, t)| {
            let t = t.detach().to_device(Device::Cpu).contiguous();
            let t = if t.is_floating_point() {
                t.to_kind(kind)
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let shards = shard_groups(&tensors, opts.max_shard_bytes);
    if shards.len() == 1 {
        write_safetensors_atomic(&tensors, &dir.join(WEIGHTS_FILE))?;
        remove_if_present(&dir.join(WEIGHTS_INDEX))?;
        remove_shards(dir, None)?;
    } else {
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut names = Vec::new();
        for (i, group) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let part: Vec<(String, Tensor)> = group
                .iter()
                .map(|&j| (tensors[j].0.clone(), tensors[j].1.shallow_clone()))
                .collect();
            write_safetensors_atomic(&part, &dir.join(&name))?;
            for (key, _) in &part {
                weight_map.insert(key.clone(), name.clone().into());
            }
            names.push(name);
        }
        let total: i64 = tensors.iter().map(|(_, t)| tensor_bytes(t)).sum();
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_json_atomic(&index, &dir.join(WEIGHTS_INDEX))?;
        remove_if_present(&dir.join(WEIGHTS_FILE))?;
        remove_shards(dir, Some(&names))?;
    }
    let mut config = model.hf_config_json();
    config["torch_dtype"] = opts.dtype.torch_name().into();
    write_json_atomic(&config, &dir.join(CONFIG_FILE))?;
    write_generation_config(&model.config, &dir.join("generation_config.json"))
}

fn tensor_bytes(t: &Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

/// Tensor indices per shard, in name order, each shard at most `max` bytes (a tensor larger
/// than `max` gets a shard of its own); one group when `max` is None or everything fits.
fn shard_groups(tensors: &[(String, Tensor)], max: Option<u64>) -> Vec<Vec<usize>> {
    let Some(max) = max.map(|m| m as i64) else {
        return vec![(0..tensors.len()).collect()];
    };
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let b = tensor_bytes(t);
        let current = groups.last_mut().expect("starts with one group");
        if !current.is_empty() && size + b > max {
            groups.push(vec![i]);
            size = b;
        } else {
            current.push(i);
            size += b;
        }
    }
    groups
}

fn write_safetensors_atomic(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("weights");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    Tensor::write_safetensors(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn write_json_atomic(value: &serde_json::Value, path: &Path) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let text = serde_json::to_string_pretty(value).expect("a JSON value always serialises");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Removes `model-*-of-*.safetensors` files of `dir` not in `keep`.
fn remove_shards(dir: &Path, keep: Option<&[String]>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if shard && !keep.is_some_and(|k| k.contains(&name)) {
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

/// Writes the final model of a stage to `<out>/checkpoint/` with the tokenizer it was trained
/// with, so the folder is a complete Hugging Face checkpoint for the next stage.
pub fn save_final(
    out: &Path,
    model: &Transformer,
    vs: &VarStore,
    tokenizer: &Path,
) -> Result<std::path::PathBuf> {
    save_final_with(out, model, vs, tokenizer, WriteOptions::default())
}

/// As [`save_final`], in the dtype and shards `write` says.
pub fn save_final_with(
    out: &Path,
    model: &Transformer,
    vs: &VarStore,
    tokenizer: &Path,
    write: WriteOptions,
) -> Result<std::path::PathBuf> {
    let dir = out.join("checkpoint");
    save_checkpoint_with(model, vs, &dir, write)?;
    write_tokenizer_files(tokenizer, &dir)?;
    Ok(dir)
}

/// transformers' `generation_config.json`: the model's special token ids, which `generate`
/// stops and pads with.
fn write_generation_config(config: &ModelConfig, path: &Path) -> Result<()> {
    let mut v = serde_json::Map::new();
    for (key, id) in [
        ("bos_token_id", config.bos_token_id),
        ("eos_token_id", config.eos_token_id),
        ("pad_token_id", config.pad_token_id),
    ] {
        if let Some(id) = id {
            v.insert(key.into(), id.into());
        }
    }
    let text = serde_json::to_string_pretty(&v).expect("a JSON map serialises");
    temper_stage::atomic::write_atomic(path, text.as_bytes()).map_err(|e| CoreError::Io {
        path: path.into(),
        source: std::io::Error::other(format!("{e:#}")),
    })
}

/// Writes `tokenizer.json` and its companions (see
/// [`temper_data::tokenizer::checkpoint_tokenizer_files`]) into `dir`, each atomically.
pub(crate) fn write_tokenizer_files(tokenizer: &Path, dir: &Path) -> Result<()> {
    for (name, bytes) in temper_data::tokenizer::checkpoint_tokenizer_files(tokenizer)? {
        let dst = dir.join(name);
        temper_stage::atomic::write_atomic(&dst, &bytes).map_err(|e| CoreError::Io {
            path: dst.clone(),
            source: std::io::Error::other(format!("{e:#}")),
        })?;
    }
    Ok(())
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

/// Checks a stage's `save:` block, the error naming the key and its line.
pub fn check_save<T>(
    cfg: &temper_stage::ConfigFile<T>,
    save: &SaveOptions,
) -> std::result::Result<(), temper_stage::StageError> {
    cfg.ensure(
        save.max_shard_size
            .as_deref()
            .is_none_or(|s| parse_size(s).is_some()),
        "save.max_shard_size",
        "must be a size such as 5GB, 500MB or 2GiB",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_transformers_reads_them() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size(" 40kb "), Some(40_000));
        assert_eq!(parse_size("1.5MB"), Some(1_500_000));
        assert_eq!(parse_size("1000"), Some(1000));
        for bad in ["", "GB", "5 parsecs", "0MB", "-1GB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn shards_fill_in_name_order_and_never_split_a_tensor() {
        let t = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu)); // 4n bytes
        let tensors: Vec<(String, Tensor)> = [("a", 10), ("b", 10), ("c", 30), ("d", 5)]
            .into_iter()
            .map(|(k, n)| (k.to_string(), t(n)))
            .collect();
        assert_eq!(shard_groups(&tensors, None), vec![vec![0, 1, 2, 3]]);
        // 80-byte shards: a+b fill one, c (120 bytes) takes its own, d the last.
        assert_eq!(
            shard_groups(&tensors, Some(80)),
            vec![vec![0, 1], vec![2], vec![3]]
        );
        assert_eq!(shard_groups(&tensors, Some(10_000)).len(), 1);
    }
}
