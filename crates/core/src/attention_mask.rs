//! Where each new token sits and what it may attend to: position ids that count real tokens
//! only (left or right padding), and the boolean attention mask for padding, KV-cached
//! decoding and Mistral's sliding window — None when plain causal attention will do.

use tch::{Device, Kind, Tensor};

use crate::kv_cache::KvCache;

/// Where each new token sits and what it may attend to.
pub(crate) struct Layout {
    /// (B, T) bool real-token mask, when any token (new or cached) may be padding.
    pub real: Option<Tensor>,
    /// Position ids, (B, T) or (1, T).
    pub pos: Tensor,
    /// (B, 1, T, S) bool; None means plain causal attention (sdpa's is_causal) or, for one
    /// new token, none.
    pub attn_mask: Option<Tensor>,
}

/// Positions and the attention mask of a call with `t` new tokens per row, updating the
/// cache's key mask. Position ids count real tokens only, so left padding does not shift them.
/// With a sliding `window` (Mistral), keys further back than it are masked too.
pub(crate) fn layout(
    b: i64,
    t: i64,
    device: Device,
    mask: Option<&Tensor>,
    mut cache: Option<&mut KvCache>,
    window: Option<i64>,
) -> Layout {
    let past = cache.as_ref().map_or(0, |c| c.len());
    // Without padding anywhere (no mask now, none cached) every row's positions are
    // past..past+t and attention is plain causal: skip the per-row bookkeeping, which is
    // most of a decode step's small ops.
    let padded = mask.is_some() || cache.as_ref().is_some_and(|c| c.padded);
    let real = padded.then(|| match mask {
        Some(m) => m.to_kind(Kind::Bool),
        None => Tensor::ones([b, t], (Kind::Bool, device)),
    });
    let pos = match &real {
        Some(real) => {
            let mut pos = real.cumsum(1, Kind::Int64) - 1; // (B, T)
            if let Some(c) = cache.as_ref() {
                pos += c.seen.unsqueeze(1);
            }
            pos.clamp_min(0)
        }
        None => Tensor::arange_start(past, past + t, (Kind::Int64, device)).unsqueeze(0),
    };
    if let Some(c) = cache.as_deref_mut() {
        let mut slots = c.key_mask.narrow(1, past, t);
        match &real {
            Some(real) => slots.copy_(real),
            None => _ = slots.fill_(1),
        }
        c.padded |= mask.is_some();
    }
    let attn_mask = match &real {
        Some(real) => Some(padding_mask(
            real,
            cache.as_deref(),
            mask.is_some(),
            past,
            t,
        )),
        None if past > 0 && t > 1 => Some(causal_block(past, t, device).view([1, 1, t, past + t])),
        None => None,
    };
    let attn_mask = match window {
        Some(w) if past + t > w => Some(within_window(attn_mask, past, t, w, device)),
        _ => attn_mask,
    };
    Layout {
        real,
        pos,
        attn_mask,
    }
}

/// The (B, 1, T, S) mask for a call where some token, new or cached, may be padding; `real`
/// (B, T) marks the new tokens. The cache's key mask already holds them.
///
/// Query i (absolute position past+i) may see key j when j ≤ past+i and key j is a real token.
/// It may always see itself, so rows of padding queries are never fully masked (a fully masked
/// softmax row is NaN, and NaN times a zero loss mask is still NaN).
fn padding_mask(
    real: &Tensor,
    cache: Option<&KvCache>,
    new_padded: bool,
    past: i64,
    t: i64,
) -> Tensor {
    let device = real.device();
    let keys = match cache {
        Some(c) => c.key_mask.narrow(1, 0, past + t),
        None => real.shallow_clone(),
    }; // (B, S)
    if t == 1 && !new_padded {
        // One real new token: it sees every real cached key and itself.
        return keys.unsqueeze(1).unsqueeze(1);
    }
    let causal = causal_block(past, t, device); // (T, S)
    let diag = Tensor::arange(past + t, (Kind::Int64, device))
        .unsqueeze(0)
        .eq_tensor(&(Tensor::arange(t, (Kind::Int64, device)) + past).unsqueeze(1)); // (T, S)
    let allowed = keys
        .unsqueeze(1)
        .logical_and(&causal.unsqueeze(0))
        .logical_or(&diag); // (B, T, S)
    allowed.unsqueeze(1)
}

/// Mistral's sliding window on top of `mask` (None: plain causal): query at absolute position
/// q sees key k only when q - k < `window`, counted in cache slots as transformers does (the
/// same distance in real tokens, since padding sits only at a row's ends).
fn within_window(mask: Option<Tensor>, past: i64, t: i64, window: i64, device: Device) -> Tensor {
    let q = (Tensor::arange(t, (Kind::Int64, device)) + past).unsqueeze(1);
    let k = Tensor::arange(past + t, (Kind::Int64, device)).unsqueeze(0);
    let band = (q - k).lt(window).view([1, 1, t, past + t]);
    match mask {
        Some(m) => m.logical_and(&band),
        None => causal_block(past, t, device)
            .view([1, 1, t, past + t])
            .logical_and(&band),
    }
}

/// (T, S) bool: new query i may see key j ≤ past + i.
fn causal_block(past: i64, t: i64, device: Device) -> Tensor {
    let q = (Tensor::arange(t, (Kind::Int64, device)) + past).unsqueeze(1);
    let k = Tensor::arange(past + t, (Kind::Int64, device)).unsqueeze(0);
    k.le_tensor(&q)
}
