//! Parameter-efficient fine-tuning: the `peft:` block every training stage accepts.
//!
//! - `lora` (with `rslora`, `dora`): adapters on the named dense layers, saved in Hugging Face
//!   PEFT's format (`adapter_config.json`, `adapter_model.safetensors`) so `peft` loads them;
//! - `adalora`: SVD-shaped LoRA whose rank budget moves to the layers that matter
//!   ([`adalora`]), in PEFT's `ADALORA` format;
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
//! [`Tuning::stores`] and saves through [`Tuning::save_into`].

mod adalora;
mod attach;
mod bottleneck;
mod config;
pub(crate) mod files;
mod in_forward;
mod lora;
mod nf4;
mod prefix;
mod prompt;
mod ptuning;
mod write;

use std::sync::Arc;

use tch::nn::VarStore;
use tch::Tensor;

pub use adalora::{budget_schedule, AdaloraConfig, Allocator, RUNNING};
pub use bottleneck::{Activation, Adapter, Bottleneck, BottleneckConfig};
pub(crate) use config::bad;
pub use config::{check_peft, FreezeConfig, LoraBias, LoraConfig, LoraInit, PeftConfig, PeftError};
pub use files::{is_adapter, load_adapter, merge_adapters, read_adapter_config, AdapterConfig};
pub use in_forward::InForward;
pub use lora::{Lora, Switch};
pub use nf4::{dynamic_map, Absmax, Nf4Weight, NF4_LEVELS};
pub use prefix::{kv_width, Prefix, PrefixConfig};
pub use prompt::{
    init_from_text, init_prompt_text, is_prompt_adapter, is_unmergeable_adapter, virtual_tokens_of,
    PromptConfig, VirtualPrompt,
};
pub use ptuning::{EncoderKind, PtuningConfig};

use crate::model::Transformer;
use crate::optim::{AdamW, AdamWConfig};
use attach::{attach_adalora, attach_lora};

/// What a stage trains: the base model's unfrozen parameters, plus adapters in their own store.
pub struct Tuning {
    pub config: Option<PeftConfig>,
    /// LoRA parameters, named with PEFT's keys (`base_model.model.<module>.lora_A.weight`).
    pub adapters: Option<VarStore>,
    pub switch: Option<Arc<Switch>>,
    /// QLoRA: what quantising the base saved.
    pub quantized: Option<Quantized>,
    /// AdaLoRA: the rank allocator and its running statistics.
    pub adalora: Option<Allocator>,
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
    /// Holds a method's adapters and the switch that bypasses them.
    fn attach(&mut self, (adapters, switch): (VarStore, Arc<Switch>)) {
        self.adapters = Some(adapters);
        self.switch = Some(switch);
    }

    /// Full fine-tuning: nothing frozen, nothing attached.
    pub fn full() -> Self {
        Self {
            config: None,
            adapters: None,
            switch: None,
            quantized: None,
            adalora: None,
        }
    }

    pub fn is_lora(&self) -> bool {
        self.adapters.is_some()
    }

    /// The variable stores a stage saves in its state, in a fixed order: the base, the
    /// adapters, AdaLoRA's running statistics (never optimised).
    pub fn stores<'a>(&'a self, base: &'a VarStore) -> Vec<&'a VarStore> {
        let mut v = vec![base];
        v.extend(self.adapters.as_ref());
        v.extend(self.adalora.as_ref().map(|a| &a.running));
        v
    }

    /// Tells AdaLoRA's schedule how many optimizer updates the stage makes (the default for
    /// its `total_step`); a no-op for other methods.
    pub fn plan_updates(&mut self, updates: usize) -> Result<(), PeftError> {
        match &mut self.adalora {
            Some(a) => a.plan(updates),
            None => Ok(()),
        }
    }

    /// After each optimizer step, before the gradients are cleared: AdaLoRA's importance
    /// update and rank allocation.
    pub fn after_update(&self) -> Result<(), PeftError> {
        match &self.adalora {
            Some(a) => a.after_update(),
            None => Ok(()),
        }
    }

    /// What the method adds to the training loss: AdaLoRA's orthogonality regulariser.
    pub fn regulariser(&self) -> Option<Tensor> {
        self.adalora.as_ref().and_then(Allocator::regulariser)
    }

    /// Adds [`Tuning::regulariser`] to `loss`.
    pub fn regularised(&self, loss: Tensor) -> Tensor {
        match self.regulariser() {
            Some(r) => loss + r,
            None => loss,
        }
    }

