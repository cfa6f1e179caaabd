//! Model shape, and its mapping to and from Hugging Face `config.json` (GPT2LMHeadModel and
//! LlamaForCausalLM). Options the core does not implement (rope scaling, biased Llama
//! projections, other activations) are rejected by name rather than silently ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{CoreError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Learned positions, LayerNorm, GELU-tanh MLP, fused `c_attn` (Conv1D layout), tied head.
    Gpt2,
    /// RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, untied head by default.
    Llama,
}

/// The shape of a model. In stage configs it is written under `model:`; missing optional
/// fields take the family's usual values (see the accessor methods).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub n_layer: i64,
    pub n_head: i64,
    pub d_model: i64,
    /// Key/value heads for grouped-query attention (Llama); defaults to `n_head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<i64>,
    /// MLP width; defaults to 4·d_model (GPT-2) or the Llama rule 2/3·4·d rounded up to 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_ff: Option<i64>,
    pub max_position: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Share the input embedding with the LM head; defaults to true for GPT-2, false for Llama.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// How the scalar head's per-token outputs become one score (reward models, critics).
    #[serde(default, skip_serializing_if = "ScorePooling::is_last_token")]
    pub score_pooling: ScorePooling,
}

/// How a reward model turns its scalar head's per-token outputs into one score per sequence.
/// Saved in `config.json` as `temper_score_pooling` (omitted for the default), so PPO and
/// evaluation read a reward model the way it was trained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorePooling {
    /// The output at the last real token (the reply's EOS when there is one), as transformers'
    /// `*ForSequenceClassification` reads it.
    #[default]
    LastToken,
    /// The mean output over the response's tokens (EOS included). Every response token then
    /// carries gradient, which lets a small model learn a preference that depends on the prompt
    /// (see the README's demo notes). transformers' classification heads do not implement it:
    /// loaded there, such a model reads the last token instead.
    ResponseMean,
}

impl ScorePooling {
    pub fn is_last_token(&self) -> bool {
        *self == ScorePooling::LastToken
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}

impl ModelConfig {
    pub fn n_kv_head(&self) -> i64 {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_head
    }

    pub fn d_ff(&self) -> i64 {
        self.d_ff.unwrap_or(match self.arch {
            Arch::Gpt2 => 4 * self.d_model,
            Arch::Llama => (8 * self.d_model / 3 + 63) / 64 * 64,
        })
    }

    pub fn norm_eps(&self) -> f64 {
        self.norm_eps.unwrap_or(match self.arch {
            Arch::Gpt2 => 1e-5,
            Arch::Llama => 1e-6,
        })
    }

    pub fn tie_embeddings(&self) -> bool {
        self.tie_embeddings.unwrap_or(self.arch == Arch::Gpt2)
    }

    /// Checks the invariants the model code relies on, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(CoreError::InvalidModel(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("d_model", self.d_model),
            ("max_position", self.max_position),
            ("n_kv_head", self.n_kv_head()),
            ("d_ff", self.d_ff()),
        ] {
            if v <= 0 {
                return bad(format!("{name} must be positive, got {v}"));
            }
        }
        if self.d_model % self.n_head != 0 {
            return bad(format!(
                "d_model ({}) must be divisible by n_head ({})",
                self.d_model, self.n_head
            ));
        }
        if self.n_head % self.n_kv_head() != 0 {
            return bad(format!(
                "n_head ({}) must be a multiple of n_kv_head ({})",
                self.n_head,
                self.n_kv_head()
            ));
        }
        if self.arch == Arch::Gpt2 && self.n_kv_head() != self.n_head {
            return bad("gpt2 has no grouped-query attention: drop n_kv_head".into());
        }
        if self.arch == Arch::Llama && self.head_dim() % 2 != 0 {
            return bad(format!(
                "RoPE needs an even head dimension, got {}",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// The Hugging Face `config.json` for this model, loadable by `AutoModelForCausalLM`.
    pub fn to_hf_json(&self) -> Value {
        let mut v = match self.arch {
            Arch::Gpt2 => json!({
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": self.vocab_size,
                "n_positions": self.max_position,
                "n_embd": self.d_model,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_inner": self.d_ff(),
                "activation_function": "gelu_new",
                "layer_norm_epsilon": self.norm_eps(),
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": self.tie_embeddings(),
            }),
            Arch::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position,
                "hidden_size": self.d_model,
                "intermediate_size": self.d_ff(),
                "num_hidden_layers": self.n_layer,
                "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head(),
                "head_dim": self.head_dim(),
                "hidden_act": "silu",
                "rms_norm_eps": self.norm_eps(),
                "rope_theta": self.rope_theta,
                "attention_bias": false,
                "mlp_bias": false,
                "tie_word_embeddings": self.tie_embeddings(),
            }),
        };
        let obj = v.as_object_mut().expect("json! object literal");
        obj.insert("torch_dtype".into(), json!("float32"));
        if !self.score_pooling.is_last_token() {
            obj.insert("temper_score_pooling".into(), json!(self.score_pooling));
        }
        for (key, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                obj.insert(key.into(), json!(id));
            }
        }
        v
    }

    /// Reads a Hugging Face `config.json` (GPT-2 or Llama).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.into(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| CoreError::Json {
            path: path.into(),
            source,
        })?;
        let obj = value
            .as_object()
            .ok_or_else(|| field_err(path, "(root)", "not an object"))?;
        HfFields { path, obj }.parse()
    }
}

