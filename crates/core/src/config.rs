//! Model shape, and its mapping to and from Hugging Face `config.json`: GPT-2, and the
//! Llama-layout families (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) as one transformer with
//! switches. Options the core does not implement are rejected by name (see [`crate::hf_config`])
//! rather than silently ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{CoreError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[default]
    /// Learned positions, LayerNorm, GELU-tanh MLP, fused `c_attn` (Conv1D layout), tied head.
    Gpt2,
    /// RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, untied head by default.
    Llama,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        }
    }
}

/// Which Hugging Face family a Llama-layout model is: it decides the `model_type` written, the
/// attention biases (Qwen2 has them on q/k/v) and the per-head q/k RMSNorm (Qwen3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    pub fn is_llama(&self) -> bool {
        *self == Family::Llama
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// transformers' class prefix (`Qwen2` in `Qwen2ForCausalLM`).
    pub fn class_prefix(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Mistral => "Mistral",
            Family::Qwen2 => "Qwen2",
            Family::Qwen3 => "Qwen3",
        }
    }
}

/// RoPE frequency scaling for contexts longer than the model was pretrained on, as
/// transformers' `rope_scaling` (`rope_type` linear or llama3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
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
    /// A reward model's score multiplied by a sign read from each prompt's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_sign: Option<ScoreSign>,
    /// The Llama-layout family (Llama when absent).
    #[serde(default, skip_serializing_if = "Family::is_llama")]
    pub family: Family,
    /// Per-head width when it is not d_model / n_head (Qwen3, some Mistrals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// transformers' `attention_bias` (Llama, Qwen3): biases on q/k/v and the output projection.
    /// Qwen2 always has q/k/v biases and no output bias, whatever this says.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attention_bias: bool,
    /// Biases on the MLP's projections (Llama's `mlp_bias`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub mlp_bias: bool,
    /// Mistral's sliding-window attention: a token sees itself and the `sliding_window - 1`
    /// tokens before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An empty GPT-2 shape for struct update syntax (`ModelConfig { arch, n_layer, …,
/// ..Default::default() }`): every optional field unset and every switch off. Its zero sizes
/// fail [`ModelConfig::validate`], so it is never a model by itself.
impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Gpt2,
            vocab_size: 0,
            n_layer: 0,
            n_head: 0,
            d_model: 0,
            n_kv_head: None,
            d_ff: None,
            max_position: 0,
            norm_eps: None,
            rope_theta: default_rope_theta(),
            tie_embeddings: None,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            score_pooling: ScorePooling::LastToken,
            score_sign: None,
            family: Family::Llama,
            head_dim: None,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            rope_scaling: None,
        }
    }
}

pub use temper_rewards::ScoreSign;

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
    /// (see docs/results.md on the demo). transformers' classification heads do not implement it:
    /// loaded there, such a model reads the last token instead.
    ResponseMean,
}

impl ScorePooling {
    pub fn is_last_token(&self) -> bool {
        *self == ScorePooling::LastToken
    }
}

pub(crate) fn default_rope_theta() -> f64 {
    10_000.0
}

