//! AdamW with decay / no-decay parameter groups, whose moments are plain tensors we own, so the
//! full optimiser state can be checkpointed and resumed (tch's own optimisers hide theirs).
//! The update itself is libtorch's fused `_fused_adamw_` kernel (one call per group, CPU and
//! CUDA), which matches `torch.optim.AdamW`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::ffi;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to matrices and embeddings (dim ≥ 2) only; biases and norm gains never decay.
    pub weight_decay: f64,
    /// The precision the two moments are kept in between steps.
    pub moments: Moments,
}

/// How AdamW keeps its moments. `bf16` halves the optimizer state (8 → 4 bytes per trained
/// parameter); each step computes in fp32 and rounds the moments back to bf16 (8 bits of
/// mantissa: updates much smaller than a moment are lost, as with any low-precision state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Moments {
    #[default]
    Fp32,
    Bf16,
}

impl Moments {
    fn kind(self) -> Kind {
        match self {
            Moments::Fp32 => Kind::Float,
            Moments::Bf16 => Kind::BFloat16,
        }
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            moments: Moments::Fp32,
        }
    }
}

struct Param {
    name: String,
    value: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor, // fp32 scalar on the parameter's device, as the fused kernel wants
}

pub struct AdamW {
    pub config: AdamWConfig,
    decay: Vec<Param>,
    no_decay: Vec<Param>,
}

impl AdamW {
    /// Optimises every trainable variable of `vs`, grouped by rank, in name order.
    pub fn new(vs: &VarStore, config: AdamWConfig) -> Self {
        Self::over(&[("", vs)], config)
    }

    /// One optimizer over several models (PPO's shared actor–critic optimizer); each model's
    /// parameter names get its prefix, so the saved state stays unambiguous.
    pub fn over(models: &[(&str, &VarStore)], config: AdamWConfig) -> Self {
        let vars: BTreeMap<String, Tensor> = models
            .iter()
            .flat_map(|(prefix, vs)| {
                vs.variables()
                    .into_iter()
                    .filter(|(_, t)| t.requires_grad())
                    .map(move |(n, t)| (format!("{prefix}{n}"), t))
            })
            .collect();
        let (mut decay, mut no_decay) = (Vec::new(), Vec::new());
        for (name, value) in vars {
            // Made in their own precision: no full-size fp32 temporaries.
            let moment = || Tensor::zeros(value.size(), (config.moments.kind(), value.device()));
            let param = Param {
                exp_avg: moment(),
                exp_avg_sq: moment(),
                step: Tensor::zeros([], (Kind::Float, value.device())),
                name,
                value,
            };
            if param.value.dim() >= 2 {
                decay.push(param)
            } else {
                no_decay.push(param)
            }
        }
        Self {
            config,
            decay,
            no_decay,
        }
    }

    fn params(&self) -> impl Iterator<Item = &Param> {
        self.decay.iter().chain(&self.no_decay)
    }

