//! Creating the low-rank adapters of `lora`/`qlora` (LoRA, rsLoRA, DoRA, PiSSA's start) and
//! `adalora` on the dense layers a config targets, in a store of their own, as PEFT
//! initialises them.

use std::sync::Arc;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::{adalora, available_modules, bad, matches_target, AdaloraConfig, Allocator, Lora};
use super::{LoraConfig, LoraInit, PeftError, Switch};
use crate::layers::Linear;
use crate::model::Transformer;

/// The module paths of the dense layers `target_modules` and `layers` select (default: every
/// dense layer of every block), checked against the model.
pub(super) fn adapted_layers(
    model: &Transformer,
    target_modules: &Option<Vec<String>>,
    layers: &Option<Vec<usize>>,
) -> Result<std::collections::BTreeSet<String>, PeftError> {
    let available = available_modules(model);
    let targets = target_modules.clone().unwrap_or_else(|| available.clone());
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
    if let Some(bad_layer) = layers.iter().flatten().find(|&&i| i >= n_layer) {
        return Err(bad(
            "layers",
            format!("block {bad_layer} does not exist (the model has {n_layer})"),
        ));
    }
    Ok(model
        .block_linears()
        .iter()
        .filter(|(layer, linear)| {
            targets.iter().any(|t| matches_target(&linear.module, t))
                && layers.as_ref().is_none_or(|ls| ls.contains(layer))
        })
        .map(|(_, linear)| linear.module.clone())
        .collect())
}

/// AdaLoRA's A, E, B for the targeted layers in a new store, initialised as PEFT does
/// (A, B ~ N(0, 0.02), E = 0: the model starts unchanged), and their rank allocator.
pub(super) fn attach_adalora(
    model: &mut Transformer,
    device: tch::Device,
    c: &AdaloraConfig,
) -> Result<(VarStore, Arc<Switch>, Allocator), PeftError> {
    let targeted = adapted_layers(model, &c.target_modules, &c.layers)?;
    let adapters = VarStore::new(device);
    let switch = Switch::new();
    let root = adapters.root().sub("base_model").sub("model");
    let init = tch::nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    for (_, linear) in model.block_linears_mut() {
        if !targeted.contains(&linear.module) {
            continue;
        }
        let p = linear
            .module
            .split('.')
            .fold(root.clone(), |p, part| p.sub(part));
        let (d_in, d_out) = (linear.d_in(), linear.d_out());
        // PEFT keeps them in parameter dicts: saved as `<module>.lora_A`, without `.weight`.
        let a = p.var("lora_A", &[c.init_r, d_in], init);
        let e = p.zeros("lora_E", &[c.init_r, 1]);
        let b = p.var("lora_B", &[d_out, c.init_r], init);
        linear.lora = Some(Box::new(Lora {
            a,
            b,
            scale: c.scale(),
            dropout: c.dropout,
            magnitude: None,
            initial: None,
            e: Some(e),
            switch: switch.clone(),
        }));
    }
    let allocator = Allocator::new(c, device, adalora::factors_of(model));
    Ok((adapters, switch, allocator))
}

/// Creates LoRA parameters for the targeted layers in a new store.
pub(super) fn attach_lora(
    model: &mut Transformer,
    device: tch::Device,
    c: &LoraConfig,
) -> Result<(VarStore, Arc<Switch>), PeftError> {
    let targeted = adapted_layers(model, &c.target_modules, &c.layers)?;
    if c.init == LoraInit::Pissa {
        let (d_in, d_out) = model
            .block_linears()
            .iter()
            .map(|(_, l)| (l.d_in(), l.d_out()))
            .fold((i64::MAX, i64::MAX), |(a, b), (i, o)| (a.min(i), b.min(o)));
        if c.r > d_in.min(d_out) {
            return Err(bad(
                "r",
                format!(
                    "pissa takes the top r singular vectors: r must be at most {}",
                    d_in.min(d_out)
                ),
            ));
        }
    }
    let adapters = VarStore::new(device);
    let switch = Switch::new();
    let root = adapters.root().sub("base_model").sub("model");
    for (_, linear) in model.block_linears_mut() {
        if !targeted.contains(&linear.module) {
            continue;
        }
        let mut p = root.clone();
        for part in linear.module.split('.') {
            p = p.sub(part);
        }
        let (d_in, d_out) = (linear.d_in(), linear.d_out());
        let a_init = match c.init {
            LoraInit::Default | LoraInit::Pissa => {
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
        let initial = (c.init == LoraInit::Pissa).then(|| pissa_init(linear, &a, &b, c));
        linear.lora = Some(Box::new(Lora {
            a,
            b,
            scale: c.scale(),
            dropout: c.dropout,
            magnitude,
            initial,
            e: None,
            switch: switch.clone(),
        }));
    }
    Ok((adapters, switch))
}

/// PiSSA, as PEFT computes it: with W = U S Vᵀ (out × in, in fp32), A = √(S_r/scale) V_rᵀ and
/// B = U_r √(S_r/scale), so `scale·BA` is W's best rank-r part; the frozen weight keeps the
/// residual `W − scale·BA`. Returns (A₀, B₀), the values the adapter starts from.
fn pissa_init(linear: &mut Linear, a: &Tensor, b: &Tensor, c: &LoraConfig) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let w = linear.weight_out_in().to_kind(Kind::Float);
        // torch.svd is linalg.svd(full_matrices=False) returning V, not Vᵀ (tch's linalg_svd
        // always passes a `driver`, which the CPU refuses).
        let (u, s, v) = w.svd(true, true);
        let vh = v.tr();
        let root = (s.narrow(0, 0, c.r) / c.scale()).sqrt();
        let a0 = vh.narrow(0, 0, c.r) * root.unsqueeze(1);
        let b0 = u.narrow(1, 0, c.r) * root.unsqueeze(0);
        let residual = (&w - b0.matmul(&a0) * c.scale()).to_kind(linear.weight.kind());
        let residual = if linear.conv1d {
            residual.tr().contiguous()
        } else {
            residual
        };
        linear.weight.shallow_clone().copy_(&residual);
        a.shallow_clone().copy_(&a0);
        b.shallow_clone().copy_(&b0);
        (a0, b0)
    })
}
