//! Prompt tuning (Lester et al., 2021): `num_virtual_tokens` learned embeddings placed before
//! every input sequence, the model frozen. As in PEFT, the virtual tokens take the first
//! positions and every real token attends to them; the model strips their outputs, so logits
//! still line up with the input ids. In generation they enter once, with the prompt, and stay
//! in the KV cache. Saved in PEFT's `PROMPT_TUNING` format (`prompt_embeddings`, (n, C)).

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::files::{
    base_dir, config_err, relative_path, ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEMPER_ADAPTER,
};
use super::ptuning::{Encoder, PtuningConfig};
use super::write::{copy_tokenizer, write_adapter_weights, write_json};
use super::{bad, PeftConfig, PeftError, PrefixConfig, Switch, Tuning};
use crate::checkpoint::{load_checkpoint_as, LoadSpec, ScoreHead};
use crate::error::{CoreError, Result};
use crate::model::Transformer;

/// A number of virtual tokens (prompt, P- or prefix tuning) the model has room for.
pub(crate) fn check_virtual_tokens(
    model: &Transformer,
    n: i64,
) -> std::result::Result<(), PeftError> {
    if n + 1 > model.config.max_position {
        return Err(bad(
            "num_virtual_tokens",
            format!(
                "{n} virtual tokens leave no room in the model's {} positions",
                model.config.max_position
            ),
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    pub num_virtual_tokens: i64,
    /// Start from the embeddings of this text's tokens (repeated to fill); default: the
    /// embeddings of tokens drawn at random from the vocabulary (PEFT's `SAMPLE_VOCAB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_text: Option<String>,
}

/// The learned embeddings, (n, C) — with P-tuning the prompt encoder's input, whose output
/// are the virtual tokens — and the switch that bypasses them for the reference.
pub struct VirtualPrompt {
    pub embeddings: Tensor,
    pub encoder: Option<Encoder>,
    pub switch: Arc<Switch>,
}

impl VirtualPrompt {
    pub fn num_virtual_tokens(&self) -> i64 {
        self.embeddings.size()[0]
    }

    pub fn active_len(&self) -> i64 {
        if self.switch.enabled() {
            self.num_virtual_tokens()
        } else {
            0
        }
    }

    /// The virtual tokens, (n, C).
    pub fn virtual_embeddings(&self) -> Tensor {
        match &self.encoder {
            Some(e) => e.forward(&self.embeddings),
            None => self.embeddings.shallow_clone(),
        }
    }
}

/// Creates the prompt in a new store (key `prompt_embeddings`, as PEFT saves it), initialised
/// from random vocabulary rows; [`init_from_text`] replaces them when asked.
pub(crate) fn attach(
    model: &mut Transformer,
    device: Device,
    c: &PromptConfig,
) -> std::result::Result<(VarStore, Arc<Switch>), PeftError> {
    check_virtual_tokens(model, c.num_virtual_tokens)?;
    let n = c.num_virtual_tokens;
    let store = VarStore::new(device);
    let embed = model.embedding_matrix();
    let rows = Tensor::randint(embed.size()[0], [n], (Kind::Int64, device));
    let init = tch::no_grad(|| embed.index_select(0, &rows).to_kind(Kind::Float));
    let embeddings = store.root().var_copy("prompt_embeddings", &init);
    let switch = Switch::new();
    model.adapters.prompt = Some(VirtualPrompt {
        embeddings,
        encoder: None,
        switch: switch.clone(),
    });
    Ok((store, switch))
}

/// P-tuning: the encoder's input embeddings (N(0, 1), as PEFT's) and the encoder, in a new
/// store under PEFT's `prompt_encoder.*` names.
pub(crate) fn attach_ptuning(
    model: &mut Transformer,
    device: Device,
    c: &PtuningConfig,
) -> std::result::Result<(VarStore, Arc<Switch>), PeftError> {
    let plain = PromptConfig {
        num_virtual_tokens: c.num_virtual_tokens,
        init_text: None,
    };
    // The same checks as prompt tuning; the plain embeddings are then replaced.
    let (_, _) = attach(model, device, &plain)?;
    let store = VarStore::new(device);
    let p = store.root().sub("prompt_encoder");
    let d = model.config.d_model;
    let embeddings = p
        .sub("embedding")
        .randn("weight", &[c.num_virtual_tokens, d], 0.0, 1.0);
    let encoder = Encoder::new(&p, d, c)?;
    let switch = Switch::new();
    model.adapters.prompt = Some(VirtualPrompt {
        embeddings,
        encoder: Some(encoder),
        switch: switch.clone(),
    });
    Ok((store, switch))
}

/// Applies `init_text` of a prompt-tuning config, tokenized by `encode`; nothing otherwise.
pub fn init_prompt_text<E: std::fmt::Display>(
    model: &Transformer,
    config: Option<&PeftConfig>,
    encode: impl Fn(&str) -> std::result::Result<Vec<u32>, E>,
) -> std::result::Result<(), PeftError> {
    let Some(PeftConfig::Prompt(PromptConfig {
        init_text: Some(text),
        ..
    })) = config
    else {
        return Ok(());
    };
    let ids = encode(text).map_err(|e| bad("init_text", e.to_string()))?;
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    init_from_text(model, &ids)
}

/// Sets the virtual tokens to the embeddings of `ids` (the init text's tokens), repeated to
/// fill them and cut to their number.
pub fn init_from_text(model: &Transformer, ids: &[i64]) -> std::result::Result<(), PeftError> {
    let Some(p) = &model.adapters.prompt else {
        return Ok(());
    };
    if ids.is_empty() {
        return Err(bad("init_text", "the text has no tokens"));
    }
    let n = p.embeddings.size()[0] as usize;
    let picked: Vec<i64> = ids.iter().copied().cycle().take(n).collect();
    let rows = Tensor::from_slice(&picked).to_device(p.embeddings.device());
    tch::no_grad(|| {
        let values = model.embedding_matrix().index_select(0, &rows);
        p.embeddings.shallow_clone().copy_(&values);
    });
    Ok(())
}

/// The virtual tokens a checkpoint folder puts before every input: a prompt adapter's number,
/// else 0.
pub fn virtual_tokens_of(dir: &Path) -> i64 {
    if !is_prompt_adapter(dir) {
        return 0;
    }
    read_config(dir)
        .ok()
        .and_then(|v| v["num_virtual_tokens"].as_i64())
        .unwrap_or(0)
}

/// Whether `dir` holds an adapter that cannot be merged into weights: prompt, P- or prefix
/// tuning, or bottleneck adapters.
pub fn is_unmergeable_adapter(dir: &Path) -> bool {
    is_prompt_adapter(dir) || super::bottleneck::is_bottleneck_adapter(dir)
}

/// Whether `dir` is a prompt-, P- or prefix-tuning adapter (virtual tokens).
pub fn is_prompt_adapter(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| {
            ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"]
                .contains(&v["peft_type"].as_str().unwrap_or(""))
        })
}

fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| CoreError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| CoreError::Json { path, source })
}