    /// One update at learning rate `lr` from the gradients accumulated on the parameters.
    /// Parameters without a gradient (unused in this step) are left untouched.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let c = self.config.clone();
        fused_step(&self.decay, lr, &c, c.weight_decay)?;
        fused_step(&self.no_decay, lr, &c, 0.0)
    }

    /// The whole update of a training step: clips the gradients to `grad_clip` (0 disables
    /// clipping; the norm is measured anyway), steps at `lr`, clears the gradients. Returns the
    /// gradient norm before clipping.
    pub fn update(&mut self, grad_clip: f64, lr: f64) -> Result<f64> {
        self.update_then(grad_clip, lr, || Ok(()))
    }

    /// [`AdamW::update`] with `after_step` run between the step and the clearing of the
    /// gradients (AdaLoRA's importance scores read the updated weights and their gradients).
    pub fn update_then(
        &mut self,
        grad_clip: f64,
        lr: f64,
        after_step: impl FnOnce() -> std::result::Result<(), crate::peft::PeftError>,
    ) -> Result<f64> {
        let norm = self.clip_grad_norm(if grad_clip > 0.0 {
            grad_clip
        } else {
            f64::INFINITY
        });
        self.step(lr)?;
        after_step().map_err(|e| CoreError::InvalidModel(format!("{}: {}", e.field, e.message)))?;
        self.zero_grad();
        Ok(norm)
    }

    /// The gradients of the parameters that have one, in the optimizer's fixed order (the
    /// same on every rank of a data-parallel stage, for averaging).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params()
            .map(|p| p.value.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// Gives every parameter a gradient, zeros where backward reached none (a data-parallel
    /// rank whose share of a short last batch was empty), so all ranks all-reduce the same
    /// tensors.
    pub fn ensure_gradients(&self) {
        let missing: Vec<Tensor> = self
            .params()
            .filter(|p| !p.value.grad().defined())
            .map(|p| (&p.value * 0.0).sum(Kind::Float))
            .collect();
        if !missing.is_empty() {
            Tensor::stack(&missing, 0).sum(Kind::Float).backward();
        }
    }

    /// The parameters it updates, in its fixed order.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params().map(|p| p.value.shallow_clone()).collect()
    }

    pub fn zero_grad(&mut self) {
        for p in self.decay.iter_mut().chain(self.no_decay.iter_mut()) {
            p.value.zero_grad();
        }
    }

    /// The global L2 norm of all gradients, before clipping; scales them down to `max_norm`
    /// when above it (as `torch.nn.utils.clip_grad_norm_`). One host sync, for the log.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self
            .params()
            .map(|p| p.value.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.norm().to_kind(Kind::Float))
            .collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        tch::no_grad(|| {
            for mut g in grads {
                let _ = g.f_mul_(&coef);
            }
        });
        total.double_value(&[])
    }

    /// The moments and step counts, named `<kind>.<parameter>`, for a training-state file.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params()
            .flat_map(|p| {
                [
                    (format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()),
                    (
                        format!("exp_avg_sq.{}", p.name),
                        p.exp_avg_sq.shallow_clone(),
                    ),
                    (format!("step.{}", p.name), p.step.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Restores what [`Self::state_tensors`] saved; every entry must be present.
    pub fn load_state(&mut self, saved: &BTreeMap<String, Tensor>) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in self.decay.iter_mut().chain(self.no_decay.iter_mut()) {
                for (kind, dst) in [
                    ("exp_avg", &mut p.exp_avg),
                    ("exp_avg_sq", &mut p.exp_avg_sq),
                    ("step", &mut p.step),
                ] {
                    let key = format!("{kind}.{}", p.name);
                    let src = saved
                        .get(&key)
                        .ok_or_else(|| CoreError::OptimizerState(format!("lacks `{key}`")))?;
                    dst.f_copy_(src)?;
                }
            }
            Ok(())
        })
    }
}

