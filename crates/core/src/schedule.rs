//! Optimisation settings shared by every training stage, and the learning-rate schedule.

use serde::{Deserialize, Serialize};

use crate::optim::AdamWConfig;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup, then cosine decay from `lr` to `min_lr` at the last step.
    #[default]
    Cosine,
    /// Linear warmup, then `lr` throughout.
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSettings {
    /// Peak learning rate.
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0 disables clipping; the norm is logged anyway).
    pub grad_clip: f64,
    /// Micro-batches accumulated into one optimizer step.
    pub grad_accum: u64,
    /// AdamW's moments between steps: `fp32` (default) or `bf16` (half the optimizer state).
    pub moments: crate::optim::Moments,
}

impl Default for OptimSettings {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            grad_accum: 1,
            moments: crate::optim::Moments::Fp32,
        }
    }
}

impl OptimSettings {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            moments: self.moments,
        }
    }

    /// Learning rate for optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.min_lr
                    + 0.5
                        * (1.0 + (std::f64::consts::PI * progress).cos())
                        * (self.lr - self.min_lr)
            }
        }
    }

    /// Range checks; an error names the key inside `optim:` and what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.lr) {
            return Err(("lr", format!("must be a positive number, got {}", self.lr)));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(("min_lr", format!("must be in [0, lr], got {}", self.min_lr)));
        }
        if self.grad_accum == 0 {
            return Err(("grad_accum", "must be at least 1".into()));
        }
        for (key, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err((key, format!("must be in [0, 1), got {b}")));
            }
        }
        if !finite_pos(self.eps) {
            return Err((
                "eps",
                format!("must be a positive number, got {}", self.eps),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err((
                "weight_decay",
                format!("must be ≥ 0, got {}", self.weight_decay),
            ));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err((
                "grad_clip",
                format!("must be ≥ 0 (0 disables clipping), got {}", self.grad_clip),
            ));
        }
        Ok(())
    }
}

/// Checks an `optim:` block of a stage config, the error naming the key and its line.
pub fn check_optim<T>(
    cfg: &temper_stage::ConfigFile<T>,
    field: &str,
    optim: &OptimSettings,
) -> Result<(), temper_stage::StageError> {
    optim
        .validate()
        .map_err(|(key, message)| cfg.error(&format!("{field}.{key}"), message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min_lr() {
        let s = OptimSettings {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            ..Default::default()
        };
        let lrs: Vec<f64> = (0..14).map(|i| s.lr_at(i, 14)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!((lrs[9] - (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * 0.5).cos()))).abs() < 1e-12);
        assert!((s.lr_at(14, 14) - 0.1).abs() < 1e-12, "ends at min_lr");
        let c = OptimSettings {
            schedule: Schedule::Constant,
            ..s
        };
        assert_eq!(c.lr_at(10, 14), 1.0);
    }
}