/// Writes `adapter_config.json`, `adapter_model.safetensors` (one tensor,
/// `prompt_embeddings`), `temper_adapter.json` and the tokenizer into `dir`, over `base`.
#[allow(clippy::too_many_arguments)]
fn write_adapter(
    dir: &Path,
    embeddings: &Tensor,
    mut config: Value,
    peft: &PeftConfig,
    model: &Transformer,
    base: &Path,
    inside: bool,
    tokenizer: &Path,
) -> Result<()> {
    write_adapter_weights(
        dir,
        &[("prompt_embeddings".into(), embeddings.shallow_clone())],
    )?;
    let cfg = &model.config;
    let common = json!({
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": if inside {
            std::path::PathBuf::from("base")
        } else {
            std::path::absolute(base).unwrap_or(base.to_path_buf())
        },
        "num_transformer_submodules": 1,
        "num_layers": cfg.n_layer,
        "inference_mode": true,
    });
    for (k, v) in common.as_object().expect("an object") {
        config[k] = v.clone();
    }
    write_json(&dir.join(ADAPTER_CONFIG), &config)?;
    let pointer = json!({
        "format": 1,
        "base": relative_path(base, dir),
        "config": model.hf_config_json(),
        "peft": peft,
    });
    write_json(&dir.join(TEMPER_ADAPTER), &pointer)?;
    copy_tokenizer(tokenizer, dir)
}

