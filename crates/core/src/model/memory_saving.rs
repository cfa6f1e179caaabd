//! Training a causal LM in less memory, with the gradients of the plain forward and backward:
//! - **activation checkpointing**: the forward runs block by block without a graph, keeping
//!   only each block's input (B × T × C); the backward recomputes one block at a time with its
//!   graph and sends the gradient of its input to the block below. One block's activations
//!   live at once instead of every block's, for about one more forward pass of compute.
//! - **chunked cross-entropy**: the vocabulary logits are computed, scored and backpropagated
//!   `loss_chunk` positions at a time, so the B × T × V logits (and their log-softmax and
//!   gradient) never exist whole — the largest tensors of a step at a large vocabulary.
//!
//! Both cut the graph at a tensor `x` and continue it later with `(x · g).sum().backward()`,
//! whose gradient with respect to `x` is `g`, the gradient the part above computed.

use tch::{Kind, Tensor};

use super::{AttnContext, Transformer};
use crate::attention_mask::{layout, Layout};
use crate::device::{with_autocast, Precision};
use crate::error::{CoreError, Result};
use crate::losses::{causal_lm_loss, token_logprobs};

/// How a training step saves memory (both off: the plain forward and backward).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemorySaving {
    /// Recompute each block's activations in the backward pass.
    pub checkpoint_blocks: bool,
    /// Score the vocabulary this many positions at a time (0: all at once).
    pub loss_chunk: usize,
}

impl MemorySaving {
    pub fn any(self) -> bool {
        self.checkpoint_blocks || self.loss_chunk > 0
    }

    /// Checks a stage's `activation_checkpointing` and `loss_chunk` against its `peft:`.
    pub fn check<T>(
        self,
        cfg: &temper_stage::ConfigFile<T>,
        peft: Option<&crate::peft::PeftConfig>,
    ) -> std::result::Result<(), temper_stage::StageError> {
        if let Some(why) = peft.and_then(|p| p.memory_saving_conflict(self.checkpoint_blocks)) {
            let key = if self.checkpoint_blocks {
                "activation_checkpointing"
            } else {
                "loss_chunk"
            };
            cfg.ensure(!self.any(), key, why)?;
        }
        Ok(())
    }
}

/// Continues the backward pass below a cut at `x`, whose gradient the part above left in `g`.
fn backward_into(x: &Tensor, g: &Tensor) {
    (x * g).sum(Kind::Float).backward();
}

/// `x` as the leaf of a new graph: the part above it backpropagates into its `.grad()`.
fn cut(x: &Tensor) -> Tensor {
    x.detach().set_requires_grad(true)
}

impl Transformer {
    /// The causal-LM loss of a batch, as [`Transformer::lm_loss`], backpropagated at once
    /// scaled by `scale` (gradients accumulate into the parameters); returns the loss value.
    pub fn lm_loss_backward(
        &self,
        ids: &Tensor,
        attention: Option<&Tensor>,
        loss_mask: &Tensor,
        precision: Precision,
        scale: f64,
        saving: MemorySaving,
    ) -> Result<f64> {
        if !saving.any() {
            let loss = self.lm_loss(ids, attention, loss_mask, precision)?;
            let value = loss.double_value(&[]);
            (loss * scale).backward();
            return Ok(value);
        }
        if self.virtual_tokens() > 0 || self.adapters.prefix_active() {
            return Err(CoreError::InvalidModel(
                "activation checkpointing and a chunked loss do not combine with prompt, \
                 P- or prefix tuning (virtual tokens); turn them off for this stage"
                    .into(),
            ));
        }
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let device = ids.device();
        let Layout {
            real,
            pos,
            attn_mask,
        } = layout(b, t, device, attention, None, self.config.sliding_window);
        let rope = self.rope.as_ref().map(|r| r.cos_sin(&pos));
        let mut ctx = AttnContext {
            mask: attn_mask,
            rope,
            cache: None,
        };
        let autocast = |f: &mut dyn FnMut() -> Tensor| with_autocast(device, precision, f);
        // The graph is cut and continued below; autocast is entered per segment.

        // Embeddings, with their graph (it holds only the ids).
        let x0 = autocast(&mut || {
            let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
            self.add_positions(&mut x, real.is_some(), &pos, 0, t);
            x
        })?;
        // The blocks: without a graph, keeping each input; or with it, cut at the top.
        let mut inputs = Vec::new();
        let top = if saving.checkpoint_blocks {
            let mut x = x0.detach();
            tch::no_grad(|| -> Result<()> {
                for i in 0..self.blocks.len() {
                    let y = autocast(&mut || self.block_forward(i, &x, &mut ctx))?;
                    inputs.push(std::mem::replace(&mut x, y));
                }
                Ok(())
            })?;
            x
        } else {
            let mut x = x0.shallow_clone();
            for i in 0..self.blocks.len() {
                x = autocast(&mut || self.block_forward(i, &x, &mut ctx))?;
            }
            x
        };
        // The head and the loss above the cut.
        let h = cut(&top);
        let out = autocast(&mut || self.norm_f.forward(&h))?;
        let value = if saving.loss_chunk > 0 {
            let o = cut(&out);
            let value = self.chunked_loss_backward(&o, ids, loss_mask, precision, scale, saving)?;
            backward_into(&out, &o.grad());
            value
        } else {
            let logits = with_autocast(device, precision, || self.logits(&out))??;
            let loss = causal_lm_loss(&logits, ids, loss_mask);
            let value = loss.double_value(&[]);
            (loss * scale).backward();
            value
        };
        // Down through the blocks: recomputed one at a time, or the graph kept from before.
        let mut g = h.grad();
        if saving.checkpoint_blocks {
            for i in (0..self.blocks.len()).rev() {
                let x = cut(&inputs[i]);
                let y = autocast(&mut || self.block_forward(i, &x, &mut ctx))?;
                backward_into(&y, &g);
                g = x.grad();
                inputs.truncate(i); // that block's input is no longer needed
            }
            backward_into(&x0, &g);
        } else {
            backward_into(&top, &g);
        }
        Ok(value)
    }