fn field_err(path: &Path, field: &str, message: &str) -> CoreError {
    CoreError::Config {
        path: path.into(),
        field: field.into(),
        message: message.into(),
    }
}

/// Typed access to the fields of one parsed `config.json`, with errors naming the field.
struct HfFields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl HfFields<'_> {
    fn int(&self, key: &str) -> Result<i64> {
        self.opt_int(key)?
            .ok_or_else(|| field_err(self.path, key, "missing"))
    }

    fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| field_err(self.path, key, "expected an integer")),
        }
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| field_err(self.path, key, "expected a number")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| field_err(self.path, key, "expected true or false")),
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.obj.get(key).and_then(Value::as_str)
    }

    /// `eos_token_id` may be a list in newer configs; we take the first.
    fn token_id(&self, key: &str) -> Result<Option<i64>> {
        match self.obj.get(key) {
            Some(Value::Array(ids)) => Ok(ids.first().and_then(Value::as_i64)),
            _ => self.opt_int(key),
        }
    }

    fn reject_if_true(&self, key: &str) -> Result<()> {
        if self.opt_bool(key)? == Some(true) {
            return Err(field_err(
                self.path,
                key,
                "not supported by temper (must be false)",
            ));
        }
        Ok(())
    }

    fn parse(&self) -> Result<ModelConfig> {
        let model_type = self
            .str("model_type")
            .ok_or_else(|| field_err(self.path, "model_type", "missing"))?;
        let mut cfg = match model_type {
            "gpt2" => {
                let act = self.str("activation_function").unwrap_or("gelu_new");
                if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
                    return Err(field_err(
                        self.path,
                        "activation_function",
                        &format!("`{act}` not supported (temper implements gelu_new)"),
                    ));
                }
                self.reject_if_true("scale_attn_by_inverse_layer_idx")?;
                self.reject_if_true("reorder_and_upcast_attn")?;
                if self.opt_bool("scale_attn_weights")? == Some(false) {
                    return Err(field_err(self.path, "scale_attn_weights", "must be true"));
                }
                ModelConfig {
                    arch: Arch::Gpt2,
                    vocab_size: self.int("vocab_size")?,
                    n_layer: self.int("n_layer")?,
                    n_head: self.int("n_head")?,
                    d_model: self.int("n_embd")?,
                    n_kv_head: None,
                    d_ff: self.opt_int("n_inner")?,
                    max_position: self.int("n_positions")?,
                    norm_eps: self.opt_float("layer_norm_epsilon")?,
                    rope_theta: default_rope_theta(),
                    tie_embeddings: Some(self.opt_bool("tie_word_embeddings")?.unwrap_or(true)),
                    bos_token_id: None,
                    eos_token_id: None,
                    pad_token_id: None,
                    score_pooling: ScorePooling::LastToken,
                }
            }
            "llama" => {
                if !matches!(self.obj.get("rope_scaling"), None | Some(Value::Null)) {
                    return Err(field_err(
                        self.path,
                        "rope_scaling",
                        "not supported by temper",
                    ));
                }
                self.reject_if_true("attention_bias")?;
                self.reject_if_true("mlp_bias")?;
                let act = self.str("hidden_act").unwrap_or("silu");
                if act != "silu" {
                    return Err(field_err(
                        self.path,
                        "hidden_act",
                        &format!("`{act}` not supported (temper implements silu)"),
                    ));
                }
                let d_model = self.int("hidden_size")?;
                let n_head = self.int("num_attention_heads")?;
                if let Some(hd) = self.opt_int("head_dim")? {
                    if hd * n_head != d_model {
                        return Err(field_err(
                            self.path,
                            "head_dim",
                            "must equal hidden_size / num_attention_heads",
                        ));
                    }
                }
                ModelConfig {
                    arch: Arch::Llama,
                    vocab_size: self.int("vocab_size")?,
                    n_layer: self.int("num_hidden_layers")?,
                    n_head,
                    d_model,
                    n_kv_head: self.opt_int("num_key_value_heads")?,
                    d_ff: Some(self.int("intermediate_size")?),
                    max_position: self.int("max_position_embeddings")?,
                    norm_eps: self.opt_float("rms_norm_eps")?,
                    rope_theta: self
                        .opt_float("rope_theta")?
                        .unwrap_or(default_rope_theta()),
                    tie_embeddings: Some(self.opt_bool("tie_word_embeddings")?.unwrap_or(false)),
                    bos_token_id: None,
                    eos_token_id: None,
                    pad_token_id: None,
                    score_pooling: ScorePooling::LastToken,
                }
            }
            other => {
                return Err(field_err(
                    self.path,
                    "model_type",
                    &format!("`{other}` not supported: temper loads gpt2 and llama"),
                ))
            }
        };
        cfg.bos_token_id = self.token_id("bos_token_id")?;
        cfg.eos_token_id = self.token_id("eos_token_id")?;
        cfg.pad_token_id = self.token_id("pad_token_id")?;
        cfg.score_pooling = match self.obj.get("temper_score_pooling") {
            None | Some(Value::Null) => ScorePooling::LastToken,
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                field_err(
                    self.path,
                    "temper_score_pooling",
                    &format!("{v} is not \"last_token\" or \"response_mean\""),
                )
            })?,
        };
        cfg.validate()
            .map_err(|e| field_err(self.path, "(shape)", &e.to_string()))?;
        Ok(cfg)
    }
}
