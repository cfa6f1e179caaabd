//! LoRA checkpoints in Hugging Face PEFT's layout:
//!
//! ```text
//! checkpoint/adapter_config.json        PEFT's LoraConfig (peft_type LORA)
//! checkpoint/adapter_model.safetensors  base_model.model.<module>.lora_A.weight, lora_B.weight,
//!                                       lora_magnitude_vector (DoRA), trained biases, score
//! checkpoint/tokenizer.json
//! checkpoint/temper_adapter.json        where the base is (relative), the full model config
//! checkpoint/base/                      the base, only when it exists nowhere else (the stage
//!                                       started from another adapter, merged in memory)
//! ```
//!
//! `peft.PeftModel.from_pretrained(base, checkpoint)` loads the folder; temper loads it (and
//! adapters PEFT saved) by building the base, attaching the adapters and merging them. This
//! file reads; `write.rs` writes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::{apply, AdaloraConfig, LoraBias, LoraConfig, LoraInit, PeftConfig, Tuning};
use crate::checkpoint::{load_checkpoint_as, LoadSpec, ScoreHead, CONFIG_FILE};
use crate::config::ModelConfig;
use crate::error::{CoreError, Result};
use crate::model::Transformer;

pub use temper_stage::adapter::ADAPTER_CONFIG;
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub use temper_stage::adapter::TEMPER_ADAPTER;

/// Whether `dir` holds an adapter rather than a full checkpoint.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).exists()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Targets {
    List(Vec<String>),
    Pattern(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Layers {
    One(usize),
    List(Vec<usize>),
}

/// The fields of PEFT's `adapter_config.json` temper reads; the others are listed in
/// [`PEFT_KEYS_IGNORED`] and anything else is warned about and ignored, as PEFT does.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Required for LORA; AdaLoRA ignores it (its ranks are `init_r` and `rank_pattern`).
    #[serde(default)]
    r: Option<i64>,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Targets,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    bias: String,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    layers_to_transform: Option<Layers>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

fn default_bias() -> String {
    "none".into()
}

/// PEFT LoraConfig keys that do not change what a plain LoRA/DoRA adapter computes at the
/// values PEFT writes by default (checked when not at those values).
const PEFT_KEYS_IGNORED: &[&str] = &[
    "auto_mapping",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "exclude_modules",
    "trainable_token_indices",
    "layer_replication",
    "lora_bias",
    "target_parameters",
    "peft_version",
    "use_qalora",
    "qalora_group_size",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "ensure_weight_tying",
];

/// The keys of PEFT's AdaLoraConfig beyond LoraConfig's.
const ADALORA_KEYS: &[&str] = &[
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "rank_pattern",
];

pub(crate) fn config_err(path: &Path, field: &str, message: impl Into<String>) -> CoreError {
    CoreError::Config {
        path: path.into(),
        field: field.into(),
        message: message.into(),
    }
}

pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| CoreError::Io {
        path: path.clone(),
        source,
    })?;
    let c: AdapterConfig = serde_json::from_str(&text).map_err(|source| CoreError::Json {
        path: path.clone(),
        source,
    })?;
    let adalora = c.peft_type == "ADALORA";
    if c.peft_type != "LORA" && !adalora {
        return Err(config_err(
            &path,
            "peft_type",
            format!(
                "`{}` adapters are not loaded by temper; it loads LORA (LoRA, rsLoRA, DoRA), ADALORA, PROMPT_TUNING, P_TUNING, PREFIX_TUNING and its own bottleneck adapters",
                c.peft_type
            ),
        ));
    }
    for (k, v) in &c.rest {
        if adalora && ADALORA_KEYS.contains(&k.as_str()) {
            continue;
        }
        let unusual = match k.as_str() {
            "layer_replication" | "rank_pattern" | "alpha_pattern" | "target_parameters" => {
                !(v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))
            }
            "use_qalora" | "lora_bias" => v.as_bool() == Some(true),
            _ => false,
        };
        if unusual {
            return Err(config_err(
                &path,
                k,
                format!("{v} is not supported by temper's LoRA"),
            ));
        }
        if !PEFT_KEYS_IGNORED.contains(&k.as_str()) {
            tracing::warn!("{}: unknown key `{k}` ignored", path.display());
        }
    }
    Ok(c)
}

impl AdapterConfig {
    fn target_list(&self, path: &Path) -> Result<Vec<String>> {
        match &self.target_modules {
            Targets::List(v) => Ok(v.clone()),
            Targets::Pattern(p) => Err(config_err(
                path,
                "target_modules",
                format!("the regular expression `{p}` is not supported; list the module names"),
            )),
        }
    }

    fn layer_list(&self) -> Option<Vec<usize>> {
        self.layers_to_transform.clone().map(|l| match l {
            Layers::One(i) => vec![i],
            Layers::List(v) => v,
        })
    }

