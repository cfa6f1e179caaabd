//! The PEFT methods that change the forward pass rather than a layer's weights, as the model
//! sees them: prompt tuning's virtual tokens before the input, prefix tuning's keys and values
//! before every layer's, and bottleneck adapters after each block's attention and MLP. (LoRA
//! lives in the dense layers.) The model calls the few methods here; what each method holds
//! and how it trains stays in its own module.

use tch::{Device, Kind, Tensor};

use super::{Adapter, Bottleneck, Prefix, VirtualPrompt};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::KvCache;

/// At most one of each, attached by [`super::apply`] or loaded with an adapter.
#[derive(Default)]
pub struct InForward {
    pub(crate) prompt: Option<VirtualPrompt>,
    pub(crate) prefix: Option<Prefix>,
    pub(crate) bottleneck: Option<Bottleneck>,
}

impl InForward {
    /// Whether any is attached (a model carrying one cannot be merged into plain weights).
    pub fn any(&self) -> bool {
        self.prompt.is_some() || self.prefix.is_some() || self.bottleneck.is_some()
    }

    /// Positions the virtual tokens take from the model's, whether or not they are bypassed.
    pub fn reserved_positions(&self) -> i64 {
        self.prompt.as_ref().map_or(0, |p| p.num_virtual_tokens())
            + self.prefix.as_ref().map_or(0, |p| p.num_virtual_tokens())
    }

    /// Positions a fresh sequence gains in front of its tokens while the adapters are on.
    pub fn active_positions(&self) -> i64 {
        self.prompt.as_ref().map_or(0, |p| p.active_len())
            + self.prefix.as_ref().map_or(0, |p| p.active_len())
    }

    /// Whether an active prefix puts keys and values in front of every layer's.
    pub fn prefix_active(&self) -> bool {
        self.prefix.as_ref().is_some_and(|p| p.active_len() > 0)
    }

    /// Prefix tuning: a fresh sequence starts after the prefix's keys and values, as after
    /// that many cached tokens. A given cache that is empty is filled with them; without one
    /// (training, scoring) `own` becomes a cache that holds them for `t` more tokens, and the
    /// gradients flow through the copies into the prefix. Returns the cache to run with.
    pub fn prefill<'c>(
        &self,
        config: &ModelConfig,
        (b, t): (i64, i64),
        device: Device,
        cache: Option<&'c mut KvCache>,
        own: &'c mut Option<KvCache>,
    ) -> Result<Option<&'c mut KvCache>> {
        let Some(p) = self.prefix.as_ref().filter(|p| p.active_len() > 0) else {
            return Ok(cache);
        };
        if cache.as_ref().is_some_and(|c| !c.is_empty()) {
            return Ok(cache);
        }
        let n = p.num_virtual_tokens();
        let c = match cache {
            Some(c) => c,
            None => own.insert(KvCache::new(config, b, n + t, Kind::Float, device)),
        };
        c.check_room(n)?;
        c.prefill(&p.keys_values(config, b));
        Ok(Some(c))
    }

    /// Prompt tuning: the virtual tokens a sequence gets in front, `past` tokens into it (a
    /// fresh sequence gets them; a cache that already holds the sequence holds them too).
    pub fn prompt_tokens(&self, past: i64) -> i64 {
        match (&self.prompt, past) {
            (Some(p), 0) => p.active_len(),
            _ => 0,
        }
    }

    /// Token embeddings `x` (B, T, C) with `n` virtual tokens in front: (B, n + T, C).
    pub fn prepend_prompt(&self, x: Tensor, n: i64) -> Tensor {
        match (&self.prompt, n) {
            (Some(p), n) if n > 0 => {
                let (b, c) = (x.size()[0], x.size()[2]);
                let virtual_tokens = p
                    .virtual_embeddings()
                    .to_kind(x.kind())
                    .unsqueeze(0)
                    .expand([b, n, c], false);
                Tensor::cat(&[virtual_tokens, x], 1)
            }
            _ => x,
        }
    }

    /// Block `i`'s bottleneck adapters, after its attention and after its MLP.
    pub fn bottleneck_at(&self, i: usize) -> Option<&(Adapter, Adapter)> {
        self.bottleneck.as_ref().and_then(|a| a.at(i))
    }
}
