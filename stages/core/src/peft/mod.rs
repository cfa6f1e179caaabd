//! Parameter-efficient fine-tuning: the `peft:` block every training stage accepts.
//!
//! - `lora` (with `rslora`, `dora`): adapters on the named dense layers, saved in Hugging Face
//!   PEFT's format (`adapter_config.json`, `adapter_model.safetensors`) so `peft` loads them;
//! - `qlora`: the same adapters over a base whose dense layers are held in 4-bit NormalFloat
//!   with double-quantised block maxima ([`nf4`]), dequantised in the forward pass;
//! - `prompt`: prompt tuning, learned virtual tokens before every input ([`prompt`]);
//! - `ptuning`: P-tuning, the virtual tokens produced by a prompt encoder ([`ptuning`]);
//! - `prefix`: prefix tuning / P-tuning v2, learned keys and values in every layer ([`prefix`]);
//! - `adapter`: bottleneck adapters after attention and MLP, with AdapterDrop ([`bottleneck`]);
//! - `freeze`: train only the parameters matching `trainable` patterns and/or the top
//!   `top_layers` blocks; `head`: train only the scalar head over a frozen backbone. Both
//!   change base weights, so they save full checkpoints.
//!
//! [`apply`] freezes the base and attaches what the method asks for; the stage then optimises
//! [`Tuning::stores`] and saves through [`Tuning::save_final`].

mod bottleneck;
pub(crate) mod files;
mod lora;
mod nf4;
mod prefix;
mod prompt;
mod ptuning;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

pub use bottleneck::{Activation, Adapter, Bottleneck, BottleneckConfig};
pub use files::{is_adapter, load_adapter, merge_adapters, read_adapter_config, AdapterConfig};
pub use lora::{Lora, Switch};
pub use nf4::{dynamic_map, Absmax, Nf4Weight, NF4_LEVELS};
pub use prefix::{kv_width, Prefix, PrefixConfig};
pub use prompt::{
    init_from_text, init_prompt_text, is_prompt_adapter, virtual_tokens_of, PromptConfig,
    VirtualPrompt,
};
pub use ptuning::{EncoderKind, PtuningConfig};

use crate::model::Transformer;
use crate::optim::{AdamW, AdamWConfig};

/// Parsed through [`PeftSpec`], a flat mapping, so an unknown or misplaced key is reported at
/// its line (serde loses positions inside internally tagged enums).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", try_from = "PeftSpec")]
pub enum PeftConfig {
    Lora(LoraConfig),
    /// LoRA over an NF4-quantised frozen base.
    Qlora(LoraConfig),
    /// Prompt tuning: learned virtual tokens before every input.
    Prompt(PromptConfig),
    /// Prefix tuning / P-tuning v2: learned keys and values in every layer.
    Prefix(PrefixConfig),
    /// P-tuning: virtual tokens produced by a prompt encoder (MLP or LSTM) while training.
    Ptuning(PtuningConfig),
    /// Bottleneck adapters after attention and MLP (Houlsby), with AdapterDrop.
    Adapter(BottleneckConfig),
    Freeze(FreezeConfig),
    /// Feature-based training: the backbone frozen, only the scalar head (reward model,
    /// critic) or an untied LM head trained.
    Head,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias trained (PEFT's default).
    #[default]
    None,
    /// Every bias of the model trained and saved with the adapter.
    All,
    /// The biases of the adapted layers.
    LoraOnly,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// A ~ Kaiming-uniform (bound 1/√in), B = 0: the adapter starts as the identity.
    #[default]
    Default,
    /// A ~ N(0, 1/r), B = 0.
    Gaussian,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank.
    pub r: i64,
    /// Scale numerator: updates are scaled by alpha/r (alpha/√r with rslora). Default 2r.
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub dropout: f64,
    /// Hugging Face module names (`c_attn`, `q_proj`…), matched as PEFT does: the module's
    /// name or the end of its path. Default: every dense layer of the blocks.
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// Only these blocks (0-based); default all.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    #[serde(default)]
    pub bias: LoraBias,
    #[serde(default)]
    pub rslora: bool,
    #[serde(default)]
    pub dora: bool,
    #[serde(default)]
    pub init: LoraInit,
    /// QLoRA only: quantise the NF4 block maxima to 8 bits too (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub double_quant: Option<bool>,
}

impl PeftConfig {
    /// The adapter settings of `lora` and `qlora`.
    pub fn lora(&self) -> Option<&LoraConfig> {
        match self {
            PeftConfig::Lora(c) | PeftConfig::Qlora(c) => Some(c),
            _ => None,
        }
    }
}

impl LoraConfig {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.r as f64)
    }

    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha() / (self.r as f64).sqrt()
        } else {
            self.alpha() / self.r as f64
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    /// Parameter-name patterns to train (`*` matches any run of characters), e.g.
    /// `["*.ln_*", "transformer.h.3.*"]`.
    #[serde(default)]
    pub trainable: Vec<String>,
    /// Train the top k blocks (and the final norm).
    #[serde(default)]
    pub top_layers: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Method {
    Lora,
    Qlora,
    Prompt,
    Prefix,
    Ptuning,
    Adapter,
    Freeze,
    Head,
}

/// The `peft:` block as written: every method's keys, checked against the method.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeftSpec {
    method: Method,
    r: Option<i64>,
    alpha: Option<f64>,
    dropout: Option<f64>,
    target_modules: Option<Vec<String>>,
    layers: Option<Vec<usize>>,
    bias: Option<LoraBias>,
    rslora: Option<bool>,
    dora: Option<bool>,
    init: Option<LoraInit>,
    double_quant: Option<bool>,
    trainable: Option<Vec<String>>,
    top_layers: Option<usize>,
    num_virtual_tokens: Option<i64>,
    init_text: Option<String>,
    projection: Option<bool>,
    encoder_hidden_size: Option<i64>,
    encoder: Option<EncoderKind>,
    reduction: Option<i64>,
    activation: Option<Activation>,
    drop_layers: Option<usize>,
}

