//! AdaLoRA (Zhang et al., 2023), as Hugging Face PEFT computes it.
//!
//! Each adapted layer gets an SVD-shaped update `P Λ Q`: `lora_A` (r, in) the right singular
//! vectors, `lora_E` (r, 1) the singular values, `lora_B` (out, r) the left ones; the layer adds
//! `x (A ⊙ E)ᵀ Bᵀ · alpha / (init_r + 1e-5)`. During training the rank budget — the number of
//! (A row, E entry, B column) triplets left alive over all layers — falls from `init_r` per
//! layer to `target_r` per layer on a cubic schedule between `tinit` and `total − tfinal`
//! updates. Every `delta_t` updates the triplets with the lowest importance are switched off by
//! zeroing their singular value; importance is sensitivity |p · ∂L/∂p| smoothed by an EMA
//! (`beta1`) times its uncertainty (an EMA, `beta2`, of its deviation), summed over a triplet (E's
//! entry plus the means over A's row and B's column). An orthogonality regulariser
//! `‖AAᵀ − I‖_F`, `‖BᵀB − I‖_F` (mean over matrices, times `orth_reg_weight`) keeps P and Q
//! near-orthogonal. After `total − tfinal` the allocation is final and is reapplied after every
//! update. Saved as PEFT's `ADALORA` files, pruned triplets dropped (`rank_pattern`).
//!
//! The running statistics and the allocation live in a store of their own (`running.*`), kept
//! in the stage's `state/` with the trainable tensors, so a resumed run continues bit for bit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::config::bad;
use super::PeftError;
use crate::model::Transformer;

/// Frozen variables whose names start with this are running statistics: the state keeps them.
pub const RUNNING: &str = "running";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaloraConfig {
    /// Rank each adapted layer starts with (default 12).
    pub init_r: i64,
    /// Average rank per layer at the end of the budget schedule (default 8).
    pub target_r: i64,
    /// Scale numerator: the update is scaled by alpha / init_r (PEFT's `lora_alpha`, default 8).
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Option<Vec<String>>,
    pub layers: Option<Vec<usize>>,
    /// Updates at the full budget before pruning starts.
    pub tinit: usize,
    /// Updates at the final budget after pruning ends.
    pub tfinal: usize,
    /// Prune every `delta_t` updates during the schedule (PEFT's `deltaT`).
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    pub beta2: f64,
    pub orth_reg_weight: f64,
    /// Updates the schedule spans; default: the stage's own count of optimizer updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_step: Option<usize>,
}

impl AdaloraConfig {
    /// `alpha / (init_r + 1e-5)`: PEFT divides by the layer's starting rank (`ranknum`), which
    /// pruning does not change.
    pub fn scale(&self) -> f64 {
        self.alpha / (self.init_r as f64 + 1e-5)
    }

    pub(crate) fn check(&self) -> Result<(), PeftError> {
        if self.init_r <= 0 {
            return Err(bad("init_r", "must be a positive rank"));
        }
        if self.target_r <= 0 || self.target_r >= self.init_r {
            return Err(bad(
                "target_r",
                format!("must be in 1..{} (below init_r)", self.init_r),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad("dropout", "must be in [0, 1)"));
        }
        for (key, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(bad(key, "must be in (0, 1)"));
            }
        }
        if self.orth_reg_weight < 0.0 {
            return Err(bad("orth_reg_weight", "must be at least 0"));
        }
        if self.delta_t == 0 {
            return Err(bad("delta_t", "must be at least 1"));
        }
        Ok(())
    }
}

/// The budget at update `step` (0-based) and whether to prune there: PEFT's
/// `RankAllocator.budget_schedule`.
pub fn budget_schedule(
    step: usize,
    init_budget: usize,
    target_budget: usize,
    c: &AdaloraConfig,
    total: usize,
) -> (usize, bool) {
    if step <= c.tinit {
        (init_budget, false)
    } else if step > total - c.tfinal {
        (target_budget, true)
    } else {
        let span = (total - c.tfinal - c.tinit) as f64;
        let mul = 1.0 - (step - c.tinit) as f64 / span;
        let budget = (init_budget - target_budget) as f64 * mul.powi(3) + target_budget as f64;
        (budget as usize, step.is_multiple_of(c.delta_t))
    }
}