/// Saves prompt tuning in PEFT's `PROMPT_TUNING` format.
pub(crate) fn save(
    dir: &Path,
    c: &PromptConfig,
    adapters: &VarStore,
    model: &Transformer,
    base: &Path,
    inside: bool,
    tokenizer: &Path,
) -> Result<()> {
    let embeddings = adapters
        .variables()
        .remove("prompt_embeddings")
        .expect("prompt tuning has its embeddings");
    let config = json!({
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": c.num_virtual_tokens,
        "token_dim": model.config.d_model,
        "num_attention_heads": model.config.n_head,
        // The init only matters before training; "TEXT" would make PEFT load a tokenizer by
        // name when it rebuilds the module, so the trained prompt is declared RANDOM.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": null,
        "tokenizer_name_or_path": null,
    });
    let peft = PeftConfig::Prompt(c.clone());
    write_adapter(
        dir,
        &embeddings,
        config,
        &peft,
        model,
        base,
        inside,
        tokenizer,
    )
}

/// Saves P-tuning in PEFT's `P_TUNING` format: the encoder's output, which PEFT reads in
/// inference mode.
pub(crate) fn save_ptuning(
    dir: &Path,
    c: &PtuningConfig,
    model: &Transformer,
    base: &Path,
    inside: bool,
    tokenizer: &Path,
) -> Result<()> {
    let prompt = model
        .adapters
        .prompt
        .as_ref()
        .expect("P-tuning attached its prompt");
    let out = tch::no_grad(|| prompt.virtual_embeddings());
    let d = model.config.d_model;
    let config = json!({
        "peft_type": "P_TUNING",
        "num_virtual_tokens": c.num_virtual_tokens,
        "token_dim": d,
        "num_attention_heads": model.config.n_head,
        "encoder_reparameterization_type": c.encoder.peft_name(),
        "encoder_hidden_size": c.encoder_hidden_size.unwrap_or(d),
        "encoder_num_layers": 2,
        "encoder_dropout": 0.0,
    });
    let peft = PeftConfig::Ptuning(c.clone());
    write_adapter(dir, &out, config, &peft, model, base, inside, tokenizer)
}

/// Saves prefix tuning in PEFT's `PREFIX_TUNING` format: the prefix itself (an MLP's output
/// when it was reparameterised), so `prefix_projection` is false.
pub(crate) fn save_prefix(
    dir: &Path,
    c: &PrefixConfig,
    model: &Transformer,
    base: &Path,
    inside: bool,
    tokenizer: &Path,
) -> Result<()> {
    let prefix = model
        .adapters
        .prefix
        .as_ref()
        .expect("prefix tuning attached its prefix");
    let flat = tch::no_grad(|| prefix.flat());
    let width = super::kv_width(&model.config);
    let config = json!({
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": c.num_virtual_tokens,
        // For grouped-query attention PEFT sizes the prefix by the key/value heads.
        "token_dim": width,
        "num_attention_heads": model.config.n_kv_head(),
        "encoder_hidden_size": c.encoder_hidden_size.unwrap_or(width),
        "prefix_projection": false,
    });
    let peft = PeftConfig::Prefix(c.clone());
    write_adapter(dir, &flat, config, &peft, model, base, inside, tokenizer)
}

