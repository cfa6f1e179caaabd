//! Bottleneck adapters (Houlsby et al., 2019) with AdapterDrop (Rücklé et al., 2021): after the
//! attention and after the MLP of a block, before each joins the residual stream, a small
//! down-projection → activation → up-projection is added to the sublayer's output,
//! `y + up(act(down(y)))`, with `up` starting at zero so training starts from the base model.
//! `drop_layers: k` leaves the lowest k blocks without adapters (AdapterDrop: their forward and
//! backward cost nothing extra). PEFT has no such method, so the files are temper's own, laid
//! out like PEFT's: `adapter_config.json` (`peft_type: TEMPER_BOTTLENECK`) and
//! `adapter_model.safetensors` with keys `base_model.model.<block>.{attn,mlp}_adapter.
//! {down,up}.{weight,bias}` (`<block>` the Hugging Face path, e.g. `transformer.h.3`).

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Tensor};

use super::files::{config_err, relative_path, ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEMPER_ADAPTER};
use super::write::{copy_tokenizer, write_adapter_weights, write_json};
use super::{bad, PeftConfig, PeftError, Switch, Tuning};
use crate::config::Arch;
use crate::error::{CoreError, Result};
use crate::model::Transformer;

pub const PEFT_TYPE: &str = "TEMPER_BOTTLENECK";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    Gelu,
    Silu,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleneckConfig {
    /// The bottleneck is d_model / reduction wide (at least 1).
    pub reduction: i64,
    #[serde(default)]
    pub activation: Activation,
    /// AdapterDrop: no adapters in the lowest this-many blocks.
    #[serde(default)]
    pub drop_layers: usize,
}

/// One adapter: `y + up(act(down(y)))`.
pub struct Adapter {
    down: nn::Linear,
    up: nn::Linear,
    activation: Activation,
}

impl Adapter {
    pub fn forward(&self, y: &Tensor) -> Tensor {
        let h = self.down.forward(y);
        let h = match self.activation {
            Activation::Relu => h.relu(),
            Activation::Gelu => h.gelu("none"),
            Activation::Silu => h.silu(),
        };
        y + self.up.forward(&h)
    }
}

/// Every block's adapters (None below `drop_layers`) and the switch that bypasses them.
pub struct Bottleneck {
    /// Per block: (after attention, after the MLP).
    pub blocks: Vec<Option<(Adapter, Adapter)>>,
    pub switch: Arc<Switch>,
}

impl Bottleneck {
    /// The adapters of block `i` when they are live.
    pub fn at(&self, i: usize) -> Option<&(Adapter, Adapter)> {
        if !self.switch.enabled() {
            return None;
        }
        self.blocks.get(i).and_then(Option::as_ref)
    }
}

/// The Hugging Face path of block `i`.
fn block_path(arch: Arch, i: usize) -> String {
    match arch {
        Arch::Gpt2 => format!("transformer.h.{i}"),
        Arch::Llama => format!("model.layers.{i}"),
    }
}

fn width(d: i64, reduction: i64) -> i64 {
    (d / reduction).max(1)
}

/// Creates the adapters in a new store, under PEFT-style keys.
pub(crate) fn attach(
    model: &mut Transformer,
    device: Device,
    c: &BottleneckConfig,
) -> std::result::Result<(VarStore, Arc<Switch>), PeftError> {
    let d = model.config.d_model;
    if c.reduction < 1 || c.reduction > d {
        return Err(bad(
            "reduction",
            format!("must be in 1..={d} (the model width)"),
        ));
    }
    let n_layer = model.config.n_layer as usize;
    if c.drop_layers >= n_layer {
        return Err(bad(
            "drop_layers",
            format!("must leave at least one of the model's {n_layer} blocks with adapters"),
        ));
    }
    let store = VarStore::new(device);
    let root = store.root().sub("base_model").sub("model");
    let k = width(d, c.reduction);
    let make = |p: nn::Path| Adapter {
        down: nn::linear(p.sub("down"), d, k, Default::default()),
        up: nn::linear(
            p.sub("up"),
            k,
            d,
            nn::LinearConfig {
                ws_init: nn::Init::Const(0.0),
                bs_init: Some(nn::Init::Const(0.0)),
                bias: true,
            },
        ),
        activation: c.activation,
    };
    let blocks = (0..n_layer)
        .map(|i| {
            (i >= c.drop_layers).then(|| {
                let mut p = root.clone();
                for part in block_path(model.config.arch, i).split('.') {
                    p = p.sub(part);
                }
                (make(p.sub("attn_adapter")), make(p.sub("mlp_adapter")))
            })
        })
        .collect();
    let switch = Switch::new();
    model.adapters.bottleneck = Some(Bottleneck {
        blocks,
        switch: switch.clone(),
    });
    Ok((store, switch))
}

/// What a bottleneck checkpoint holds: the adapters and, for a reward model or critic, the
/// trained score head (in `vs`).
pub(crate) struct Saved<'a> {
    pub config: &'a BottleneckConfig,
    pub adapters: &'a VarStore,
    pub vs: &'a VarStore,
    pub model: &'a Transformer,
}

