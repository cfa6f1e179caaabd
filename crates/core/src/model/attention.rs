//! One decoder layer's attention: fused (GPT-2) or split (Llama) projections, grouped-query
//! heads, Qwen3's q/k norms, RoPE, the KV cache, and PyTorch's scaled-dot-product attention.

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::device::outside_cpu_autocast;
use crate::kv_cache::KvCache;
use crate::layers::{Linear, Mlp, Norm, Rope};

/// Query/key/value projections: fused `c_attn` (GPT-2) or separate q/k/v (Llama).
// One per layer, built once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum QkvProj {
    Fused(Linear),
    Split { q: Linear, k: Linear, v: Linear },
}

pub(super) struct Attention {
    pub(super) qkv: QkvProj,
    pub(super) out: Linear,
    /// Qwen3: RMSNorm over each query and key head, before RoPE.
    qk_norm: Option<(Norm, Norm)>,
    n_head: i64,
    n_kv_head: i64,
    head_dim: i64,
}

impl Attention {
    pub(super) fn new(p: nn::Path, cfg: &ModelConfig, proj_std: f64) -> Self {
        let d = cfg.d_model;
        let a = cfg.attn_dim();
        let kv_dim = cfg.n_kv_head() * cfg.head_dim();
        let (qkv, out) = match cfg.arch {
            Arch::Gpt2 => (
                QkvProj::Fused(Linear::new(p.sub("c_attn"), d, 3 * d, true, true, 0.02)),
                Linear::new(p.sub("c_proj"), d, d, true, true, proj_std),
            ),
            Arch::Llama => {
                let bias = cfg.qkv_bias();
                (
                    QkvProj::Split {
                        q: Linear::new(p.sub("q_proj"), d, a, bias, false, 0.02),
                        k: Linear::new(p.sub("k_proj"), d, kv_dim, bias, false, 0.02),
                        v: Linear::new(p.sub("v_proj"), d, kv_dim, bias, false, 0.02),
                    },
                    Linear::new(p.sub("o_proj"), a, d, cfg.out_bias(), false, proj_std),
                )
            }
        };
        let qk_norm = cfg.qk_norm().then(|| {
            let (hd, eps) = (cfg.head_dim(), cfg.norm_eps());
            (
                Norm::rms(p.sub("q_norm"), hd, eps),
                Norm::rms(p.sub("k_norm"), hd, eps),
            )
        });
        Self {
            qkv,
            out,
            qk_norm,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head(),
            head_dim: cfg.head_dim(),
        }
    }

    /// x: (B, T, C) → (B, T, C).
    pub(super) fn forward(&self, x: &Tensor, ctx: &mut AttnContext, layer: usize) -> Tensor {
        let (b, t, c) = x.size3().expect("hidden states are (B, T, C)");
        let (q, k, v) = match &self.qkv {
            QkvProj::Fused(lin) => {
                let qkv = lin.forward(x).split(c, 2);
                (
                    qkv[0].shallow_clone(),
                    qkv[1].shallow_clone(),
                    qkv[2].shallow_clone(),
                )
            }
            QkvProj::Split { q, k, v } => (q.forward(x), k.forward(x), v.forward(x)),
        };
        let heads = |z: Tensor, n: i64| z.view([b, t, n, self.head_dim]);
        let (mut q, mut k) = (heads(q, self.n_head), heads(k, self.n_kv_head)); // (B, T, H, hd)
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q);
            k = k_norm.forward(&k);
        }
        let mut q = q.transpose(1, 2); // (B, H, T, hd)
        let mut k = k.transpose(1, 2); // (B, Hkv, T, hd)
        let v = heads(v, self.n_kv_head).transpose(1, 2);
        if let Some((cos, sin)) = &ctx.rope {
            q = Rope::apply(&q, cos, sin);
            k = Rope::apply(&k, cos, sin);
        }
        let (k, v) = match ctx.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &k, &v), // (B, Hkv, S, hd)
            None => (k, v),
        };
        let y = attention(&q, &k, &v, ctx.mask.as_ref()); // (B, H, T, hd)
        self.out.forward(
            &y.transpose(1, 2)
                .reshape([b, t, self.n_head * self.head_dim]),
        )
    }
}