    /// The loss of hidden states `o` (B, T, C), `saving.loss_chunk` positions at a time, each
    /// chunk backpropagated into the LM head and `o` before the next is computed.
    fn chunked_loss_backward(
        &self,
        o: &Tensor,
        ids: &Tensor,
        loss_mask: &Tensor,
        precision: Precision,
        scale: f64,
        saving: MemorySaving,
    ) -> Result<f64> {
        let t = ids.size()[1];
        // Targets shifted left (the last position's is a dummy of weight 0), as causal_lm_loss.
        let pad = ids.narrow(1, 0, 1).zeros_like();
        let targets = Tensor::cat(&[&ids.narrow(1, 1, t - 1), &pad], 1);
        let weight = Tensor::cat(
            &[
                &loss_mask.narrow(1, 1, t - 1),
                &pad.to_kind(loss_mask.kind()),
            ],
            1,
        )
        .to_kind(Kind::Float);
        let n = weight.sum(Kind::Float).clamp_min(1.0);
        let chunk = saving.loss_chunk as i64;
        let mut total = 0.0;
        let mut start = 0;
        while start < t {
            let len = chunk.min(t - start);
            let logits = with_autocast(o.device(), precision, || {
                self.logits(&o.narrow(1, start, len))
            })??;
            let lp = token_logprobs(&logits, &targets.narrow(1, start, len));
            let loss = -(lp * weight.narrow(1, start, len)).sum(Kind::Float) / &n;
            total += loss.double_value(&[]);
            (loss * scale).backward();
            start += len;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, ModelConfig};
    use crate::model::Heads;

    /// Every parameter's gradient after `step`, in the VarStore's order.
    fn grads_after(vs: &tch::nn::VarStore, step: impl FnOnce()) -> Vec<(String, Tensor)> {
        for (_, mut v) in vs.variables() {
            v.zero_grad();
        }
        step();
        let mut out: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.grad().copy()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn checkpointed_and_chunked_gradients_equal_the_plain_ones() {
        tch::manual_seed(0);
        for arch in [Arch::Gpt2, Arch::Llama] {
            let config = ModelConfig {
                arch,
                vocab_size: 40,
                n_layer: 3,
                n_head: 2,
                d_model: 16,
                max_position: 16,
                n_kv_head: (arch == Arch::Llama).then_some(1),
                d_ff: Some(24),
                ..Default::default()
            };
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let heads = Heads {
                lm: true,
                score: false,
            };
            let model = Transformer::new(&vs.root(), &config, heads).unwrap();
            let ids = Tensor::randint(config.vocab_size, [3, 12], (Kind::Int64, tch::Device::Cpu));
            // Right padding on one row and a loss mask that skips a prompt.
            let attention = Tensor::ones([3, 12], (Kind::Int64, tch::Device::Cpu));
            let _ = attention.get(1).narrow(0, 9, 3).fill_(0);
            let loss_mask = attention.copy();
            let _ = loss_mask.narrow(1, 0, 4).fill_(0);
            let plain = grads_after(&vs, || {
                let loss = model
                    .lm_loss(&ids, Some(&attention), &loss_mask, Precision::Fp32)
                    .unwrap();
                (loss * 0.5).backward();
            });
            let expected = model
                .lm_loss(&ids, Some(&attention), &loss_mask, Precision::Fp32)
                .unwrap()
                .double_value(&[]);
            for saving in [
                MemorySaving {
                    checkpoint_blocks: true,
                    loss_chunk: 0,
                },
                MemorySaving {
                    checkpoint_blocks: false,
                    loss_chunk: 5,
                },
                MemorySaving {
                    checkpoint_blocks: true,
                    loss_chunk: 4,
                },
            ] {
                let mut value = 0.0;
                let got = grads_after(&vs, || {
                    value = model
                        .lm_loss_backward(
                            &ids,
                            Some(&attention),
                            &loss_mask,
                            Precision::Fp32,
                            0.5,
                            saving,
                        )
                        .unwrap();
                });
                assert!(
                    (value - expected).abs() < 1e-6,
                    "{saving:?}: loss {value} vs {expected}"
                );
                for ((name, a), (_, b)) in plain.iter().zip(&got) {
                    let d = (a - b).abs().max().double_value(&[]);
                    assert!(d < 1e-6, "{saving:?}: {name} gradient differs by {d:e}");
                }
            }
        }
    }
}