/// Writes temper's bottleneck files into `dir`, over `base`: the adapters, and a scalar head
/// under `base_model.model.score.*` (PEFT's `modules_to_save` layout).
pub(crate) fn save(
    dir: &Path,
    s: &Saved,
    base: &Path,
    inside: bool,
    tokenizer: &Path,
) -> Result<()> {
    let (c, model) = (s.config, s.model);
    let mut tensors: Vec<(String, Tensor)> = s.adapters.variables().into_iter().collect();
    let seq_cls = model.heads.score && !model.heads.lm;
    for (name, t) in s.vs.variables() {
        if t.requires_grad() && name.starts_with("score.") {
            tensors.push((format!("base_model.model.{name}"), t));
        }
    }
    write_adapter_weights(dir, &tensors)?;
    let config = json!({
        "peft_type": PEFT_TYPE,
        "task_type": if seq_cls { "SEQ_CLS" } else { "CAUSAL_LM" },
        "base_model_name_or_path": if inside {
            std::path::PathBuf::from("base")
        } else {
            std::path::absolute(base).unwrap_or(base.to_path_buf())
        },
        "reduction": c.reduction,
        "bottleneck_size": width(model.config.d_model, c.reduction),
        "activation": c.activation,
        "drop_layers": c.drop_layers,
        "placement": ["attn", "mlp"],
        "modules_to_save": if seq_cls { json!(["score"]) } else { Value::Null },
        "note": "temper's bottleneck adapters (Houlsby, AdapterDrop); not a PEFT type: load with temper",
    });
    write_json(&dir.join(ADAPTER_CONFIG), &config)?;
    let pointer = json!({
        "format": 1,
        "base": relative_path(base, dir),
        "config": model.hf_config_json(),
        "peft": PeftConfig::Adapter(c.clone()),
    });
    write_json(&dir.join(TEMPER_ADAPTER), &pointer)?;
    copy_tokenizer(tokenizer, dir)
}

/// Whether the bottleneck checkpoint in `dir` carries a trained score head.
pub(crate) fn saves_score(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["modules_to_save"] == json!(["score"]))
}

pub fn is_bottleneck_adapter(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["peft_type"] == PEFT_TYPE)
}

/// Attaches the adapters saved in `dir` to `model` and loads a saved score head into `vs`
/// (strict: every tensor present and shaped).
pub(crate) fn load(model: &mut Transformer, vs: &mut VarStore, dir: &Path) -> Result<Tuning> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| CoreError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|source| CoreError::Json {
        path: cfg_path.clone(),
        source,
    })?;
    let field = |k: &str| {
        v.get(k)
            .cloned()
            .ok_or_else(|| config_err(&cfg_path, k, "missing"))
    };
    let c = BottleneckConfig {
        reduction: serde_json::from_value(field("reduction")?)
            .map_err(|e| config_err(&cfg_path, "reduction", e.to_string()))?,
        activation: serde_json::from_value(field("activation")?)
            .map_err(|e| config_err(&cfg_path, "activation", e.to_string()))?,
        drop_layers: serde_json::from_value(field("drop_layers")?)
            .map_err(|e| config_err(&cfg_path, "drop_layers", e.to_string()))?,
    };
    let device = model.device();
    let (store, switch) =
        attach(model, device, &c).map_err(|e| config_err(&cfg_path, &e.field, e.message))?;
    let file = dir.join(ADAPTER_WEIGHTS);
    let mut saved: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&file)?.into_iter().collect();
    // The score head goes to the model's own variables.
    let base_vars = vs.variables();
    let heads: Vec<String> = saved
        .keys()
        .filter(|k| k.starts_with("base_model.model.score."))
        .cloned()
        .collect();
    for key in heads {
        let t = saved.remove(&key).expect("listed");
        let name = &key["base_model.model.".len()..];
        let var = base_vars.get(name).ok_or_else(|| {
            config_err(
                &file,
                &key,
                "a score head, but the model is loaded without one",
            )
        })?;
        if var.size() != t.size() {
            return Err(config_err(
                &file,
                &key,
                format!(
                    "shape {:?} does not fit the model's {:?}",
                    t.size(),
                    var.size()
                ),
            ));
        }
        tch::no_grad(|| var.shallow_clone().copy_(&t));
    }
    let vars = store.variables();
    if let Some(extra) = saved.keys().find(|k| !vars.contains_key(*k)) {
        return Err(config_err(
            &file,
            extra,
            "unexpected: no such adapter on this base (another base or another drop_layers?)",
        ));
    }
    for (k, t) in &vars {
        let s = saved
            .get(k)
            .ok_or_else(|| config_err(&file, k, "missing"))?;
        if s.size() != t.size() {
            return Err(config_err(
                &file,
                k,
                format!(
                    "shape {:?} does not fit the base model's {:?}: this adapter was trained on a different base",
                    s.size(),
                    t.size()
                ),
            ));
        }
        tch::no_grad(|| t.shallow_clone().copy_(s));
    }
    Ok(Tuning {
        config: Some(PeftConfig::Adapter(c)),
        adapters: Some(store),
        switch: Some(switch),
        quantized: None,
        adalora: None,
    })
}
