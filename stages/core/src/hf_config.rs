//! Hugging Face `config.json`, typed per family (candle's way): each `model_type` has its own
//! `Deserialize` struct with transformers' field names, converted into temper's [`ModelConfig`]
//! by `TryFrom`. Options temper does not implement (rope scaling, biased Llama projections,
//! other activations) are rejected by name rather than silently ignored.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{default_rope_theta, Arch, ModelConfig, ScorePooling};
use crate::error::{CoreError, Result};

/// The model types temper loads.
pub const SUPPORTED: [&str; 2] = ["gpt2", "llama"];

/// `eos_token_id` is a number, or a list in newer configs.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    fn first(&self) -> Option<i64> {
        match self {
            TokenIds::One(i) => Some(*i),
            TokenIds::Many(v) => v.first().copied(),
        }
    }
}

/// Fields every family shares.
#[derive(Debug, Default, Deserialize)]
struct Common {
    #[serde(default)]
    bos_token_id: Option<TokenIds>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pad_token_id: Option<TokenIds>,
    /// temper's own key: how a reward model pools its score (transformers ignores it).
    #[serde(default)]
    temper_score_pooling: Option<ScorePooling>,
    /// temper's own key: the reward's sign by prompt label.
    #[serde(default)]
    temper_score_sign: Option<crate::config::ScoreSign>,
}

#[derive(Debug, Deserialize)]
struct Gpt2Json {
    vocab_size: i64,
    n_positions: i64,
    n_embd: i64,
    n_layer: i64,
    n_head: i64,
    #[serde(default)]
    n_inner: Option<i64>,
    #[serde(default)]
    activation_function: Option<String>,
    #[serde(default)]
    layer_norm_epsilon: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: Option<bool>,
    #[serde(default)]
    reorder_and_upcast_attn: Option<bool>,
    #[serde(default)]
    scale_attn_weights: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct LlamaJson {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    #[serde(default)]
    num_key_value_heads: Option<i64>,
    #[serde(default)]
    head_dim: Option<i64>,
    max_position_embeddings: i64,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

/// A field-level complaint, turned into [`CoreError::Config`] with the file's path.
struct Unsupported(&'static str, String);

impl TryFrom<Gpt2Json> for ModelConfig {
    type Error = Unsupported;
    fn try_from(j: Gpt2Json) -> std::result::Result<Self, Unsupported> {
        let act = j.activation_function.as_deref().unwrap_or("gelu_new");
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(Unsupported(
                "activation_function",
                format!("`{act}` not supported (temper implements gelu_new)"),
            ));
        }
        if j.scale_attn_by_inverse_layer_idx == Some(true) {
            return Err(Unsupported(
                "scale_attn_by_inverse_layer_idx",
                "not supported by temper (must be false)".into(),
            ));
        }
        if j.reorder_and_upcast_attn == Some(true) {
            return Err(Unsupported(
                "reorder_and_upcast_attn",
                "not supported by temper (must be false)".into(),
            ));
        }
        if j.scale_attn_weights == Some(false) {
            return Err(Unsupported("scale_attn_weights", "must be true".into()));
        }
        Ok(with_common(
            ModelConfig {
                arch: Arch::Gpt2,
                vocab_size: j.vocab_size,
                n_layer: j.n_layer,
                n_head: j.n_head,
                d_model: j.n_embd,
                n_kv_head: None,
                d_ff: j.n_inner,
                max_position: j.n_positions,
                norm_eps: j.layer_norm_epsilon,
                rope_theta: default_rope_theta(),
                tie_embeddings: Some(j.tie_word_embeddings.unwrap_or(true)),
                bos_token_id: None,
                eos_token_id: None,
                pad_token_id: None,
                score_pooling: ScorePooling::LastToken,
                score_sign: None,
            },
            &j.common,
        ))
    }
}

impl TryFrom<LlamaJson> for ModelConfig {
    type Error = Unsupported;
    fn try_from(j: LlamaJson) -> std::result::Result<Self, Unsupported> {
        if !matches!(j.rope_scaling, None | Some(Value::Null)) {
            return Err(Unsupported(
                "rope_scaling",
                "not supported by temper".into(),
            ));
        }
        if j.attention_bias == Some(true) {
            return Err(Unsupported(
                "attention_bias",
                "not supported by temper (must be false)".into(),
            ));
        }
        if j.mlp_bias == Some(true) {
            return Err(Unsupported(
                "mlp_bias",
                "not supported by temper (must be false)".into(),
            ));
        }
        let act = j.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(Unsupported(
                "hidden_act",
                format!("`{act}` not supported (temper implements silu)"),
            ));
        }
        if let Some(hd) = j.head_dim {
            if hd * j.num_attention_heads != j.hidden_size {
                return Err(Unsupported(
                    "head_dim",
                    "must equal hidden_size / num_attention_heads".into(),
                ));
            }
        }
        Ok(with_common(
            ModelConfig {
                arch: Arch::Llama,
                vocab_size: j.vocab_size,
                n_layer: j.num_hidden_layers,
                n_head: j.num_attention_heads,
                d_model: j.hidden_size,
                n_kv_head: j.num_key_value_heads,
                d_ff: Some(j.intermediate_size),
                max_position: j.max_position_embeddings,
                norm_eps: j.rms_norm_eps,
                rope_theta: j.rope_theta.unwrap_or_else(default_rope_theta),
                tie_embeddings: Some(j.tie_word_embeddings.unwrap_or(false)),
                bos_token_id: None,
                eos_token_id: None,
                pad_token_id: None,
                score_pooling: ScorePooling::LastToken,
                score_sign: None,
            },
            &j.common,
        ))
    }
}

fn with_common(mut cfg: ModelConfig, c: &Common) -> ModelConfig {
    cfg.bos_token_id = c.bos_token_id.as_ref().and_then(TokenIds::first);
    cfg.eos_token_id = c.eos_token_id.as_ref().and_then(TokenIds::first);
    cfg.pad_token_id = c.pad_token_id.as_ref().and_then(TokenIds::first);
    cfg.score_pooling = c.temper_score_pooling.unwrap_or_default();
    cfg.score_sign = c.temper_score_sign.clone();
    cfg
}

/// Reads and converts a `config.json`; every error names the file and the field.
pub fn read(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
        path: path.into(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| CoreError::Json {
        path: path.into(),
        source,
    })?;
    from_value(value, path)
}

/// A config.json already parsed; `path` names it in errors.
pub fn from_value(value: Value, path: &Path) -> Result<ModelConfig> {
    let field = |field: &str, message: String| CoreError::Config {
        path: path.into(),
        field: field.into(),
        message,
    };
    let model_type = value
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| field("model_type", "missing".into()))?
        .to_string();
    let typed = |e: serde_json::Error| field(&model_type, format!("{e}"));
    let converted = match model_type.as_str() {
        "gpt2" => ModelConfig::try_from(serde_json::from_value::<Gpt2Json>(value).map_err(typed)?),
        "llama" => {
            ModelConfig::try_from(serde_json::from_value::<LlamaJson>(value).map_err(typed)?)
        }
        other => {
            return Err(field(
                "model_type",
                format!(
                    "`{other}` not supported: temper loads {}",
                    SUPPORTED.join(", ")
                ),
            ))
        }
    };
    let cfg = converted.map_err(|Unsupported(f, m)| field(f, m))?;
    cfg.validate()
        .map_err(|e| field("(shape)", e.to_string()))?;
    Ok(cfg)
}
