//! What DPO trains on, loaded and checked before anything is written: the policy as a chat
//! model, its reference (its own checkpoint, the LoRA policy with its adapters bypassed, or
//! none when the log-probs are precomputed or the loss needs no reference), the pairs (or
//! KTO's unpaired examples), and the held-out prompts the KL to the reference is measured on.

use std::path::Path;

use tch::Device;
use temper_core::chat_model::{ChatModel, ChatSettings};
use temper_core::peft::Reference;
use temper_core::preference::PreferenceLoss;
use temper_core::{load_checkpoint, LoadSpec, Transformer};
use temper_data::{seed_for, shuffled, Example, RenderedPair};
use temper_stage::{invalid, ConfigFile, StageError};

use crate::config::Config;

/// Training data: pairs, or unpaired examples for kto.
pub enum Data {
    Pairs(Vec<RenderedPair>),
    Unpaired(Vec<(Example, bool)>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::Pairs(p) => p.len(),
            Data::Unpaired(u) => u.len(),
        }
    }
}

pub struct Setup {
    pub chat: ChatModel,
    /// Held while training unless the reference's log-probs are precomputed or the policy is
    /// LoRA (its own reference with the adapters bypassed).
    reference: Option<Transformer>,
    /// The policy is LoRA and no `reference` was named.
    bypass_reference: bool,
    pub train: Data,
    pub eval: Data,
    /// Held-out prompts for the KL measurement.
    pub kl_prompts: Vec<Vec<i64>>,
}

/// The policy, its reference (when held) and the rendered data, checked before anything is
/// written.
pub fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let settings = ChatSettings {
        init: &c.policy,
        spec: LoadSpec::CAUSAL_LM,
        peft: c.peft.as_ref(),
        steps: c.steps,
        max_len: c.max_len,
        rows_per_batch: 2 * c.batch_size,
    };
    let chat = ChatModel::load(cfg, settings, device)?;
    let opts = chat.load_options(&c.fields, c.overlong, false);
    let load = |path: &Path| -> Result<Data, StageError> {
        Ok(match c.loss {
            PreferenceLoss::Kto => Data::Unpaired(opts.unpaired(path).map_err(invalid)?.0),
            _ => Data::Pairs(opts.pairs(path).map_err(invalid)?.0),
        })
    };
    let train = load(&c.data)?;
    let eval = match &c.eval_data {
        Some(p) => load(p)?,
        None => Data::Pairs(Vec::new()),
    };
    tracing::info!(
        "{}: {} training examples ({:?} loss)",
        c.data.display(),
        train.len(),
        c.loss
    );
    // A LoRA policy is its own reference with the adapters bypassed.
    let bypass = chat.m.tuning.is_lora() && c.reference.is_none();
    let needs_model = c.loss.needs_reference() && !c.precompute_reference && !bypass;
    let reference = needs_model.then(|| load_reference(c, device)).transpose()?;
    let kl_prompts: Vec<Vec<i64>> = match &eval {
        Data::Pairs(p) => p.iter().map(|p| prompt_of(&p.chosen)).collect(),
        Data::Unpaired(u) => u.iter().map(|(e, _)| prompt_of(e)).collect(),
    };
    let kl_prompts: Vec<Vec<i64>> = kl_prompts
        .into_iter()
        .filter(|p: &Vec<i64>| !p.is_empty())
        .take(c.kl_samples)
        .collect();
    Ok(Setup {
        chat,
        reference,
        bypass_reference: bypass,
        train,
        eval,
        kl_prompts,
    })
}

/// Epoch `e`'s batches of `batch` examples (the global batch: per-rank size × ranks): a
/// seeded shuffle cut into pieces.
pub fn epoch_batches(n: usize, batch: usize, c: &Config) -> impl Fn(u64) -> Vec<Vec<usize>> + '_ {
    move |e| {
        let order = shuffled(n, seed_for(c.seed, "epoch", e));
        order.chunks(batch).map(<[usize]>::to_vec).collect()
    }
}

impl Setup {
    /// The frozen reference held in memory: its own model, or the LoRA policy with its
    /// adapters bypassed; None when neither is held (reference-free loss, or precomputed).
    pub fn reference(&self) -> Option<Reference<'_>> {
        let m = &self.chat.m;
        match &self.reference {
            Some(r) => Some(Reference::Model(r)),
            None if m.tuning.is_lora() && self.bypass_reference => {
                Some(Reference::Bypassed(&m.model, &m.tuning))
            }
            None => None,
        }
    }
}

pub fn load_reference(c: &Config, device: tch::Device) -> Result<Transformer, StageError> {
    let dir = c.reference.as_ref().unwrap_or(&c.policy);
    let (mut vs, model) = load_checkpoint(dir, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    vs.freeze();
    Ok(model)
}

fn prompt_of(e: &Example) -> Vec<i64> {
    e.ids[..e.prompt_len()].iter().map(|&t| t as i64).collect()
}
