//! Writing checkpoints as transformers writes them: `model.safetensors` (or shards listed by
//! `model.safetensors.index.json`) in the dtype asked, `config.json`, `generation_config.json`,
//! and the tokenizer's files — each file atomically, so a crash never leaves a half-written file
//! under its final name. A stage's `save:` key chooses the dtype and shard size.

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{io_err, CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX};
use crate::config::ModelConfig;
use crate::error::{CoreError, Result};
use crate::model::Transformer;

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
        let dir = &crate::peft::files::base_dir(dir).unwrap_or_else(|_| dir.to_path_buf());
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
    let text = serde_json::to_string_pretty(value).expect("a JSON value always serialises");
    write_file_atomic(path, text.as_bytes())
}

/// [`temper_stage::atomic::write_atomic`] with its error as this crate's.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    temper_stage::atomic::write_atomic(path, bytes).map_err(|e| CoreError::Io {
        path: path.into(),
        source: std::io::Error::other(format!("{e:#}")),
    })
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

/// Writes a full Hugging Face checkpoint of `model` into `<out>/checkpoint/` with the
/// tokenizer it was trained with, in the dtype and shards `write` says: what the next stage
/// (or `transformers`) loads. Adapters are saved through [`crate::peft::Tuning::save_into`].
pub fn save_full_checkpoint(
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
    write_json_atomic(&serde_json::Value::Object(v), path)
}

/// Writes `tokenizer.json` and its companions (see
/// [`temper_data::tokenizer::checkpoint_tokenizer_files`]) into `dir`, each atomically.
pub(crate) fn write_tokenizer_files(tokenizer: &Path, dir: &Path) -> Result<()> {
    for (name, bytes) in temper_data::tokenizer::checkpoint_tokenizer_files(tokenizer)? {
        write_file_atomic(&dir.join(name), &bytes)?;
    }
    Ok(())
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