/// One adapted layer's factors and their running statistics.
struct Triplet {
    module: String,
    /// A, B, E (the trained tensors) with (EMA of sensitivity, EMA of uncertainty) each.
    params: [(Tensor, Tensor, Tensor); 3],
    /// 1 where the triplet is alive, (r, 1).
    mask: Tensor,
}

/// The rank allocator of one model's AdaLoRA adapters.
pub struct Allocator {
    config: AdaloraConfig,
    total: Option<usize>,
    layers: Vec<Triplet>,
    pub(crate) running: VarStore,
    /// Updates done so far (a tensor so that the state keeps it).
    step: Tensor,
    /// 1 once a budget has been allocated (PEFT's `rank_pattern` is set).
    allocated: Tensor,
}

impl Allocator {
    /// `factors`: (module path, A, B, E) of every adapted layer.
    pub(crate) fn new(
        config: &AdaloraConfig,
        device: Device,
        factors: Vec<(String, Tensor, Tensor, Tensor)>,
    ) -> Self {
        let running = VarStore::new(device);
        let root = running.root().sub(RUNNING);
        // Variable names cannot hold dots: one path level per part of the module's name.
        let under = |name: &str| name.split('.').fold(root.clone(), |p, part| p.sub(part));
        let layers = factors
            .into_iter()
            .map(|(module, a, b, e)| {
                let at = under(&module);
                let stats = |p: Tensor, which: &str| {
                    let ema = at.sub(which).zeros_no_train("sensitivity", &p.size());
                    let unc = at.sub(which).zeros_no_train("uncertainty", &p.size());
                    (p, ema, unc)
                };
                let mask = at.ones_no_train("mask", &e.size());
                Triplet {
                    params: [stats(a, "lora_A"), stats(b, "lora_B"), stats(e, "lora_E")],
                    mask,
                    module,
                }
            })
            .collect();
        let step = root.zeros_no_train("step", &[]);
        let allocated = root.zeros_no_train("allocated", &[]);
        Self {
            config: config.clone(),
            total: config.total_step,
            layers,
            running,
            step,
            allocated,
        }
    }

    /// Sets the schedule's length to the stage's update count unless `total_step` was given.
    pub fn plan(&mut self, updates: usize) -> Result<(), PeftError> {
        let total = *self.total.get_or_insert(updates);
        let c = &self.config;
        if c.tinit + c.tfinal >= total {
            return Err(bad(
                "tinit",
                format!(
                    "tinit ({}) + tfinal ({}) leaves no updates for pruning out of {total}; lower them or train longer",
                    c.tinit, c.tfinal
                ),
            ));
        }
        Ok(())
    }

    fn init_budget(&self) -> usize {
        self.layers.iter().map(|l| l.mask.size()[0] as usize).sum()
    }

    fn target_budget(&self) -> usize {
        self.config.target_r as usize * self.layers.len()
    }

    /// PEFT's `AdaLoraModel.update_and_allocate`, after an optimizer step and before the
    /// gradients are cleared.
    pub fn after_update(&self) -> Result<(), PeftError> {
        let total = self.total.ok_or_else(|| {
            bad(
                "method",
                "adalora: the stage did not plan its updates (a bug in the stage)",
            )
        })?;
        let step = self.step.double_value(&[]) as usize;
        let last = total - self.config.tfinal;
        tch::no_grad(|| {
            if step < last {
                self.update_importance();
                let (budget, prune) = self.schedule(step, total);
                if prune {
                    self.mask_to_budget(budget);
                }
            } else if step == last {
                self.mask_to_budget(self.schedule(step, total).0);
            } else {
                self.reapply_mask();
            }
            let _ = self.step.shallow_clone().g_add_scalar_(1.0);
        });
        Ok(())
    }

    fn schedule(&self, step: usize, total: usize) -> (usize, bool) {
        budget_schedule(
            step,
            self.init_budget(),
            self.target_budget(),
            &self.config,
            total,
        )
    }

    fn update_importance(&self) {
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        for layer in &self.layers {
            for (p, ema, unc) in &layer.params {
                let grad = p.grad();
                let ipt = if grad.defined() {
                    (p * grad).abs()
                } else {
                    p.zeros_like()
                };
                let new_ema = ema * b1 + &ipt * (1.0 - b1);
                let new_unc = unc * b2 + (&ipt - &new_ema).abs() * (1.0 - b2);
                ema.shallow_clone().copy_(&new_ema);
                unc.shallow_clone().copy_(&new_unc);
            }
        }
    }