impl TryFrom<PeftSpec> for PeftConfig {
    type Error = String;

    fn try_from(s: PeftSpec) -> Result<Self, String> {
        let lora_keys = [
            ("r", s.r.is_some()),
            ("alpha", s.alpha.is_some()),
            ("dropout", s.dropout.is_some()),
            ("target_modules", s.target_modules.is_some()),
            ("layers", s.layers.is_some()),
            ("bias", s.bias.is_some()),
            ("rslora", s.rslora.is_some()),
            ("dora", s.dora.is_some()),
            ("init", s.init.is_some()),
            ("double_quant", s.double_quant.is_some()),
        ];
        let freeze_keys = [
            ("trainable", s.trainable.is_some()),
            ("top_layers", s.top_layers.is_some()),
        ];
        let prompt_keys = [
            ("num_virtual_tokens", s.num_virtual_tokens.is_some()),
            ("init_text", s.init_text.is_some()),
        ];
        let prefix_keys = [
            ("projection", s.projection.is_some()),
            ("encoder_hidden_size", s.encoder_hidden_size.is_some()),
        ];
        let ptuning_keys = [("encoder", s.encoder.is_some())];
        let adapter_keys = [
            ("reduction", s.reduction.is_some()),
            ("activation", s.activation.is_some()),
            ("drop_layers", s.drop_layers.is_some()),
        ];
        // Keys of one method given to another: the first one named.
        if s.method != Method::Adapter {
            if let Some((k, _)) = adapter_keys.iter().find(|(_, set)| *set) {
                return Err(format!("`{k}` belongs to method adapter"));
            }
        }
        let misplaced = |keys: &[(&str, bool)], owner: &str, method: &str| {
            keys.iter()
                .find(|(_, set)| *set)
                .map(|(k, _)| format!("`{k}` belongs to method {owner}, not {method}"))
        };
        match s.method {
            Method::Lora | Method::Qlora => {
                let method = if s.method == Method::Lora {
                    "lora"
                } else {
                    "qlora"
                };
                if let Some(e) = misplaced(&freeze_keys, "freeze", method)
                    .or_else(|| misplaced(&prompt_keys, "prompt", method))
                    .or_else(|| misplaced(&prefix_keys, "prefix", method))
                    .or_else(|| misplaced(&ptuning_keys, "ptuning", method))
                {
                    return Err(e);
                }
                if s.method == Method::Lora && s.double_quant.is_some() {
                    return Err("`double_quant` belongs to method qlora, not lora".into());
                }
                let c = LoraConfig {
                    r: s.r.ok_or(format!("method {method} needs a rank `r`"))?,
                    alpha: s.alpha,
                    dropout: s.dropout.unwrap_or(0.0),
                    target_modules: s.target_modules,
                    layers: s.layers,
                    bias: s.bias.unwrap_or_default(),
                    rslora: s.rslora.unwrap_or(false),
                    dora: s.dora.unwrap_or(false),
                    init: s.init.unwrap_or_default(),
                    double_quant: s.double_quant,
                };
                Ok(if s.method == Method::Lora {
                    PeftConfig::Lora(c)
                } else {
                    PeftConfig::Qlora(c)
                })
            }
            Method::Prompt => {
                if let Some(e) = misplaced(&lora_keys, "lora", "prompt")
                    .or_else(|| misplaced(&freeze_keys, "freeze", "prompt"))
                    .or_else(|| misplaced(&prefix_keys, "prefix", "prompt"))
                    .or_else(|| misplaced(&ptuning_keys, "ptuning", "prompt"))
                {
                    return Err(e);
                }
                Ok(PeftConfig::Prompt(PromptConfig {
                    num_virtual_tokens: s
                        .num_virtual_tokens
                        .ok_or("method prompt needs `num_virtual_tokens`")?,
                    init_text: s.init_text,
                }))
            }
            Method::Prefix => {
                if let Some(e) = misplaced(&lora_keys, "lora", "prefix")
                    .or_else(|| misplaced(&freeze_keys, "freeze", "prefix"))
                    .or_else(|| misplaced(&prompt_keys[1..], "prompt", "prefix"))
                    .or_else(|| misplaced(&ptuning_keys, "ptuning", "prefix"))
                {
                    return Err(e);
                }
                Ok(PeftConfig::Prefix(PrefixConfig {
                    num_virtual_tokens: s
                        .num_virtual_tokens
                        .ok_or("method prefix needs `num_virtual_tokens`")?,
                    projection: s.projection.unwrap_or(false),
                    encoder_hidden_size: s.encoder_hidden_size,
                }))
            }
            Method::Ptuning => {
                if let Some(e) = misplaced(&lora_keys, "lora", "ptuning")
                    .or_else(|| misplaced(&freeze_keys, "freeze", "ptuning"))
                    .or_else(|| misplaced(&prompt_keys[1..], "prompt", "ptuning"))
                    .or_else(|| misplaced(&prefix_keys[..1], "prefix", "ptuning"))
                {
                    return Err(e);
                }
                Ok(PeftConfig::Ptuning(PtuningConfig {
                    num_virtual_tokens: s
                        .num_virtual_tokens
                        .ok_or("method ptuning needs `num_virtual_tokens`")?,
                    encoder: s.encoder.unwrap_or_default(),
                    encoder_hidden_size: s.encoder_hidden_size,
                }))
            }
            Method::Adapter => {
                if let Some(e) = misplaced(&lora_keys, "lora", "adapter")
                    .or_else(|| misplaced(&freeze_keys, "freeze", "adapter"))
                    .or_else(|| misplaced(&prompt_keys, "prompt", "adapter"))
                    .or_else(|| misplaced(&prefix_keys, "prefix", "adapter"))
                    .or_else(|| misplaced(&ptuning_keys, "ptuning", "adapter"))
                {
                    return Err(e);
                }
                Ok(PeftConfig::Adapter(BottleneckConfig {
                    reduction: s.reduction.unwrap_or(16),
                    activation: s.activation.unwrap_or_default(),
                    drop_layers: s.drop_layers.unwrap_or(0),
                }))
            }
            Method::Freeze => {
                if let Some(e) = misplaced(&lora_keys, "lora", "freeze")
                    .or_else(|| misplaced(&prompt_keys, "prompt", "freeze"))
                    .or_else(|| misplaced(&prefix_keys, "prefix", "freeze"))
                    .or_else(|| misplaced(&ptuning_keys, "ptuning", "freeze"))
                {
                    return Err(e);
                }
                Ok(PeftConfig::Freeze(FreezeConfig {
                    trainable: s.trainable.unwrap_or_default(),
                    top_layers: s.top_layers,
                }))
            }
            Method::Head => {
                let all: Vec<(&str, bool)> = lora_keys
                    .iter()
                    .chain(&freeze_keys)
                    .chain(&prompt_keys)
                    .chain(&prefix_keys)
                    .chain(&ptuning_keys)
                    .copied()
                    .collect();
                match all.iter().find(|(_, set)| *set) {
                    Some((k, _)) => Err(format!("method head takes no settings (got `{k}`)")),
                    None => Ok(PeftConfig::Head),
                }
            }
        }
    }
}