fn fused_step(params: &[Param], lr: f64, c: &AdamWConfig, weight_decay: f64) -> Result<()> {
    let live: Vec<(&Param, Tensor)> = params
        .iter()
        .map(|p| (p, p.value.grad()))
        .filter(|(_, g)| g.defined())
        .collect();
    if live.is_empty() {
        return Ok(());
    }
    if c.moments == Moments::Bf16 {
        // One parameter at a time, its moments widened to fp32 for the kernel and rounded
        // back after: the fp32 copies of only one parameter exist at once.
        for (p, _) in &live {
            let wide = Param {
                name: String::new(),
                value: p.value.shallow_clone(),
                exp_avg: p.exp_avg.to_kind(Kind::Float),
                exp_avg_sq: p.exp_avg_sq.to_kind(Kind::Float),
                step: p.step.shallow_clone(),
            };
            let fp32 = AdamWConfig {
                moments: Moments::Fp32,
                ..c.clone()
            };
            fused_step(std::slice::from_ref(&wide), lr, &fp32, weight_decay)?;
            tch::no_grad(|| {
                p.exp_avg.shallow_clone().copy_(&wide.exp_avg);
                p.exp_avg_sq.shallow_clone().copy_(&wide.exp_avg_sq);
            });
        }
        return Ok(());
    }
    let ptrs = |f: &dyn Fn(&Param) -> *const torch_sys::C_tensor| -> Vec<_> {
        live.iter().map(|(p, _)| f(p)).collect()
    };
    let values = ptrs(&|p| p.value.as_ptr());
    let exp_avgs = ptrs(&|p| p.exp_avg.as_ptr());
    let exp_avg_sqs = ptrs(&|p| p.exp_avg_sq.as_ptr());
    let steps = ptrs(&|p| p.step.as_ptr());
    let grads: Vec<_> = live.iter().map(|(_, g)| g.as_ptr()).collect();
    // SAFETY: every pointer is a live tch tensor borrowed for the duration of the call; the
    // kernel updates params, moments and steps in place and keeps no reference.
    let rc = unsafe {
        ffi::temper_fused_adamw(
            values.as_ptr(),
            grads.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            steps.as_ptr(),
            live.len() as i32,
            lr,
            c.beta1,
            c.beta2,
            weight_decay,
            c.eps,
        )
    };
    if rc != 0 {
        return Err(CoreError::Native(ffi::last_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with one (6, 10) matrix and one bias, the same for every seed-0 call.
    fn store() -> VarStore {
        tch::manual_seed(0);
        let vs = VarStore::new(tch::Device::Cpu);
        let _ = vs.root().randn("w", &[6, 10], 0.0, 1.0);
        let _ = vs.root().randn("b", &[10], 0.0, 1.0);
        vs
    }

    /// `steps` updates on a fixed quadratic loss whose gradient changes as the weights move.
    fn train(vs: &VarStore, opt: &mut AdamW, steps: usize) {
        let target = Tensor::linspace(-1.0, 1.0, 10, (Kind::Float, tch::Device::Cpu));
        for _ in 0..steps {
            let vars = vs.variables();
            let loss = (&vars["w"] - &target).square().sum(Kind::Float)
                + (&vars["b"] * 3.0 - &target).square().sum(Kind::Float);
            loss.backward();
            opt.update(0.0, 1e-2).unwrap();
        }
    }

    #[test]
    fn bf16_moments_track_fp32_adamw_and_resume_exactly() {
        let bf16 = AdamWConfig {
            moments: Moments::Bf16,
            ..AdamWConfig::default()
        };
        let (a, b) = (store(), store());
        let (mut wide, mut narrow) = (
            AdamW::new(&a, AdamWConfig::default()),
            AdamW::new(&b, bf16.clone()),
        );
        train(&a, &mut wide, 30);
        train(&b, &mut narrow, 30);
        for (_, t) in narrow
            .state_tensors()
            .iter()
            .filter(|(k, _)| !k.starts_with("step"))
        {
            assert_eq!(t.kind(), Kind::BFloat16);
        }
        // 30 steps of lr 1e-2 move each weight by up to 0.3; bf16 moments stay within 1 %.
        let start = store().variables();
        for (name, w) in a.variables() {
            let moved = (&w - &start[&name]).abs().max().double_value(&[]);
            let d = (&w - &b.variables()[&name]).abs().max().double_value(&[]);
            assert!(
                moved > 0.1 && d < 0.01 * moved,
                "{name}: moved {moved}, bf16 off by {d}"
            );
        }
        // The saved state (bf16 moments) resumes to the same bytes as carrying on.
        let saved: BTreeMap<String, Tensor> = narrow
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let c = store();
        tch::no_grad(|| {
            for (name, mut t) in c.variables() {
                t.copy_(&b.variables()[&name]);
            }
        });
        let mut resumed = AdamW::new(&c, bf16);
        resumed.load_state(&saved).unwrap();
        train(&b, &mut narrow, 5);
        train(&c, &mut resumed, 5);
        for (name, w) in b.variables() {
            assert!(
                w.equal(&c.variables()[&name]),
                "{name} differs after resuming"
            );
        }
    }
}