    /// Backpropagates the regulariser alone, scaled (for a loss already backpropagated).
    pub fn backward_regulariser(&self, scale: f64) {
        if let Some(r) = self.regulariser() {
            (r * scale).backward();
        }
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
        for vs in std::iter::once(base).chain(self.adapters.as_ref()) {
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

    /// Summary fields: trainable and total parameters; with QLoRA, the base's dense layers in
    /// bytes before and after quantisation; with AdaLoRA, the rank left after allocation.
    pub fn summary_fields(&self, base: &VarStore) -> Vec<(&'static str, i64)> {
        let (trainable, total) = self.counts(base);
        let mut fields = vec![("params/trainable", trainable), ("params/total", total)];
        if let Some(q) = self.quantized {
            fields.push(("quant/base_bytes_dense", q.dense_bytes));
            fields.push(("quant/base_bytes_nf4", q.nf4_bytes));
        }
        if let Some(a) = &self.adalora {
            // Triplets alive over all adapted layers (init_r each at the start).
            fields.push(("adalora/rank", a.live_rank()));
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
    if model.adapters.any() {
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
    config.check_settings()?;
    let virtual_tokens = matches!(
        config,
        PeftConfig::Prompt(_) | PeftConfig::Ptuning(_) | PeftConfig::Prefix(_)
    );
    if virtual_tokens && model.heads.score {
        return Err(bad(
            "method",
            "prompt, P- and prefix tuning do not train or save a scalar head; for a reward model or critic use lora, adalora, adapter or head",
        ));
    }
    vs.freeze();
    let mut tuning = Tuning {
        config: Some(config.clone()),
        ..Tuning::full()
    };
    match config {
        PeftConfig::Lora(c) | PeftConfig::Qlora(c) => {
            tuning.attach(attach_lora(model, vs.device(), c)?);
            if let PeftConfig::Qlora(c) = config {
                tuning.quantized = Some(quantize_base(model, c.double_quant.unwrap_or(true)));
            }
            unfreeze_beside_lora(model, vs, c.bias);
        }
        PeftConfig::Adalora(c) => {
            let (adapters, switch, allocator) = attach_adalora(model, vs.device(), c)?;
            tuning.attach((adapters, switch));
            tuning.adalora = Some(allocator);
            unfreeze(vs, |n| n.starts_with("score."));
        }
        PeftConfig::Prompt(c) => tuning.attach(prompt::attach(model, vs.device(), c)?),
        PeftConfig::Adapter(c) => {
            tuning.attach(bottleneck::attach(model, vs.device(), c)?);
            // A reward model's or critic's new head trains and is saved with the adapters.
            unfreeze(vs, |n| n.starts_with("score."));
        }
        PeftConfig::Ptuning(c) => tuning.attach(prompt::attach_ptuning(model, vs.device(), c)?),
        PeftConfig::Prefix(c) => tuning.attach(prefix::attach(model, vs.device(), c)?),
        PeftConfig::Freeze(c) => unfreeze_chosen(model, vs, c)?,
        PeftConfig::Head => unfreeze_head(model, vs)?,
    }
    Ok(tuning)
}

/// Beside a LoRA: a reward model's or critic's new head trains with the adapter and is saved
/// with it (PEFT's `modules_to_save: ["score"]`), and the biases `bias` names.
fn unfreeze_beside_lora(model: &Transformer, vs: &mut VarStore, bias: LoraBias) {
    unfreeze(vs, |n| n.starts_with("score."));
    match bias {
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

/// `freeze`: only the parameters `trainable` names and the `top_layers` blocks (with the final
/// norm) train, and a scalar head.
fn unfreeze_chosen(
    model: &Transformer,
    vs: &mut VarStore,
    c: &FreezeConfig,
) -> Result<(), PeftError> {
    let n_layer = model.config.n_layer as usize;
    if let Some(k) = c.top_layers.filter(|&k| k > n_layer) {
        return Err(bad(
            "top_layers",
            format!("must be in 1..={n_layer} (the model's blocks), got {k}"),
        ));
    }
    let names: Vec<String> = vs.variables().into_keys().collect();
    if let Some(p) = c
        .trainable
        .iter()
        .find(|p| !names.iter().any(|n| glob(p, n)))
    {
        return Err(bad(
            "trainable",
            format!(
                "`{p}` matches no parameter (names look like `{}`)",
                names[0]
            ),
        ));
    }
    let top = c.top_layers.map_or(n_layer, |k| n_layer - k);
    unfreeze(vs, |n| {
        c.trainable.iter().any(|p| glob(p, n))
            || (c.top_layers.is_some()
                && (block_index(n).is_some_and(|i| i >= top) || is_final_norm(n)))
            || n.starts_with("score.")
    });
    Ok(())
}

/// `head`: the scalar head over a frozen backbone, or an LM head that is not the embedding.
fn unfreeze_head(model: &Transformer, vs: &mut VarStore) -> Result<(), PeftError> {
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
    Ok(())
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