/// A `peft:` problem, named by its key under `peft`.
#[derive(Debug)]
pub struct PeftError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> PeftError {
    PeftError {
        field: format!("peft.{field}"),
        message: message.into(),
    }
}

/// What a stage trains: the base model's unfrozen parameters, plus adapters in their own store.
pub struct Tuning {
    pub config: Option<PeftConfig>,
    /// LoRA parameters, named with PEFT's keys (`base_model.model.<module>.lora_A.weight`).
    pub adapters: Option<VarStore>,
    pub switch: Option<Arc<Switch>>,
    /// QLoRA: what quantising the base saved.
    pub quantized: Option<Quantized>,
}

/// The base's dense layers before and after NF4 quantisation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quantized {
    /// Parameters held in NF4 (their dense tensors are emptied in the variable store).
    pub params: i64,
    pub dense_bytes: i64,
    pub nf4_bytes: i64,
}

impl Tuning {
    /// Full fine-tuning: nothing frozen, nothing attached.
    pub fn full() -> Self {
        Self {
            config: None,
            adapters: None,
            switch: None,
            quantized: None,
        }
    }

    pub fn is_lora(&self) -> bool {
        self.adapters.is_some()
    }

    /// The variable stores a stage saves in its state and optimises, in a fixed order.
    pub fn stores<'a>(&'a self, base: &'a VarStore) -> Vec<&'a VarStore> {
        let mut v = vec![base];
        v.extend(self.adapters.as_ref());
        v
    }