impl ModelConfig {
    pub fn n_kv_head(&self) -> i64 {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.d_model / self.n_head)
    }

    /// Width of the concatenated heads: the query projection's output, the output
    /// projection's input (d_model unless `head_dim` says otherwise).
    pub fn attn_dim(&self) -> i64 {
        self.n_head * self.head_dim()
    }

    /// Biases on the query, key and value projections.
    pub fn qkv_bias(&self) -> bool {
        self.arch == Arch::Gpt2 || self.family == Family::Qwen2 || self.attention_bias
    }

    /// A bias on the attention's output projection.
    pub fn out_bias(&self) -> bool {
        self.arch == Arch::Gpt2 || (self.family != Family::Qwen2 && self.attention_bias)
    }

    /// Qwen3's RMSNorm over each query and key head before RoPE.
    pub fn qk_norm(&self) -> bool {
        self.family == Family::Qwen3
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
        if self.head_dim.is_none() && self.d_model % self.n_head != 0 {
            return bad(format!(
                "d_model ({}) must be divisible by n_head ({})",
                self.d_model, self.n_head
            ));
        }
        if self.arch == Arch::Gpt2
            && (self.family != Family::Llama
                || self.head_dim.is_some()
                || self.attention_bias
                || self.mlp_bias
                || self.sliding_window.is_some()
                || self.rope_scaling.is_some())
        {
            return bad(
                "family, head_dim, attention_bias, mlp_bias, sliding_window and rope_scaling \
                 apply to the llama layout only"
                    .into(),
            );
        }
        if let Some(w) = self.sliding_window {
            if w <= 0 {
                return bad(format!("sliding_window must be positive, got {w}"));
            }
        }
        if let Some(hd) = self.head_dim {
            if hd <= 0 {
                return bad(format!("head_dim must be positive, got {hd}"));
            }
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
            Arch::Llama => self.llama_layout_json(),
        };
        let obj = v.as_object_mut().expect("json! object literal");
        obj.insert("torch_dtype".into(), json!("float32"));
        if !self.score_pooling.is_last_token() {
            obj.insert("temper_score_pooling".into(), json!(self.score_pooling));
        }
        if let Some(sign) = &self.score_sign {
            obj.insert("temper_score_sign".into(), json!(sign));
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

    /// `config.json` of the Llama-layout families: the fields every one shares, then each
    /// family's own (transformers rejects nothing extra, but writing only what the family
    /// defines keeps the file the one its own code would save).
    fn llama_layout_json(&self) -> Value {
        let family = self.family;
        let mut v = json!({
            "architectures": [format!("{}ForCausalLM", family.class_prefix())],
            "model_type": family.model_type(),
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
            "tie_word_embeddings": self.tie_embeddings(),
        });
        let obj = v.as_object_mut().expect("json! object literal");
        if let Some(scaling) = &self.rope_scaling {
            obj.insert("rope_scaling".into(), json!(scaling));
        }
        match family {
            Family::Llama => {
                obj.insert("attention_bias".into(), json!(self.attention_bias));
                obj.insert("mlp_bias".into(), json!(self.mlp_bias));
            }
            Family::Mistral => {
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Family::Qwen2 | Family::Qwen3 => {
                if family == Family::Qwen3 {
                    obj.insert("attention_bias".into(), json!(self.attention_bias));
                }
                obj.insert("use_sliding_window".into(), json!(false));
                obj.insert("sliding_window".into(), Value::Null);
                obj.insert("max_window_layers".into(), json!(self.n_layer));
                obj.insert(
                    "layer_types".into(),
                    json!(vec!["full_attention"; self.n_layer as usize]),
                );
            }
        }
        v
    }

    /// Reads a Hugging Face `config.json` (see [`crate::hf_config`] for the families).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        crate::hf_config::read(path)
    }

    /// Parameters of the backbone and heads described here (an LM head counted when untied).
    pub fn param_count(&self) -> i64 {
        let (c, v, l) = (self.d_model, self.vocab_size, self.n_layer);
        let kv = self.n_kv_head() * self.head_dim();
        let f = self.d_ff();
        let per_layer = match self.arch {
            // c_attn (C×3C + 3C), c_proj (C×C + C), the MLP's c_fc and c_proj, two LayerNorms.
            Arch::Gpt2 => 3 * c * c + 3 * c + c * c + c + 2 * c * f + f + c + 4 * c,
            Arch::Llama => {
                let a = self.attn_dim();
                let bias = |on: bool, n: i64| if on { n } else { 0 };
                2 * c * a
                    + 2 * c * kv
                    + 3 * c * f
                    + 2 * c
                    + bias(self.qkv_bias(), a + 2 * kv)
                    + bias(self.out_bias(), c)
                    + bias(self.mlp_bias, 2 * f + c)
                    + bias(self.qk_norm(), 2 * self.head_dim())
            }
        };
        let positions = if self.arch == Arch::Gpt2 {
            self.max_position * c
        } else {
            0
        };
        let head = if self.tie_embeddings() { 0 } else { v * c };
        v * c + positions + l * per_layer + 2 * c + head
    }

    /// A rough upper bound on the bytes fp32 training of `batch` × `seq` tokens needs: weights,
    /// gradients and two AdamW moments, the activations kept for backward (attention scores
    /// included, as the CPU's math attention materialises them) and the logits. Used to refuse
    /// absurd sizes up front, not to plan memory.
    pub fn training_bytes(&self, batch: i64, seq: i64) -> f64 {
        let (b, t) = (batch as f64, seq as f64);
        let (c, l) = (self.d_model as f64, self.n_layer as f64);
        let weights = 16.0 * self.param_count() as f64;
        let per_layer =
            b * t * (12.0 * c + 2.0 * self.d_ff() as f64) + 2.0 * b * self.n_head as f64 * t * t;
        let logits = 3.0 * b * t * self.vocab_size as f64;
        weights + 4.0 * (l * per_layer + logits)
    }
}

/// The `model:` section of a from-scratch config: a model shape whose tokenizer-decided fields
/// (vocabulary size, EOS and pad ids) may be left out and are filled in from the tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub arch: Arch,
    pub n_layer: i64,
    pub n_head: i64,
    pub d_model: i64,
    pub max_position: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_ff: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
}

impl ModelShape {
    /// The shape's own consistency (positive sizes, heads that divide the width, keys of the
    /// right layout), before the tokenizer that sets the vocabulary exists.
    pub fn check(&self) -> Result<()> {
        self.resolve(1, 0, 0).map(|_| ())
    }

    /// The full model config, with what the tokenizer decides filled in.
    pub fn resolve(&self, tokenizer_vocab: usize, eos: u32, pad: u32) -> Result<ModelConfig> {
        let vocab_size = self.vocab_size.unwrap_or(tokenizer_vocab as i64);
        if vocab_size < tokenizer_vocab as i64 {
            return Err(CoreError::InvalidModel(format!(
                "vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_vocab}"
            )));
        }
        let cfg = ModelConfig {
            arch: self.arch,
            vocab_size,
            n_layer: self.n_layer,
            n_head: self.n_head,
            d_model: self.d_model,
            n_kv_head: self.n_kv_head,
            d_ff: self.d_ff,
            max_position: self.max_position,
            norm_eps: self.norm_eps,
            rope_theta: self.rope_theta.unwrap_or_else(default_rope_theta),
            tie_embeddings: self.tie_embeddings,
            eos_token_id: Some(eos as i64),
            pad_token_id: Some(pad as i64),
            ..Default::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
