//! Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): `num_virtual_tokens`
//! learned keys and values in every attention layer, which every token attends to as if they
//! were cached tokens before the sequence; the model is frozen. Laid out as PEFT's
//! `PREFIX_TUNING`: one (n, L·2·D) tensor, D = key/value heads × head size (GQA models get
//! prefixes for their key/value heads), read as (n, L·2, H_kv, hd) with layer l's keys at 2l and
//! values at 2l + 1. With `projection` (the original prefix tuning) a two-layer MLP
//! reparameterises the prefix while training — embedding (n, D) → Linear → tanh → Linear to
//! L·2·D — and only its output is saved; without it (P-tuning v2) the tensor is learned
//! directly. Real tokens take positions n, n + 1, … as after n cached tokens.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use super::{PeftError, Switch};
use crate::config::ModelConfig;
use crate::model::Transformer;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixConfig {
    pub num_virtual_tokens: i64,
    /// Train through an MLP (prefix tuning); false learns the prefix directly (P-tuning v2).
    #[serde(default)]
    pub projection: bool,
    /// The MLP's hidden width; default the key/value width D.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<i64>,
}

enum Source {
    /// (n, L·2·D), learned directly or loaded.
    Direct(Tensor),
    Projected {
        embedding: Tensor,
        mlp: nn::Sequential,
    },
}

/// The learned prefix of one model and the switch that bypasses it for the reference.
pub struct Prefix {
    source: Source,
    n: i64,
    pub switch: Arc<Switch>,
}

/// Width of one layer's keys (or values): key/value heads × head size.
pub fn kv_width(cfg: &ModelConfig) -> i64 {
    cfg.n_kv_head() * cfg.head_dim()
}

impl Prefix {
    pub fn active_len(&self) -> i64 {
        if self.switch.enabled() {
            self.n
        } else {
            0
        }
    }

    /// Virtual keys/values per layer, whether or not the prefix is bypassed.
    pub fn num_virtual_tokens(&self) -> i64 {
        self.n
    }

    /// The prefix as PEFT stores it, (n, L·2·D).
    pub fn flat(&self) -> Tensor {
        match &self.source {
            Source::Direct(t) => t.shallow_clone(),
            Source::Projected { embedding, mlp } => mlp.forward(embedding),
        }
    }

    /// Per layer, keys and values (B, H_kv, n, hd) for a batch of `b`.
    pub(crate) fn keys_values(&self, cfg: &ModelConfig, b: i64) -> Vec<(Tensor, Tensor)> {
        let (h, hd) = (cfg.n_kv_head(), cfg.head_dim());
        let kv = self
            .flat()
            .view([self.n, cfg.n_layer * 2, h, hd])
            .permute([1, 2, 0, 3]); // (L·2, H, n, hd)
        (0..cfg.n_layer)
            .map(|l| {
                let pick = |i: i64| kv.get(i).unsqueeze(0).expand([b, h, self.n, hd], false);
                (pick(2 * l), pick(2 * l + 1))
            })
            .collect()
    }
}

/// Creates the prefix's parameters in a new store and attaches it. PEFT's keys: the direct
/// prefix is `prompt_embeddings`; the projected one trains `prefix.*` and saves its output.
pub(crate) fn attach(
    model: &mut Transformer,
    device: Device,
    c: &PrefixConfig,
) -> Result<(VarStore, Arc<Switch>), PeftError> {
    let n = c.num_virtual_tokens;
    super::prompt::check_virtual_tokens(model, n)?;
    let cfg = &model.config;
    let width = kv_width(cfg);
    let out = cfg.n_layer * 2 * width;
    let store = VarStore::new(device);
    let source = if c.projection {
        let hidden = c.encoder_hidden_size.unwrap_or(width);
        let p = store.root().sub("prefix");
        // PEFT's PrefixEncoder: nn.Embedding (N(0, 1)), then Linear → tanh → Linear.
        let embedding = p.sub("embedding").randn("weight", &[n, width], 0.0, 1.0);
        let mlp = nn::seq()
            .add(nn::linear(
                p.sub("mlp").sub("0"),
                width,
                hidden,
                Default::default(),
            ))
            .add_fn(|x| x.tanh())
            .add(nn::linear(
                p.sub("mlp").sub("2"),
                hidden,
                out,
                Default::default(),
            ));
        Source::Projected { embedding, mlp }
    } else {
        // Small values: a prefix of large random keys would swamp attention at the start.
        Source::Direct(
            store
                .root()
                .randn("prompt_embeddings", &[n, out], 0.0, 0.02),
        )
    };
    let switch = Switch::new();
    model.adapters.prefix = Some(Prefix {
        source,
        n,
        switch: switch.clone(),
    });
    Ok((store, switch))
}

/// Attaches a saved (n, L·2·D) prefix as a parameter of a new store.
pub(crate) fn attach_saved(
    model: &mut Transformer,
    saved: &Tensor,
) -> Result<(VarStore, Arc<Switch>), String> {
    let cfg = &model.config;
    let want = [saved.size()[0], cfg.n_layer * 2 * kv_width(cfg)];
    if saved.dim() != 2 || saved.size() != want {
        return Err(format!(
            "shape {:?} does not fit the base model's {want:?} (virtual tokens × layers·2·key/value width): this prefix was trained on a different base",
            saved.size()
        ));
    }
    let store = VarStore::new(model.device());
    let t = store
        .root()
        .var_copy("prompt_embeddings", &saved.to_kind(Kind::Float));
    let switch = Switch::new();
    model.adapters.prefix = Some(Prefix {
        source: Source::Direct(t),
        n: want[0],
        switch: switch.clone(),
    });
    Ok((store, switch))
}