/// Attaches the prompt or prefix saved in `dir` (by temper or PEFT) to `model`; trainable.
pub(crate) fn load(model: &mut Transformer, dir: &Path) -> Result<Tuning> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let v = read_config(dir)?;
    let n = v["num_virtual_tokens"]
        .as_i64()
        .ok_or_else(|| config_err(&cfg_path, "num_virtual_tokens", "missing or not a number"))?;
    if v["num_transformer_submodules"].as_i64().unwrap_or(1) != 1 {
        return Err(config_err(
            &cfg_path,
            "num_transformer_submodules",
            "only decoder-only models (1) are supported",
        ));
    }
    let file = dir.join(ADAPTER_WEIGHTS);
    let saved = Tensor::read_safetensors(&file)?
        .into_iter()
        .find(|(k, _)| k == "prompt_embeddings")
        .map(|(_, t)| t)
        .ok_or_else(|| config_err(&file, "prompt_embeddings", "missing"))?;
    if v["peft_type"] == "PREFIX_TUNING" {
        if v["prefix_projection"].as_bool().unwrap_or(false) {
            return Err(config_err(
                &cfg_path,
                "prefix_projection",
                "true: this file holds the MLP's input, not the prefix; save it with inference_mode (PEFT does) or prefix_projection false",
            ));
        }
        let (store, switch) = super::prefix::attach_saved(model, &saved)
            .map_err(|m| config_err(&file, "prompt_embeddings", m))?;
        return Ok(Tuning {
            config: Some(PeftConfig::Prefix(PrefixConfig {
                num_virtual_tokens: n,
                projection: false,
                encoder_hidden_size: None,
            })),
            adapters: Some(store),
            switch: Some(switch),
            quantized: None,
            adalora: None,
        });
    }
    let want = [n, model.config.d_model];
    if saved.size() != want {
        return Err(config_err(
            &file,
            "prompt_embeddings",
            format!(
                "shape {:?} does not fit the base model's {want:?}: this prompt was trained on a different base",
                saved.size()
            ),
        ));
    }
    let c = PromptConfig {
        num_virtual_tokens: n,
        init_text: None,
    };
    let device = model.device();
    let (store, switch) =
        attach(model, device, &c).map_err(|e| config_err(&cfg_path, &e.field, e.message))?;
    tch::no_grad(|| {
        store.variables()["prompt_embeddings"]
            .shallow_clone()
            .copy_(&saved.to_kind(Kind::Float))
    });
    Ok(Tuning {
        config: Some(PeftConfig::Prompt(c)),
        adapters: Some(store),
        switch: Some(switch),
        quantized: None,
        adalora: None,
    })
}

/// A prompt, prefix or bottleneck adapter folder as a model: its base with them attached
/// (they cannot be merged into weights). A training stage refuses such an `init` ([`super::apply`]): what it
/// saved would lose the prompt.
pub(crate) fn load_checkpoint(
    dir: &Path,
    spec: LoadSpec,
    device: Device,
) -> Result<(VarStore, Transformer)> {
    let base = base_dir(dir)?;
    let config = super::files::adapter_model_config(dir)?;
    let bottleneck = super::bottleneck::is_bottleneck_adapter(dir);
    // A reward model's head travels with its bottleneck adapters: the base has none.
    let base_spec = match spec.score {
        ScoreHead::Load if bottleneck && super::bottleneck::saves_score(dir) => LoadSpec {
            score: ScoreHead::Fresh,
            ..spec
        },
        _ => spec,
    };
    let (mut vs, mut model) = load_checkpoint_as(&base, &config, base_spec, device)?;
    let tuning = if bottleneck {
        super::bottleneck::load(&mut model, &mut vs, dir)?
    } else {
        load(&mut model, dir)?
    };
    // Frozen: it belongs to the checkpoint, not to whatever trains next.
    if let Some(store) = &tuning.adapters {
        for (_, t) in store.variables() {
            let _ = t.set_requires_grad(false);
        }
    }
    vs.unfreeze();
    Ok((vs, model))
}
