//! One LoRA (or DoRA) adapter on a dense layer, computed as Hugging Face PEFT computes it.
//!
//! LoRA adds `scale · B A x` to the frozen layer's output, with A (r, in), B (out, r) and
//! `scale = alpha / r` (`alpha / √r` for rsLoRA). DoRA (weight-decomposed LoRA) also learns a
//! magnitude per output row: the adapted weight is `m · (W + scale·BA) / ‖W + scale·BA‖`, whose
//! row norms are detached from the graph as in the paper (§4.3) and in PEFT. GPT-2's Conv1D
//! keeps its weight as (in, out) — PEFT's `fan_in_fan_out` — so the norms and the merge work on
//! the transposed weight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::layers::Linear;

/// Switches shared by every adapter of one model: off for the frozen reference (PPO, DPO run
/// the same weights with adapters disabled), and whether dropout is live.
#[derive(Debug)]
pub struct Switch {
    enabled: AtomicBool,
    training: AtomicBool,
}

impl Switch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(false),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed)
    }

    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed)
    }
}

pub struct Lora {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// DoRA's magnitude, one per output row.
    pub magnitude: Option<Tensor>,
    /// PiSSA: the adapter's starting (A₀, B₀), which the residual base weight lacks.
    pub initial: Option<(Tensor, Tensor)>,
    /// AdaLoRA: the singular values (r, 1); the update is `B (A ⊙ E)`.
    pub e: Option<Tensor>,
    pub switch: Arc<Switch>,
}

impl Lora {
    pub fn active(&self) -> bool {
        self.switch.enabled()
    }

    /// `y` is the frozen layer's output for `x` (bias included).
    pub(crate) fn forward(&self, x: &Tensor, y: Tensor, layer: &Linear) -> Tensor {
        let dropped = self.dropout > 0.0 && self.switch.training();
        let xd = if dropped {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let delta = xd
            .linear::<&Tensor>(&self.right(), None)
            .linear::<&Tensor>(&self.b, None)
            * self.scale;
        let Some(m) = &self.magnitude else {
            return y + delta;
        };
        let w = layer.weight_out_in();
        let norm = self.adapted_norm(&w).detach();
        let s = (m / norm).to_kind(y.kind()); // (out,)
                                              // W x without the bias: from `y` when the input was not dropped, else recomputed on
                                              // the dropped input, as PEFT does.
        let base = if dropped {
            xd.linear::<&Tensor>(&w, None)
        } else {
            match &layer.bias {
                Some(b) => &y - b,
                None => y.shallow_clone(),
            }
        };
        y + (&s - 1.0) * base + s * delta
    }

    /// The layer's output with the adapter off: the frozen layer, plus what PiSSA took out of
    /// its weight.
    pub(crate) fn bypassed(&self, x: &Tensor, y: Tensor) -> Tensor {
        match &self.initial {
            Some((a0, b0)) => {
                let kind = y.kind();
                y + (x.linear::<&Tensor>(a0, None).linear::<&Tensor>(b0, None) * self.scale)
                    .to_kind(kind)
            }
            None => y,
        }
    }

    /// A, or AdaLoRA's `A ⊙ E`.
    fn right(&self) -> Tensor {
        match &self.e {
            Some(e) => &self.a * e,
            None => self.a.shallow_clone(),
        }
    }

    /// `scale · B A` in (out, in).
    pub fn delta_weight(&self) -> Tensor {
        self.b.matmul(&self.right()) * self.scale
    }

    /// Row norms of `W + scale·BA` for `w` in (out, in).
    pub fn adapted_norm(&self, w: &Tensor) -> Tensor {
        (w.to_kind(Kind::Float) + self.delta_weight().to_kind(Kind::Float))
            .square()
            .sum_dim_intlist(1, false, Kind::Float)
            .sqrt()
    }

    /// The merged weight in the layer's own layout.
    pub(crate) fn merged_weight(&self, layer: &Linear) -> Tensor {
        let w = layer.weight_out_in();
        let mut merged = w.to_kind(Kind::Float) + self.delta_weight().to_kind(Kind::Float);
        if let Some(m) = &self.magnitude {
            let norm = self.adapted_norm(&w);
            merged *= (m.to_kind(Kind::Float) / norm).unsqueeze(1);
        }
        let merged = merged.to_kind(layer.weight.kind());
        if layer.conv1d {
            merged.tr().contiguous()
        } else {
            merged
        }
    }
}
