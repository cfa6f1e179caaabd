//! Hugging Face `config.json`, typed per family (candle's way): each `model_type` has its own
//! `Deserialize` struct with transformers' field names, converted into temper's [`ModelConfig`]
//! by `TryFrom`. Llama, Mistral, Qwen2 and Qwen3 share the Llama layout and one struct. Options
//! temper does not implement (other activations, other rope scalings, Qwen's per-layer sliding
//! window) are rejected by name rather than silently ignored.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{default_rope_theta, Arch, Family, ModelConfig, RopeScaling, ScorePooling};
use crate::error::{CoreError, Result};

/// The model types temper loads.
pub const SUPPORTED: [&str; 5] = ["gpt2", "llama", "mistral", "qwen2", "qwen3"];

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

/// Llama, Mistral, Qwen2 and Qwen3: one layout, so one struct with every family's fields.
#[derive(Debug, Deserialize)]
struct LlamaLayoutJson {
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
    /// Mistral: a window size or null; Qwen: only used with `use_sliding_window`.
    #[serde(default = "absent")]
    sliding_window: Value,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(flatten)]
    common: Common,
}

/// Tells a key that is missing (`Value::Bool(false)` never appears there) from an explicit null.
fn absent() -> Value {
    Value::Bool(false)
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
                d_ff: j.n_inner,
                max_position: j.n_positions,
                norm_eps: j.layer_norm_epsilon,
                rope_theta: default_rope_theta(),
                tie_embeddings: Some(j.tie_word_embeddings.unwrap_or(true)),
                ..Default::default()
            },
            &j.common,
        ))
    }
}

impl LlamaLayoutJson {
    fn into_config(self, family: Family) -> std::result::Result<ModelConfig, Unsupported> {
        let j = self;
        if j.mlp_bias == Some(true) && family != Family::Llama {
            return Err(Unsupported("mlp_bias", "only Llama has MLP biases".into()));
        }
        let act = j.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(Unsupported(
                "hidden_act",
                format!("`{act}` not supported (temper implements silu)"),
            ));
        }
        if j.use_sliding_window == Some(true) {
            return Err(Unsupported(
                "use_sliding_window",
                "Qwen's per-layer sliding window is not supported (must be false)".into(),
            ));
        }
        if let Some(types) = &j.layer_types {
            if let Some(other) = types.iter().find(|t| *t != "full_attention") {
                return Err(Unsupported(
                    "layer_types",
                    format!("`{other}` layers not supported (temper implements full_attention)"),
                ));
            }
        }
        let sliding_window = match (family, &j.sliding_window) {
            // transformers' MistralConfig default when the key is missing.
            (Family::Mistral, Value::Bool(false)) => Some(4096),
            (Family::Mistral, Value::Null) => None,
            (Family::Mistral, v) => Some(v.as_i64().filter(|w| *w > 0).ok_or_else(|| {
                Unsupported(
                    "sliding_window",
                    format!("must be a positive integer or null, got {v}"),
                )
            })?),
            _ => None,
        };
        let attention_bias = match family {
            Family::Llama | Family::Qwen3 => j.attention_bias.unwrap_or(false),
            // Mistral has none; Qwen2's q/k/v biases come with the family.
            Family::Mistral | Family::Qwen2 => false,
        };
        let head_dim = j
            .head_dim
            .filter(|hd| hd * j.num_attention_heads != j.hidden_size);
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
                family,
                head_dim,
                attention_bias,
                mlp_bias: j.mlp_bias.unwrap_or(false),
                sliding_window,
                rope_scaling: rope_scaling(j.rope_scaling.as_ref())?,
                ..Default::default()
            },
            &j.common,
        ))
    }
}

