//! Key/value cache for incremental decoding. Buffers are allocated once for the whole
//! generation (prompt + new tokens) and written in place, so a decode step costs no
//! reallocation or concatenation of the past.

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{CoreError, Result};

pub struct KvCache {
    /// Per layer: keys and values, each (B, n_kv_head, capacity, head_dim).
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    /// Which cached positions hold real tokens: (B, capacity) bool.
    pub(crate) key_mask: Tensor,
    /// Real tokens seen so far per sequence: (B,) int64. The next token's position id.
    pub(crate) seen: Tensor,
    /// Positions filled (the same for every sequence; padding fills the gaps).
    pub(crate) len: i64,
    /// Whether any cached position may be padding (a mask was given), so later calls must
    /// mask keys; a cache of unpadded prompts attends without a mask.
    pub(crate) padded: bool,
    capacity: i64,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        let shape = [batch, cfg.n_kv_head(), capacity, cfg.head_dim()];
        let layers = (0..cfg.n_layer)
            .map(|_| {
                (
                    Tensor::zeros(shape, (kind, device)),
                    Tensor::zeros(shape, (kind, device)),
                )
            })
            .collect();
        Self {
            layers,
            key_mask: Tensor::zeros([batch, capacity], (Kind::Bool, device)),
            seen: Tensor::zeros([batch], (Kind::Int64, device)),
            len: 0,
            padded: false,
            capacity,
        }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn check_room(&self, new: i64) -> Result<()> {
        if self.len + new > self.capacity {
            return Err(CoreError::Shape(format!(
                "KV cache holds {} positions; {} more do not fit",
                self.capacity - self.len,
                new
            )));
        }
        Ok(())
    }

    /// Fills an empty cache with per-layer keys and values (B, n_kv, n, hd) that every later
    /// token attends to (prefix tuning): n real positions, n tokens seen.
    pub(crate) fn prefill(&mut self, layers: &[(Tensor, Tensor)]) {
        let n = layers.first().map_or(0, |(k, _)| k.size()[2]);
        for (i, (k, v)) in layers.iter().enumerate() {
            let _ = self.append(i, k, v);
        }
        let _ = self.key_mask.narrow(1, self.len, n).fill_(1);
        self.seen += n;
        self.len += n;
    }

    /// Writes one layer's new keys/values (B, n_kv, T, hd) after the filled part and returns
    /// views of everything filled so far, (B, n_kv, len + T, hd).
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let (kc, vc) = &mut self.layers[layer];
        if self.len == 0 && kc.kind() != k.kind() {
            // The first keys set the cache's precision (bf16 under autocast): decoding then
            // reads the cache as it is, instead of converting all of it at every step.
            *kc = kc.to_kind(k.kind());
            *vc = vc.to_kind(v.kind());
        }
        kc.narrow(2, self.len, t).copy_(k);
        vc.narrow(2, self.len, t).copy_(v);
        (kc.narrow(2, 0, self.len + t), vc.narrow(2, 0, self.len + t))
    }
}