    /// AdamW over every trainable parameter (frozen ones are skipped by the optimizer).
    pub fn optimizer(&self, base: &VarStore, config: AdamWConfig) -> AdamW {
        match &self.adapters {
            Some(a) => AdamW::over(&[("", base), ("adapter.", a)], config),
            None => AdamW::new(base, config),
        }
    }

    /// (trainable, total) parameter counts; quantised weights count as parameters.
    pub fn counts(&self, base: &VarStore) -> (i64, i64) {
        let (mut trainable, mut total) = (0, self.quantized.map_or(0, |q| q.params));
        for vs in self.stores(base) {
            for (_, t) in vs.variables() {
                let n = t.numel() as i64;
                total += n;
                if t.requires_grad() {
                    trainable += n;
                }
            }
        }
        (trainable, total)
    }

    /// Summary fields: trainable and total parameters and, with QLoRA, the base's dense
    /// layers in bytes before and after quantisation.
    pub fn summary_fields(&self, base: &VarStore) -> Vec<(&'static str, i64)> {
        let (trainable, total) = self.counts(base);
        let mut fields = vec![("params/trainable", trainable), ("params/total", total)];
        if let Some(q) = self.quantized {
            fields.push(("quant/base_bytes_dense", q.dense_bytes));
            fields.push(("quant/base_bytes_nf4", q.nf4_bytes));
        }
        fields
    }

    /// Dropout on while training; off for rollouts, scoring and evaluation.
    pub fn set_training(&self, on: bool) {
        if let Some(s) = &self.switch {
            s.set_training(on)
        }
    }

    /// Runs `f` with every adapter bypassed: the frozen base, i.e. the reference policy.
    pub fn without_adapters<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.switch {
            Some(s) => {
                s.set_enabled(false);
                let out = f();
                s.set_enabled(true);
                out
            }
            None => f(),
        }
    }
}

/// The frozen reference a KL or a preference loss compares the policy with.
pub enum Reference<'a> {
    /// A model of its own.
    Model(&'a Transformer),
    /// The LoRA policy itself with its adapters bypassed: no second copy in memory.
    Bypassed(&'a Transformer, &'a Tuning),
}

impl Reference<'_> {
    /// Runs `f` on the reference.
    pub fn run<T>(&self, f: impl FnOnce(&Transformer) -> T) -> T {
        match self {
            Reference::Model(m) => f(m),
            Reference::Bypassed(m, t) => t.without_adapters(|| f(m)),
        }
    }
}