    /// An ADALORA config: its schedule and, when training allocated ranks, how many triplets
    /// each layer kept (`<module>` → count).
    fn adalora(&self, path: &Path) -> Result<(AdaloraConfig, Option<BTreeMap<String, usize>>)> {
        let get = |k: &str| self.rest.get(k).filter(|v| !v.is_null());
        let int = |k: &str, default: usize| -> Result<usize> {
            get(k).map_or(Ok(default), |v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| config_err(path, k, "must be a non-negative integer"))
            })
        };
        let float = |k: &str, default: f64| -> Result<f64> {
            get(k).map_or(Ok(default), |v| {
                v.as_f64()
                    .ok_or_else(|| config_err(path, k, "must be a number"))
            })
        };
        if self.bias != "none" {
            return Err(config_err(
                path,
                "bias",
                "AdaLoRA adapters with trained biases are not supported",
            ));
        }
        let config = AdaloraConfig {
            init_r: int("init_r", 12)? as i64,
            target_r: int("target_r", 8)? as i64,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: Some(self.target_list(path)?),
            layers: self.layer_list(),
            tinit: int("tinit", 0)?,
            tfinal: int("tfinal", 0)?,
            delta_t: int("deltaT", 1)?,
            beta1: float("beta1", 0.85)?,
            beta2: float("beta2", 0.85)?,
            orth_reg_weight: float("orth_reg_weight", 0.5)?,
            total_step: get("total_step")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        };
        let pattern = match get("rank_pattern") {
            None => None,
            Some(v) => {
                let flags: BTreeMap<String, Vec<bool>> = serde_json::from_value(v.clone())
                    .map_err(|e| config_err(path, "rank_pattern", e.to_string()))?;
                let mut ranks = BTreeMap::new();
                for (key, f) in flags {
                    let module = key.strip_suffix(".lora_E").ok_or_else(|| {
                        config_err(
                            path,
                            "rank_pattern",
                            format!("`{key}` is not a `<module>.lora_E` key"),
                        )
                    })?;
                    ranks.insert(module.to_string(), f.iter().filter(|&&b| b).count());
                }
                Some(ranks)
            }
        };
        Ok((config, pattern))
    }

    fn lora(&self, path: &Path) -> Result<LoraConfig> {
        let target_modules = match &self.target_modules {
            Targets::List(v) => v.clone(),
            Targets::Pattern(p) => {
                return Err(config_err(
                    path,
                    "target_modules",
                    format!("the regular expression `{p}` is not supported; list the module names"),
                ))
            }
        };
        let bias = match self.bias.as_str() {
            "none" => LoraBias::None,
            "all" => LoraBias::All,
            "lora_only" => LoraBias::LoraOnly,
            other => return Err(config_err(path, "bias", format!("unknown value `{other}`"))),
        };
        Ok(LoraConfig {
            r: self
                .r
                .ok_or_else(|| config_err(path, "r", "a LORA adapter needs its rank"))?,
            alpha: Some(self.lora_alpha),
            dropout: self.lora_dropout,
            target_modules: Some(target_modules),
            layers: self.layers_to_transform.clone().map(|l| match l {
                Layers::One(i) => vec![i],
                Layers::List(v) => v,
            }),
            bias,
            rslora: self.use_rslora,
            dora: self.use_dora,
            init: LoraInit::Default,
            double_quant: None,
        })
    }
}

/// Attaches the adapter in `dir` to `model` (unmerged) and loads its tensors: LoRA factors into
/// the adapter store, trained biases and the score head into `vs`. Strict both ways.
pub fn load_adapter(model: &mut Transformer, vs: &mut VarStore, dir: &Path) -> Result<Tuning> {
    if super::bottleneck::is_bottleneck_adapter(dir) {
        return super::bottleneck::load(model, vs, dir);
    }
    if super::prompt::is_prompt_adapter(dir) {
        return super::prompt::load(model, dir);
    }
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let c = read_adapter_config(dir)?;
    let (peft, ranks) = if c.peft_type == "ADALORA" {
        let (a, ranks) = c.adalora(&cfg_path)?;
        (PeftConfig::Adalora(a), ranks)
    } else {
        (PeftConfig::Lora(c.lora(&cfg_path)?), None)
    };
    if c.fan_in_fan_out != (model.config.arch == crate::config::Arch::Gpt2) {
        tracing::warn!(
            "{}: fan_in_fan_out {} ignored: the layout follows the model family",
            cfg_path.display(),
            c.fan_in_fan_out
        );
    }
    let tuning = apply(model, vs, Some(&peft))
        .map_err(|e| config_err(&cfg_path, &e.field["peft.".len()..], e.message))?;
    if let (Some(ranks), Some(allocator)) = (&ranks, &tuning.adalora) {
        allocator.set_loaded_ranks(ranks);
    }
    let file = dir.join(ADAPTER_WEIGHTS);
    let mut saved: HashMap<String, Tensor> = Tensor::read_safetensors(&file)?.into_iter().collect();
    let adapters = tuning.adapters.as_ref().expect("LoRA has an adapter store");
    let mismatch = |name: &str, want: &[i64], got: &[i64]| {
        CoreError::Config {
        path: file.clone(),
        field: name.into(),
        message: format!(
            "shape {got:?} does not fit the base model's {want:?}: this adapter was trained on a different base"
        ),
    }
    };
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in adapters.variables() {
            let src = saved
                .remove(&name)
                .ok_or_else(|| config_err(&file, &name, "missing from the adapter"))?;
            // AdaLoRA saves only the triplets its allocation kept: they fill the first ranks,
            // the rest stay zero (switched off).
            let rank_dim = if name.ends_with(".lora_B") { 1 } else { 0 };
            let kept = ranks.as_ref().and_then(|r| {
                let module = name.strip_prefix("base_model.model.")?.rsplit_once('.')?.0;
                r.get(module).copied()
            });
            let (mut want, got) = (var.size(), src.size());
            if let Some(k) = kept.filter(|_| want.len() == 2) {
                want[rank_dim] = k as i64;
            }
            if got != want {
                return Err(mismatch(&name, &want, &got));
            }
            let _ = var.zero_();
            var.narrow(rank_dim as i64, 0, want[rank_dim]).copy_(&src);
        }
        let base = vs.variables();
        for (name, src) in saved.drain() {
            let key = name.strip_prefix("base_model.model.").unwrap_or(&name);
            // PEFT saved the score head under its wrapper's name in older versions, and saves
            // an adapted layer's bias under `base_layer`.
            let key = key
                .replace(".modules_to_save.default", "")
                .replace(".base_layer.", ".");
            let Some(mut var) = base.get(&key).map(|t| t.shallow_clone()) else {
                return Err(config_err(
                    &file,
                    &name,
                    "not a LoRA tensor of this model, nor one of its parameters",
                ));
            };
            if src.size() != var.size() {
                return Err(mismatch(&name, &var.size(), &src.size()));
            }
            var.copy_(&src);
        }
        Ok(())
    })?;
    Ok(tuning)
}