    /// Importance of each triplet of a layer, (r,).
    fn triplet_scores(layer: &Triplet) -> Tensor {
        let score = |i: usize| &layer.params[i].1 * &layer.params[i].2;
        let a = score(0).mean_dim(1, true, Kind::Float);
        let b = score(1).mean_dim(0, false, Kind::Float).view([-1, 1]);
        let ab = Tensor::cat(&[a, b], 1).sum_dim_intlist(1, false, Kind::Float);
        score(2).view([-1]) + ab
    }

    /// Switches off the `init budget − budget` least important triplets (ties at the
    /// threshold go too, as in PEFT).
    fn mask_to_budget(&self, budget: usize) {
        let scores: Vec<Tensor> = self.layers.iter().map(Self::triplet_scores).collect();
        let k = (self.init_budget() - budget) as i64;
        if k <= 0 {
            return;
        }
        let threshold = Tensor::cat(&scores, 0).kthvalue(k, 0, false).0;
        for (layer, score) in self.layers.iter().zip(&scores) {
            let off = score.le_tensor(&threshold).view([-1, 1]);
            let _ = layer.params[2].0.shallow_clone().masked_fill_(&off, 0.0);
            layer
                .mask
                .shallow_clone()
                .copy_(&off.logical_not().to_kind(Kind::Float));
        }
        let _ = self.allocated.shallow_clone().fill_(1.0);
    }

    fn reapply_mask(&self) {
        for layer in &self.layers {
            let off = layer.mask.eq(0.0);
            let _ = layer.params[2].0.shallow_clone().masked_fill_(&off, 0.0);
        }
    }

    /// `orth_reg_weight · mean ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F`, to add to the loss; None at weight 0.
    pub fn regulariser(&self) -> Option<Tensor> {
        if self.config.orth_reg_weight == 0.0 || self.layers.is_empty() {
            return None;
        }
        let mut sum: Option<Tensor> = None;
        for layer in &self.layers {
            let (a, b) = (&layer.params[0].0, &layer.params[1].0);
            for cov in [a.matmul(&a.tr()), b.tr().matmul(b)] {
                let n = cov.size()[0];
                let eye = Tensor::eye(n, (cov.kind(), cov.device()));
                let norm = (cov - eye).square().sum(Kind::Float).sqrt();
                sum = Some(match sum {
                    Some(s) => s + norm,
                    None => norm,
                });
            }
        }
        let n = 2.0 * self.layers.len() as f64;
        sum.map(|s| s / n * self.config.orth_reg_weight)
    }

    /// Which triplets are alive per layer (`<module>.lora_E` → flags), once a budget was
    /// allocated: PEFT's `rank_pattern`.
    pub fn rank_pattern(&self) -> Option<BTreeMap<String, Vec<bool>>> {
        if self.allocated.double_value(&[]) == 0.0 {
            return None;
        }
        Some(
            self.layers
                .iter()
                .map(|l| {
                    let flags = Vec::<f32>::try_from(l.mask.view([-1]).to_device(Device::Cpu))
                        .expect("mask is a float vector");
                    (
                        format!("{}.lora_E", l.module),
                        flags.into_iter().map(|f| f != 0.0).collect(),
                    )
                })
                .collect(),
        )
    }

    /// Marks a loaded allocation: `alive[i]` triplets of each layer, in order.
    pub(crate) fn set_loaded_ranks(&self, ranks: &BTreeMap<String, usize>) {
        tch::no_grad(|| {
            for layer in &self.layers {
                let r = layer.mask.size()[0];
                let alive = ranks.get(&layer.module).copied().unwrap_or(r as usize) as i64;
                let mask = Tensor::arange(r, (Kind::Float, layer.mask.device()))
                    .lt(alive)
                    .to_kind(Kind::Float)
                    .view([-1, 1]);
                layer.mask.shallow_clone().copy_(&mask);
            }
            let _ = self.allocated.shallow_clone().fill_(1.0);
        });
    }

    pub fn config(&self) -> &AdaloraConfig {
        &self.config
    }

    pub fn total(&self) -> Option<usize> {
        self.total
    }

    /// Live triplets over all layers.
    pub fn live_rank(&self) -> i64 {
        self.layers
            .iter()
            .map(|l| l.mask.sum(Kind::Float).double_value(&[]) as i64)
            .sum()
    }
}