/// The short names of the dense layers `target_modules` can name.
pub fn available_modules(model: &Transformer) -> Vec<String> {
    let mut names: Vec<String> = model
        .block_linears()
        .iter()
        .map(|(_, l)| l.module.rsplit('.').next().unwrap_or("").to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn matches_target(module: &str, target: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}

/// `*` as any run of characters; everything else literal.
fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

/// Freezes `vs` and attaches what `config` asks for; `None` leaves everything trainable.
pub fn apply(
    model: &mut Transformer,
    vs: &mut VarStore,
    config: Option<&PeftConfig>,
) -> Result<Tuning, PeftError> {
    if model.prompt.is_some() || model.prefix.is_some() || model.bottleneck.is_some() {
        // Loaded from a prompt adapter: virtual tokens cannot be folded into weights, so
        // whatever this stage saved would silently lose them.
        return Err(PeftError {
            field: "init".into(),
            message: "is a prompt-, prefix-tuning or bottleneck adapter, which cannot be merged into a model to train on; use it for evaluation or as a reference, or train from its base".into(),
        });
    }
    let Some(config) = config else {
        return Ok(Tuning::full());
    };
    vs.freeze();
    let mut tuning = Tuning {
        config: Some(config.clone()),
        adapters: None,
        switch: None,
        quantized: None,
    };
    match config {
        PeftConfig::Lora(c) | PeftConfig::Qlora(c) => {
            let (adapters, switch) = attach_lora(model, vs.device(), c)?;
            if let PeftConfig::Qlora(c) = config {
                tuning.quantized = Some(quantize_base(model, c.double_quant.unwrap_or(true)));
            }
            tuning.adapters = Some(adapters);
            tuning.switch = Some(switch);
            // A reward model's or critic's head is new: it trains with the adapter and is
            // saved with it (PEFT's `modules_to_save: ["score"]`).
            unfreeze(vs, |n| n.starts_with("score."));
            match c.bias {
                LoraBias::None => {}
                LoraBias::All => unfreeze(vs, |n| n.ends_with(".bias")),
                LoraBias::LoraOnly => {
                    let adapted: Vec<String> = model
                        .block_linears()
                        .iter()
                        .filter(|(_, l)| l.lora.is_some())
                        .map(|(_, l)| format!("{}.bias", l.module))
                        .collect();
                    unfreeze(vs, |n| adapted.iter().any(|a| a == n))
                }
            }
        }
        PeftConfig::Prompt(c) => {
            let (adapters, switch) = prompt::attach(model, vs.device(), c)?;
            tuning.adapters = Some(adapters);
            tuning.switch = Some(switch);
        }
        PeftConfig::Adapter(c) => {
            let (adapters, switch) = bottleneck::attach(model, vs.device(), c)?;
            tuning.adapters = Some(adapters);
            tuning.switch = Some(switch);
        }
        PeftConfig::Ptuning(c) => {
            let (adapters, switch) = prompt::attach_ptuning(model, vs.device(), c)?;
            tuning.adapters = Some(adapters);
            tuning.switch = Some(switch);
        }
        PeftConfig::Prefix(c) => {
            if model.heads.score {
                return Err(bad(
                    "method",
                    "prefix tuning trains no scalar head; for a reward model or critic use lora or head",
                ));
            }
            let (adapters, switch) = prefix::attach(model, vs.device(), c)?;
            tuning.adapters = Some(adapters);
            tuning.switch = Some(switch);
        }
        PeftConfig::Freeze(c) => {
            if c.trainable.is_empty() && c.top_layers.is_none() {
                return Err(bad(
                    "trainable",
                    "freeze needs `trainable` patterns or `top_layers`",
                ));
            }
            let n_layer = model.config.n_layer as usize;
            if let Some(k) = c.top_layers {
                if k == 0 || k > n_layer {
                    return Err(bad(
                        "top_layers",
                        format!("must be in 1..={n_layer} (the model's blocks)"),
                    ));
                }
            }
            let names: Vec<String> = vs.variables().into_keys().collect();
            for p in &c.trainable {
                if !names.iter().any(|n| glob(p, n)) {
                    return Err(bad(
                        "trainable",
                        format!(
                            "`{p}` matches no parameter (names look like `{}`)",
                            names[0]
                        ),
                    ));
                }
            }
            let top = c.top_layers.map_or(n_layer, |k| n_layer - k);
            unfreeze(vs, |n| {
                c.trainable.iter().any(|p| glob(p, n))
                    || (c.top_layers.is_some()
                        && (block_index(n).is_some_and(|i| i >= top) || is_final_norm(n)))
                    || n.starts_with("score.")
            });
        }
        PeftConfig::Head => {
            let has_score = model.heads.score;
            if !has_score && (model.config.tie_embeddings() || !model.heads.lm) {
                return Err(bad(
                    "method",
                    "head: this model's only head is the LM head tied to the embedding; train it with `freeze` patterns instead",
                ));
            }
            unfreeze(vs, |n| {
                if has_score {
                    n.starts_with("score.")
                } else {
                    n.starts_with("lm_head.")
                }
            });
        }
    }
    Ok(tuning)
}

/// Every dense layer of the blocks to NF4 (as bitsandbytes' 4-bit loading does; embeddings,
/// norms and heads stay dense).
fn quantize_base(model: &mut Transformer, double_quant: bool) -> Quantized {
    let mut q = Quantized::default();
    for (_, linear) in model.block_linears_mut() {
        q.params += linear.d_in() * linear.d_out();
        let (dense, nf4) = linear.quantize(double_quant);
        q.dense_bytes += dense;
        q.nf4_bytes += nf4;
    }
    tracing::info!(
        "QLoRA: {} base parameters in NF4{}: {:.2} MB → {:.2} MB",
        q.params,
        if double_quant {
            " (double-quantised maxima)"
        } else {
            ""
        },
        q.dense_bytes as f64 / 1e6,
        q.nf4_bytes as f64 / 1e6
    );
    q
}

/// Runs `f` with the quantised layers' dense weights back in the variable store (dequantised),
/// e.g. to write the base a QLoRA adapter was trained over; empties them again after.
pub fn with_dense_weights<T>(model: &Transformer, f: impl FnOnce() -> T) -> T {
    let quantized: Vec<_> = model
        .block_linears()
        .into_iter()
        .filter(|(_, l)| l.quant.is_some())
        .map(|(_, l)| (l.weight.shallow_clone(), l.dense_weight()))
        .collect();
    tch::no_grad(|| {
        for (w, dense) in &quantized {
            w.shallow_clone().set_data(dense);
        }
    });
    let out = f();
    tch::no_grad(|| {
        for (w, _) in &quantized {
            w.shallow_clone()
                .set_data(&tch::Tensor::empty([0], (w.kind(), w.device())));
        }
    });
    out
}

fn unfreeze(vs: &VarStore, pick: impl Fn(&str) -> bool) {
    for (name, t) in vs.variables() {
        if pick(&name) {
            let _ = t.set_requires_grad(true);
        }
    }
}

/// The block a parameter belongs to, from its Hugging Face name.
fn block_index(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "h" || p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

fn is_final_norm(name: &str) -> bool {
    name.starts_with("transformer.ln_f.") || name.starts_with("model.norm.")
}

/// Creates LoRA parameters for the targeted layers in a new store.
fn attach_lora(
    model: &mut Transformer,
    device: tch::Device,
    c: &LoraConfig,
) -> Result<(VarStore, Arc<Switch>), PeftError> {
    if c.r <= 0 {
        return Err(bad("r", "must be a positive rank"));
    }
    if !(0.0..1.0).contains(&c.dropout) {
        return Err(bad("dropout", "must be in [0, 1)"));
    }
    let available = available_modules(model);
    let targets = c
        .target_modules
        .clone()
        .unwrap_or_else(|| available.clone());
    for t in &targets {
        if !available.iter().any(|a| matches_target(a, t)) {
            return Err(bad(
                "target_modules",
                format!(
                    "`{t}` matches no layer of this {} model; available: {}",
                    model.config.arch.name(),
                    available.join(", ")
                ),
            ));
        }
    }
    let n_layer = model.config.n_layer as usize;
    if let Some(bad_layer) = c.layers.iter().flatten().find(|&&i| i >= n_layer) {
        return Err(bad(
            "layers",
            format!("block {bad_layer} does not exist (the model has {n_layer})"),
        ));
    }
    let adapters = VarStore::new(device);
    let switch = Switch::new();
    let root = adapters.root().sub("base_model").sub("model");
    for (layer, linear) in model.block_linears_mut() {
        let targeted = targets.iter().any(|t| matches_target(&linear.module, t))
            && c.layers.as_ref().is_none_or(|ls| ls.contains(&layer));
        if !targeted {
            continue;
        }
        let mut p = root.clone();
        for part in linear.module.split('.') {
            p = p.sub(part);
        }
        let (d_in, d_out) = (linear.d_in(), linear.d_out());
        let a_init = match c.init {
            LoraInit::Default => {
                let bound = 1.0 / (d_in as f64).sqrt();
                tch::nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                }
            }
            LoraInit::Gaussian => tch::nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0 / c.r as f64,
            },
        };
        let a = p.sub("lora_A").var("weight", &[c.r, d_in], a_init);
        let b = p.sub("lora_B").zeros("weight", &[d_out, c.r]);
        let magnitude = c.dora.then(|| {
            // At the start B = 0, so the magnitude is the base weight's row norms.
            let norms = tch::no_grad(|| {
                linear
                    .weight_out_in()
                    .to_kind(tch::Kind::Float)
                    .square()
                    .sum_dim_intlist(1, false, tch::Kind::Float)
                    .sqrt()
            });
            p.var_copy("lora_magnitude_vector", &norms)
        });
        linear.lora = Some(Lora {
            a,
            b,
            scale: c.scale(),
            dropout: c.dropout,
            magnitude,
            switch: switch.clone(),
        });
    }
    Ok((adapters, switch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PeftConfig, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn qlora_parses_as_lora_with_double_quantisation_by_default() {
        let c = parse("{method: qlora, r: 8}").unwrap();
        let PeftConfig::Qlora(l) = &c else {
            panic!("{c:?}")
        };
        assert_eq!((l.r, l.double_quant), (8, None));
        assert_eq!(c.lora().map(|l| l.scale()), Some(2.0));
        // Written and read back unchanged (temper_adapter.json keeps the full config).
        let off = parse("{method: qlora, r: 4, double_quant: false}").unwrap();
        let text = serde_yaml::to_string(&off).unwrap();
        assert_eq!(parse(&text).unwrap(), off, "{text}");
    }

    #[test]
    fn keys_of_another_method_are_named() {
        let e = parse("{method: lora, r: 4, double_quant: true}").unwrap_err();
        assert!(e.contains("`double_quant` belongs to method qlora"), "{e}");
        let e = parse("{method: qlora}").unwrap_err();
        assert!(e.contains("method qlora needs a rank"), "{e}");
        let e = parse("{method: qlora, r: 4, top_layers: 1}").unwrap_err();
        assert!(e.contains("belongs to method freeze"), "{e}");
        let e = parse("{method: prompt, num_virtual_tokens: 8, r: 4}").unwrap_err();
        assert!(e.contains("`r` belongs to method lora, not prompt"), "{e}");
        let e = parse("{method: lora, r: 4, init_text: hi}").unwrap_err();
        assert!(e.contains("`init_text` belongs to method prompt"), "{e}");
        let e = parse("{method: prefix, num_virtual_tokens: 8, init_text: hi}").unwrap_err();
        assert!(e.contains("`init_text` belongs to method prompt"), "{e}");
        let e = parse("{method: lora, r: 2, drop_layers: 1}").unwrap_err();
        assert!(e.contains("`drop_layers` belongs to method adapter"), "{e}");
        let e = parse("{method: adapter, r: 2}").unwrap_err();
        assert!(e.contains("`r` belongs to method lora, not adapter"), "{e}");
        let p = parse("{method: adapter, reduction: 8, activation: gelu, drop_layers: 2}").unwrap();
        assert_eq!(parse(&serde_yaml::to_string(&p).unwrap()).unwrap(), p);
        let e = parse("{method: lora, r: 2, encoder: lstm}").unwrap_err();
        assert!(e.contains("`encoder` belongs to method ptuning"), "{e}");
        let p = parse("{method: ptuning, num_virtual_tokens: 4, encoder: lstm}").unwrap();
        assert_eq!(parse(&serde_yaml::to_string(&p).unwrap()).unwrap(), p);
        let e = parse("{method: prompt, num_virtual_tokens: 8, projection: true}").unwrap_err();
        assert!(e.contains("`projection` belongs to method prefix"), "{e}");
        let p = parse("{method: prefix, num_virtual_tokens: 8, projection: true}").unwrap();
        assert_eq!(parse(&serde_yaml::to_string(&p).unwrap()).unwrap(), p);
        let p = parse("{method: prompt, num_virtual_tokens: 8, init_text: hi}").unwrap();
        let text = serde_yaml::to_string(&p).unwrap();
        assert_eq!(parse(&text).unwrap(), p, "{text}");
    }
}