/// PyTorch's scaled-dot-product attention, with grouped-query heads repeated. On a CPU it is
/// computed in fp32 whatever the autocast precision: without AMX, PyTorch's bf16 attention
/// there is slower than its fp32 one, most of all for a decode step's single query, which it
/// sends through MKL's bf16 matrix-vector product (`scripts/bench.sh` measures the effect on
/// generation). The KV cache stays in its own precision (bf16 under autocast: half the memory)
/// and is converted at each call.
///
/// q (B, H, T, hd); k, v (B, Hkv, S, hd); mask (B or 1, 1, T, S) bool, true = may attend, or
/// None for plain causal attention. Returns (B, H, T, hd) in the values' precision.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let (_, h, t, _) = q.size4().expect("queries are (B, H, T, hd)");
    let cpu = q.device() == Device::Cpu;
    // No copy when already fp32, or off the CPU.
    let cast = |z: &Tensor| {
        if cpu {
            z.to_kind(Kind::Float)
        } else {
            z.shallow_clone()
        }
    };
    let (k_all, v_all) = expand_kv(&cast(k), &cast(v), h);
    let attend = || {
        Tensor::scaled_dot_product_attention(
            &cast(q),
            &k_all,
            &v_all,
            mask,
            0.0,
            mask.is_none() && t > 1,
            None,
            false,
        )
    };
    if cpu {
        // Autocast would cast the fp32 inputs back to bf16.
        outside_cpu_autocast(attend).to_kind(v.kind())
    } else {
        attend()
    }
}

/// Keys and values (B, Hkv, S, hd) repeated for grouped-query attention to `n_head` heads.
fn expand_kv(k: &Tensor, v: &Tensor, n_head: i64) -> (Tensor, Tensor) {
    let (b, n_kv, s, hd) = k.size4().expect("keys are (B, Hkv, S, hd)");
    if n_kv == n_head {
        return (k.shallow_clone(), v.shallow_clone());
    }
    let expand = |z: &Tensor| {
        z.unsqueeze(2)
            .expand([b, n_kv, n_head / n_kv, s, hd], false)
            .reshape([b, n_head, s, hd])
    };
    (expand(k), expand(v))
}

/// What every layer's attention needs for one forward call.
pub(super) struct AttnContext<'a> {
    /// (B, 1, T, S) bool, true = may attend; None = plain causal over the whole sequence.
    pub(super) mask: Option<Tensor>,
    pub(super) rope: Option<(Tensor, Tensor)>,
    pub(super) cache: Option<&'a mut KvCache>,
}

/// One decoder layer: attention and MLP, each after its norm.
pub(super) struct Block {
    pub(super) norm_attn: Norm,
    pub(super) attn: Attention,
    pub(super) norm_mlp: Norm,
    pub(super) mlp: Mlp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{with_autocast, Precision};

    #[test]
    fn attention_on_a_cpu_under_bf16_autocast_is_fp32_attention_on_the_converted_inputs() {
        tch::manual_seed(5);
        let o = (Kind::BFloat16, Device::Cpu);
        // Grouped-query heads (4 query, 2 key/value) and a padding mask.
        let (q, k, v) = (
            Tensor::randn([2, 4, 3, 8], o),
            Tensor::randn([2, 2, 5, 8], o),
            Tensor::randn([2, 2, 5, 8], o),
        );
        let mask = Tensor::ones([2, 1, 3, 5], (Kind::Bool, Device::Cpu));
        let _ = mask.get(1).narrow(2, 0, 2).fill_(0);
        let got = with_autocast(Device::Cpu, Precision::Bf16, || {
            attention(&q, &k, &v, Some(&mask))
        })
        .unwrap();
        assert_eq!(
            got.kind(),
            Kind::BFloat16,
            "returned in the values' precision"
        );
        let (k32, v32) = expand_kv(&k.to_kind(Kind::Float), &v.to_kind(Kind::Float), 4);
        let want = Tensor::scaled_dot_product_attention(
            &q.to_kind(Kind::Float),
            &k32,
            &v32,
            Some(&mask),
            0.0,
            false,
            None,
            false,
        );
        // Bit for bit the fp32 result rounded once to bf16: not bf16 attention.
        assert!(got.equal(&want.to_kind(Kind::BFloat16)));
        let bf16 = Tensor::scaled_dot_product_attention(
            &q,
            &k.repeat_interleave_self_int(2, 1, None),
            &v.repeat_interleave_self_int(2, 1, None),
            Some(&mask),
            0.0,
            false,
            None,
            false,
        );
        assert!(!got.equal(&bf16), "bf16 attention gives other numbers");
    }
}