/// Names `model`'s targeted layers for [`Allocator::new`].
pub(crate) fn factors_of(model: &Transformer) -> Vec<(String, Tensor, Tensor, Tensor)> {
    model
        .block_linears()
        .iter()
        .filter_map(|(_, l)| {
            let lora = l.lora.as_ref()?;
            let e = lora.e.as_ref()?;
            Some((
                l.module.clone(),
                lora.a.shallow_clone(),
                lora.b.shallow_clone(),
                e.shallow_clone(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tinit: usize, tfinal: usize, delta_t: usize) -> AdaloraConfig {
        AdaloraConfig {
            init_r: 6,
            target_r: 2,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: None,
            layers: None,
            tinit,
            tfinal,
            delta_t,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
        }
    }

    #[test]
    fn the_budget_falls_cubically_between_tinit_and_total_minus_tfinal() {
        // 4 layers: 24 triplets down to 8, over 8 updates, tinit 1, tfinal 2, every 2nd.
        let c = config(1, 2, 2);
        let at = |step| budget_schedule(step, 24, 8, &c, 8);
        assert_eq!(at(0), (24, false));
        assert_eq!(at(1), (24, false));
        // mul = 1 − (2−1)/5 = 0.8: 16·0.512 + 8 = 16.192 → 16, pruned (2 % 2 = 0)
        assert_eq!(at(2), (16, true));
        // mul = 0.6: 16·0.216 + 8 = 11.456 → 11, not a pruning step
        assert_eq!(at(3), (11, false));
        // mul = 0.4: 16·0.064 + 8 = 9.024 → 9
        assert_eq!(at(4), (9, true));
        // mul = 0.2: 16·0.008 + 8 = 8.128 → 8, odd step
        assert_eq!(at(5), (8, false));
        // the last step of the schedule reaches the target exactly; after it, final
        assert_eq!(at(6), (8, true));
        assert_eq!(at(7), (8, true));
    }

    #[test]
    fn pruning_keeps_the_most_important_triplets_and_ties_go() {
        let device = Device::Cpu;
        // One layer, r = 3: A (3, 2), B (2, 3), E (3, 1).
        let a = Tensor::zeros([3, 2], (Kind::Float, device));
        let b = Tensor::zeros([2, 3], (Kind::Float, device));
        let e = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]);
        let mut c = config(0, 0, 1);
        c.init_r = 3;
        c.target_r = 1;
        let alloc = Allocator::new(&c, device, vec![("m".into(), a, b, e.shallow_clone())]);
        let set = |i: usize, sens: &[f32], shape: &[i64]| {
            let t = Tensor::from_slice(sens).view(shape);
            alloc.layers[0].params[i].1.shallow_clone().copy_(&t);
            let _ = alloc.layers[0].params[i].2.shallow_clone().fill_(1.0);
        };
        set(0, &[0.1, 0.3, 0.2, 0.2, 0.0, 0.0], &[3, 2]);
        set(1, &[0.0, 0.3, 0.0, 0.0, 0.3, 0.4], &[2, 3]);
        set(2, &[0.5, 0.1, 0.9], &[3, 1]);
        // Scores by hand (uncertainty 1): E's entry plus the mean over A's row and over B's
        // column. A's row means (0.2, 0.2, 0), B's column means (0, 0.3, 0.2), E (0.5, 0.1,
        // 0.9): triplet 0 = 0.5 + 0.2 + 0 = 0.7, 1 = 0.1 + 0.2 + 0.3 = 0.6, 2 = 0.9 + 0 + 0.2.
        let scores = Allocator::triplet_scores(&alloc.layers[0]);
        let got = Vec::<f32>::try_from(scores).unwrap();
        for (g, want) in got.iter().zip([0.7f32, 0.6, 1.1]) {
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }
        // Budget 1 of 3: the two lowest (0.6, 0.7) go, their singular values zeroed.
        tch::no_grad(|| alloc.mask_to_budget(1));
        assert_eq!(Vec::<f32>::try_from(e.view([-1])).unwrap(), [0.0, 0.0, 3.0]);
        assert_eq!(
            alloc.rank_pattern().unwrap()["m.lora_E"],
            vec![false, false, true]
        );
        assert_eq!(alloc.live_rank(), 1);
    }
}
