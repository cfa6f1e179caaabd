//! The building blocks of the transformer, each a struct holding its parameters so that frozen
//! copies and heads stay reachable. Parameter names are created through `nn::Path`, giving the
//! Hugging Face key of each tensor.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::config::{Arch, ModelConfig, RopeScaling};

pub(crate) fn normal_init(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// A dense layer. GPT-2 stores its weights in the Conv1D layout `(in, out)`; Llama and the heads
/// use `nn.Linear`'s `(out, in)`. The layout is fixed per checkpoint key, so we keep it as a flag
/// rather than transposing at load time.
pub(crate) struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub conv1d: bool,
    /// The Hugging Face module path (`transformer.h.0.attn.c_attn`): PEFT's adapter keys and
    /// `target_modules` refer to it.
    pub module: String,
    /// A LoRA/DoRA adapter on this layer, when `peft:` asked for one.
    pub lora: Option<Box<crate::peft::Lora>>,
    /// QLoRA: the frozen weight in NF4, dequantised on the fly; `weight` is then empty.
    pub quant: Option<crate::peft::Nf4Weight>,
}

impl Linear {
    pub fn new(p: nn::Path, d_in: i64, d_out: i64, bias: bool, conv1d: bool, std: f64) -> Self {
        let dims = if conv1d { [d_in, d_out] } else { [d_out, d_in] };
        Self {
            weight: p.var("weight", &dims, normal_init(std)),
            bias: bias.then(|| p.zeros("bias", &[d_out])),
            conv1d,
            module: p.components().collect::<Vec<_>>().join("."),
            lora: None,
            quant: None,
        }
    }

    pub fn d_in(&self) -> i64 {
        match &self.quant {
            Some(q) => q.shape[1],
            None => self.weight.size()[usize::from(!self.conv1d)],
        }
    }

    pub fn d_out(&self) -> i64 {
        match &self.quant {
            Some(q) => q.shape[0],
            None => self.weight.size()[usize::from(self.conv1d)],
        }
    }

    /// Replaces the frozen weight by its NF4 form and frees the dense one. Returns the bytes
    /// (dense, quantised).
    pub fn quantize(&mut self, double_quant: bool) -> (i64, i64) {
        let dense = self.weight.numel() as i64 * self.weight.kind().elt_size_in_bytes() as i64;
        let q = crate::peft::Nf4Weight::quantize(&self.weight_out_in(), double_quant);
        let bytes = q.bytes();
        // The variable store holds the same tensor: emptying it here frees the memory there.
        let empty = Tensor::empty([0], (self.weight.kind(), self.weight.device()));
        tch::no_grad(|| self.weight.shallow_clone().set_data(&empty));
        self.quant = Some(q);
        (dense, bytes)
    }

    /// The dense weight in the layer's own layout (dequantised when the layer is in NF4).
    pub fn dense_weight(&self) -> Tensor {
        match &self.quant {
            Some(q) if self.conv1d => q.dequantize().tr().contiguous(),
            Some(q) => q.dequantize(),
            None => self.weight.shallow_clone(),
        }
    }

    /// The weight in `nn.Linear`'s (out, in) layout, whatever the checkpoint's.
    pub fn weight_out_in(&self) -> Tensor {
        if let Some(q) = &self.quant {
            return q.dequantize().to_kind(self.weight.kind());
        }
        if self.conv1d {
            self.weight.tr()
        } else {
            self.weight.shallow_clone()
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.base_forward(x);
        match &self.lora {
            Some(lora) if lora.active() => lora.forward(x, y, self),
            Some(lora) => lora.bypassed(x, y),
            None => y,
        }
    }

    /// The layer without its adapter.
    pub fn base_forward(&self, x: &Tensor) -> Tensor {
        if self.quant.is_some() {
            return x.linear(&self.weight_out_in(), self.bias.as_ref());
        }
        if self.conv1d {
            match &self.bias {
                // One GEMM with the bias folded in (as torch's Linear does), not matmul + add.
                Some(b) => {
                    let (d_in, d_out) = (self.weight.size()[0], self.weight.size()[1]);
                    let mut shape = x.size();
                    *shape.last_mut().expect("input has a feature dimension") = d_out;
                    b.addmm(&x.reshape([-1, d_in]), &self.weight)
                        .view(shape.as_slice())
                }
                None => x.matmul(&self.weight),
            }
        } else {
            x.linear(&self.weight, self.bias.as_ref())
        }
    }
}

/// LayerNorm (GPT-2) or RMSNorm (Llama).
pub(crate) struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model;
        Self {
            weight: p.ones("weight", &[d]),
            bias: (cfg.arch == Arch::Gpt2).then(|| p.zeros("bias", &[d])),
            eps: cfg.norm_eps(),
        }
    }

    /// An RMSNorm of width `d` (Qwen3's per-head q/k norms).
    pub fn rms(p: nn::Path, d: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[d]),
            bias: None,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.bias {
            Some(bias) => x.layer_norm(
                [x.size()[x.dim() - 1]],
                Some(&self.weight),
                Some(bias),
                self.eps,
                true,
            ),
            None => {
                // As transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype.
                let dtype = x.kind();
                let xf = x.to_kind(Kind::Float);
                let var = xf.square().mean_dim(-1, true, Kind::Float);
                let normed = (xf * (var + self.eps).rsqrt()).to_kind(dtype);
                &self.weight * normed
            }
        }
    }
}