/// transformers' `rope_scaling`: null, `default`, `linear` or `llama3` (keyed `rope_type`, or
/// `type` in older files).
fn rope_scaling(v: Option<&Value>) -> std::result::Result<Option<RopeScaling>, Unsupported> {
    let Some(obj) = v.and_then(Value::as_object) else {
        return match v {
            None | Some(Value::Null) => Ok(None),
            Some(other) => Err(Unsupported(
                "rope_scaling",
                format!("expected an object, got {other}"),
            )),
        };
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &'static str| {
        obj.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| Unsupported("rope_scaling", format!("`{kind}` needs a number `{key}`")))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as i64,
        }),
        other => {
            return Err(Unsupported(
                "rope_scaling",
                format!("rope_type `{other}` not supported (temper implements linear and llama3)"),
            ))
        }
    })
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
        "llama" | "mistral" | "qwen2" | "qwen3" => {
            let family = match model_type.as_str() {
                "mistral" => Family::Mistral,
                "qwen2" => Family::Qwen2,
                "qwen3" => Family::Qwen3,
                _ => Family::Llama,
            };
            serde_json::from_value::<LlamaLayoutJson>(value)
                .map_err(typed)?
                .into_config(family)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_like(model_type: &str, extra: Value) -> Value {
        let mut v = json!({
            "model_type": model_type, "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn parse(v: Value) -> Result<ModelConfig> {
        from_value(v, Path::new("config.json"))
    }

    fn complaint(v: Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn every_family_survives_its_own_config_json() {
        for (family, extra) in [
            (
                "llama",
                json!({"attention_bias": true, "mlp_bias": true,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
            ),
            ("mistral", json!({"sliding_window": 16, "head_dim": 16})),
            (
                "qwen2",
                json!({"use_sliding_window": false, "tie_word_embeddings": true}),
            ),
            (
                "qwen3",
                json!({"head_dim": 16, "layer_types": ["full_attention", "full_attention"]}),
            ),
        ] {
            let cfg = parse(llama_like(family, extra)).unwrap();
            assert_eq!(cfg.family.model_type(), family);
            let again = parse(cfg.to_hf_json()).unwrap();
            assert_eq!(cfg, again, "{family}: config.json round trip");
        }
    }

    #[test]
    fn family_switches_follow_transformers() {
        let qwen2 = parse(llama_like("qwen2", json!({}))).unwrap();
        assert!(qwen2.qkv_bias() && !qwen2.out_bias() && !qwen2.qk_norm());
        let qwen3 = parse(llama_like("qwen3", json!({"head_dim": 16}))).unwrap();
        assert!(qwen3.qk_norm() && !qwen3.qkv_bias());
        assert_eq!((qwen3.head_dim(), qwen3.attn_dim()), (16, 64));
        let biased = parse(llama_like("llama", json!({"attention_bias": true}))).unwrap();
        assert!(biased.qkv_bias() && biased.out_bias());
        // MistralConfig's default window when the key is missing; null turns it off.
        let mistral = parse(llama_like("mistral", json!({}))).unwrap();
        assert_eq!(mistral.sliding_window, Some(4096));
        let unwindowed = parse(llama_like("mistral", json!({"sliding_window": null}))).unwrap();
        assert_eq!(unwindowed.sliding_window, None);
        let older = json!({"rope_scaling": {"type": "linear", "factor": 2.0}});
        let linear = parse(llama_like("llama", older)).unwrap();
        assert_eq!(
            linear.rope_scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
    }

    #[test]
    fn what_temper_does_not_implement_is_named() {
        let msg = complaint(llama_like("phi3", json!({})));
        assert!(
            msg.contains("`phi3` not supported")
                && msg.contains("gpt2, llama, mistral, qwen2, qwen3"),
            "{msg}"
        );
        let msg = complaint(llama_like("qwen2", json!({"use_sliding_window": true})));
        assert!(msg.contains("use_sliding_window"), "{msg}");
        let yarn = json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}});
        let msg = complaint(llama_like("qwen3", yarn));
        assert!(msg.contains("rope_type `yarn` not supported"), "{msg}");
        let msg = complaint(llama_like("mistral", json!({"sliding_window": 0})));
        assert!(msg.contains("sliding_window"), "{msg}");
        let msg = complaint(llama_like("qwen2", json!({"mlp_bias": true})));
        assert!(msg.contains("mlp_bias"), "{msg}");
        let msg = complaint(llama_like("llama", json!({"hidden_act": "gelu"})));
        assert!(msg.contains("hidden_act") && msg.contains("gelu"), "{msg}");
    }
}