/// Folds every adapter into its layer's weight and detaches it: the model computes the same
/// function with plain weights.
pub fn merge_adapters(model: &mut Transformer) {
    tch::no_grad(|| {
        for (_, linear) in model.block_linears_mut() {
            if let Some(lora) = linear.lora.take() {
                let merged = lora.merged_weight(linear);
                linear.weight.copy_(&merged);
            }
        }
    });
}

/// Builds the base of the adapter in `dir`, loads the adapter and merges it: a plain model.
pub fn load_adapter_checkpoint(
    dir: &Path,
    spec: LoadSpec,
    device: Device,
) -> Result<(VarStore, Transformer)> {
    if super::prompt::is_unmergeable_adapter(dir) {
        return super::prompt::load_checkpoint(dir, spec, device);
    }
    let c = read_adapter_config(dir)?;
    let base = base_dir(dir)?;
    let config = adapter_model_config(dir)?;
    // A reward model's head travels with its adapter.
    let has_score = c.modules_to_save.iter().flatten().any(|m| m == "score");
    let base_spec = LoadSpec {
        score: if spec.score == ScoreHead::Load && has_score {
            ScoreHead::Fresh
        } else {
            spec.score
        },
        ..spec
    };
    let (mut vs, mut model) = load_checkpoint_as(&base, &config, base_spec, device)?;
    load_adapter(&mut model, &mut vs, dir)?;
    merge_adapters(&mut model);
    vs.unfreeze();
    Ok((vs, model))
}

/// The model an adapter folder describes: temper's saved config, else its base's config.json.
pub fn adapter_model_config(dir: &Path) -> Result<ModelConfig> {
    if dir.join(TEMPER_ADAPTER).exists() {
        temper_config(dir)
    } else {
        ModelConfig::from_hf_json(&base_dir(dir)?.join(CONFIG_FILE))
    }
}

/// The full model config temper saved beside its adapter (score pooling and sign included).
fn temper_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(TEMPER_ADAPTER);
    let text = std::fs::read_to_string(&path).map_err(|source| CoreError::Io {
        path: path.clone(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|source| CoreError::Json {
        path: path.clone(),
        source,
    })?;
    let config = v
        .get("config")
        .ok_or_else(|| config_err(&path, "config", "missing"))?;
    crate::hf_config::from_value(config.clone(), &path)
}

/// Where an adapter's base lives ([`temper_stage::adapter::adapter_base`]), or an error
/// saying why it cannot be found.
pub(crate) fn base_dir(dir: &Path) -> Result<PathBuf> {
    if let Some(base) = temper_stage::adapter::adapter_base(dir) {
        return Ok(base);
    }
    let message = match temper_stage::adapter::peft_base_name(dir) {
        Some(b) => format!("`{b}` is not a local folder; temper does not download models — point it at the base checkpoint's folder"),
        None => "missing: the adapter does not say which base it applies to".to_string(),
    };
    Err(config_err(
        &dir.join(ADAPTER_CONFIG),
        "base_model_name_or_path",
        message,
    ))
}

/// `target` relative to the folder `from` (both made absolute first).
pub(crate) fn relative_path(target: &Path, from: &Path) -> PathBuf {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (t, f) = (abs(target), abs(from));
    let tc: Vec<Component> = t.components().collect();
    let fc: Vec<Component> = f.components().collect();
    let common = tc.iter().zip(&fc).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..fc.len() {
        out.push("..");
    }
    for c in &tc[common..] {
        out.push(c.as_os_str());
    }
    out
}