/// The feed-forward block: GELU-tanh MLP (GPT-2) or SwiGLU (Llama).
pub(crate) enum Mlp {
    Gelu {
        c_fc: Linear,
        c_proj: Linear,
    },
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl Mlp {
    pub fn new(p: nn::Path, cfg: &ModelConfig, proj_std: f64) -> Self {
        let (d, f) = (cfg.d_model, cfg.d_ff());
        match cfg.arch {
            Arch::Gpt2 => Mlp::Gelu {
                c_fc: Linear::new(p.sub("c_fc"), d, f, true, true, 0.02),
                c_proj: Linear::new(p.sub("c_proj"), f, d, true, true, proj_std),
            },
            Arch::Llama => {
                let bias = cfg.mlp_bias;
                Mlp::SwiGlu {
                    gate: Linear::new(p.sub("gate_proj"), d, f, bias, false, 0.02),
                    up: Linear::new(p.sub("up_proj"), d, f, bias, false, 0.02),
                    down: Linear::new(p.sub("down_proj"), f, d, bias, false, proj_std),
                }
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gelu { c_fc, c_proj } => c_proj.forward(&c_fc.forward(x).gelu("tanh")),
            Mlp::SwiGlu { gate, up, down } => {
                down.forward(&(gate.forward(x).silu() * up.forward(x)))
            }
        }
    }
}

/// Llama 3.1's frequency scaling (transformers' `_compute_llama3_parameters`): wavelengths
/// longer than the original context / `low` are slowed by `factor`, those shorter than
/// context / `high` kept, and the band between interpolated linearly in context / wavelength.
fn llama3_frequencies(inv_freq: &Tensor, factor: f64, low: f64, high: f64, context: f64) -> Tensor {
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    let long = wavelen.gt(context / low);
    let short = wavelen.lt(context / high);
    let slowed = inv_freq.where_self(&long.logical_not(), &(inv_freq / factor));
    let smooth = ((wavelen.reciprocal() * context) - low) / (high - low);
    let blended = (smooth.ones_like() - &smooth) * &slowed / factor + &smooth * &slowed;
    let medium = long.logical_or(&short).logical_not();
    blended.where_self(&medium, &slowed)
}

/// Rotary position embedding in transformers' "rotate half" convention.
pub(crate) struct Rope {
    inv_freq: Tensor, // (hd/2,)
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: tch::Device) -> Self {
        let hd = cfg.head_dim();
        let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / hd as f64;
        let inv_freq = Tensor::from(cfg.rope_theta)
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        let inv_freq = match &cfg.rope_scaling {
            None => inv_freq,
            Some(RopeScaling::Linear { factor }) => inv_freq / *factor,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => llama3_frequencies(
                &inv_freq,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings as f64,
            ),
        };
        Self { inv_freq }
    }

    /// cos and sin for integer `positions` (B, T), each (B, 1, T, hd) ready to broadcast
    /// over heads.
    pub fn cos_sin(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // (B, T, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1); // (B, 1, T, hd)
        (emb.cos(), emb.sin())
    }

    /// x: (B, H, T, hd).
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
        let (cos, sin) = (cos.to_kind(x.kind()), sin.to_kind(x.kind()));
        x * cos + rotated * sin
    }
}
