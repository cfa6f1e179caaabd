//! The decoder-only transformer: GPT-2 and the Llama layout (Llama 2/3, Mistral, Qwen2, Qwen3)
//! in one implementation, the families' differences being switches in [`ModelConfig`].
//!
//! `hidden_states` runs the full sequence (or the new tokens against a KV cache) with an
//! attention mask for left or right padding; position ids come from the mask, so a padded
//! sequence gives the same outputs on its real tokens as the unpadded one. Heads (`logits`,
//! `scores`) are separate calls so the reward model never pays for the vocabulary projection.

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::attention_mask::{layout, Layout};
use crate::config::{Arch, ModelConfig, ScorePooling};
use crate::device::{with_autocast, Precision};
use crate::error::{CoreError, Result};
use crate::kv_cache::KvCache;
use crate::layers::{normal_init, Linear, Mlp, Norm, Rope};
use crate::losses::causal_lm_loss;

mod attention;
mod memory_saving;
use attention::{Attention, AttnContext, Block, QkvProj};
pub use memory_saving::MemorySaving;

/// Which optional heads a model carries besides the backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    /// The language-model head (tied to the embedding, or its own `lm_head.weight`).
    pub lm: bool,
    /// A scalar head `score.weight` (1, C), as transformers' `*ForSequenceClassification` with
    /// one label: the reward model's and the critic's output.
    pub score: bool,
}

pub struct Transformer {
    pub config: ModelConfig,
    pub heads: Heads,
    embed: Tensor,             // (V, C)
    positions: Option<Tensor>, // (max_position, C), GPT-2 only
    rope: Option<Rope>,
    blocks: Vec<Block>,
    norm_f: Norm,
    lm_head: Option<Tensor>, // (V, C); None when tied to `embed`
    score: Option<Linear>,
    /// The PEFT methods that change the forward pass (prompt, prefix, bottleneck adapters),
    /// when `peft:` attached one or an adapter loaded one.
    pub(crate) adapters: crate::peft::InForward,
}

impl Transformer {
    /// Creates the parameters under `root` with Hugging Face names and GPT-2-style init
    /// (normal 0.02, residual projections scaled by 1/sqrt(2·n_layer)).
    pub fn new(root: &nn::Path, config: &ModelConfig, heads: Heads) -> Result<Self> {
        config.validate()?;
        let cfg = config;
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let (trunk, embed_name, blocks_name, norm_f_name) = match cfg.arch {
            Arch::Gpt2 => (root.sub("transformer"), "wte", "h", "ln_f"),
            Arch::Llama => (root.sub("model"), "embed_tokens", "layers", "norm"),
        };
        let embed =
            trunk
                .sub(embed_name)
                .var("weight", &[cfg.vocab_size, cfg.d_model], normal_init(0.02));
        let positions = (cfg.arch == Arch::Gpt2).then(|| {
            trunk.sub("wpe").var(
                "weight",
                &[cfg.max_position, cfg.d_model],
                normal_init(0.01),
            )
        });
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = trunk.sub(blocks_name).sub(i);
                let (n1, attn, n2, mlp) = match cfg.arch {
                    Arch::Gpt2 => ("ln_1", "attn", "ln_2", "mlp"),
                    Arch::Llama => (
                        "input_layernorm",
                        "self_attn",
                        "post_attention_layernorm",
                        "mlp",
                    ),
                };
                Block {
                    norm_attn: Norm::new(p.sub(n1), cfg),
                    attn: Attention::new(p.sub(attn), cfg, proj_std),
                    norm_mlp: Norm::new(p.sub(n2), cfg),
                    mlp: Mlp::new(p.sub(mlp), cfg, proj_std),
                }
            })
            .collect();
        let lm_head = (heads.lm && !cfg.tie_embeddings()).then(|| {
            root.sub("lm_head")
                .var("weight", &[cfg.vocab_size, cfg.d_model], normal_init(0.02))
        });
        let score = heads
            .score
            .then(|| Linear::new(root.sub("score"), cfg.d_model, 1, false, false, 0.02));
        Ok(Self {
            config: cfg.clone(),
            heads,
            embed,
            positions,
            rope: (cfg.arch == Arch::Llama).then(|| Rope::new(cfg, root.device())),
            blocks,
            norm_f: Norm::new(trunk.sub(norm_f_name), cfg),
            lm_head,
            score,
            adapters: Default::default(),
        })
    }

    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// The token embedding matrix (V, C).
    pub(crate) fn embedding_matrix(&self) -> &Tensor {
        &self.embed
    }

    /// Positions left for tokens: `max_position` less the virtual tokens of prompt or prefix
    /// tuning.
    pub fn token_room(&self) -> i64 {
        self.config.max_position - self.adapters.reserved_positions()
    }

    /// Positions a fresh sequence gains in front of its tokens: the virtual tokens of an
    /// active prompt-tuning adapter, else 0. KV caches need this much more room.
    pub fn virtual_tokens(&self) -> i64 {
        self.adapters.active_positions()
    }

    /// Every dense layer of the blocks with its block index (what adapters attach to).
    pub(crate) fn block_linears(&self) -> Vec<(usize, &Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            match &b.attn.qkv {
                QkvProj::Fused(l) => out.push((i, l)),
                QkvProj::Split { q, k, v } => out.extend([(i, q), (i, k), (i, v)]),
            }
            out.push((i, &b.attn.out));
            match &b.mlp {
                Mlp::Gelu { c_fc, c_proj } => out.extend([(i, c_fc), (i, c_proj)]),
                Mlp::SwiGlu { gate, up, down } => out.extend([(i, gate), (i, up), (i, down)]),
            }
        }
        out
    }

    pub(crate) fn block_linears_mut(&mut self) -> Vec<(usize, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            match &mut b.attn.qkv {
                QkvProj::Fused(l) => out.push((i, l)),
                QkvProj::Split { q, k, v } => out.extend([(i, q), (i, k), (i, v)]),
            }
            out.push((i, &mut b.attn.out));
            match &mut b.mlp {
                Mlp::Gelu { c_fc, c_proj } => out.extend([(i, c_fc), (i, c_proj)]),
                Mlp::SwiGlu { gate, up, down } => out.extend([(i, gate), (i, up), (i, down)]),
            }
        }
        out
    }

    /// Final hidden states (B, T, C) for `ids` (B, T).
    ///
    /// `mask` (B, T), 1 for real tokens and 0 for padding on either side; None means all real.
    /// With a `cache`, `ids` are the tokens after those already cached and attend to them.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.size2().map_err(|_| {
            CoreError::Shape(format!(
                "token ids must be (batch, time), got {:?}",
                ids.size()
            ))
        })?;
        if let Some(m) = mask {
            if m.size() != [b, t] {
                return Err(CoreError::Shape(format!(
                    "attention mask {:?} does not match token ids {:?}",
                    m.size(),
                    ids.size()
                )));
            }
        }
        let mut own_cache = None;
        let mut cache =
            (self.adapters).prefill(&self.config, (b, t), ids.device(), cache, &mut own_cache)?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        // Prompt tuning: virtual tokens go in front of a fresh sequence, attended to like
        // real tokens; their positions are stripped from the output.
        let n_virtual = self.adapters.prompt_tokens(past);
        let extended_mask = match (mask, n_virtual) {
            (Some(m), n) if n > 0 => Some(Tensor::cat(
                &[
                    Tensor::ones([b, n], (m.kind(), m.device())),
                    m.shallow_clone(),
                ],
                1,
            )),
            _ => None,
        };
        let mask = extended_mask.as_ref().or(mask);
        let t = t + n_virtual;
        if let Some(c) = cache.as_ref() {
            c.check_room(t)?;
        }
        if past + t > self.config.max_position && self.positions.is_some() {
            return Err(CoreError::Shape(format!(
                "sequence of {} tokens exceeds max_position {}",
                past + t,
                self.config.max_position
            )));
        }
        let Layout {
            real,
            pos,
            attn_mask,
        } = layout(
            b,
            t,
            ids.device(),
            mask,
            cache.as_deref_mut(),
            self.config.sliding_window,
        );
        let x = Tensor::embedding(&self.embed, ids, -1, false, false); // (B, T, C)
        let mut x = self.adapters.prepend_prompt(x, n_virtual); // (B, n + T, C)
        self.add_positions(&mut x, real.is_some(), &pos, past, t);
        let rope = self.rope.as_ref().map(|r| r.cos_sin(&pos));

        let mut ctx = AttnContext {
            mask: attn_mask,
            rope,
            cache,
        };
        for i in 0..self.blocks.len() {
            x = self.block_forward(i, &x, &mut ctx);
        }
        if let Some(c) = ctx.cache {
            c.len += t;
            match &real {
                Some(real) => c.seen += real.sum_dim_intlist(1, false, Kind::Int64),
                None => c.seen += t,
            }
        }
        let x = self.norm_f.forward(&x);
        Ok(if n_virtual > 0 {
            x.narrow(1, n_virtual, t - n_virtual)
        } else {
            x
        })
    }

    /// Adds learned absolute positions (GPT-2) to token embeddings `x` of `t` tokens after
    /// `past` cached ones; with padding (`per_row`) each row's own positions `pos`.
    fn add_positions(&self, x: &mut Tensor, per_row: bool, pos: &Tensor, past: i64, t: i64) {
        if let Some(wpe) = &self.positions {
            *x += if per_row {
                Tensor::embedding(wpe, pos, -1, false, false)
            } else {
                wpe.narrow(0, past, t) // (T, C), broadcast over the batch
            };
        }
    }

    /// Block `i` (with its bottleneck adapters, if any) applied to the residual stream `x`.
    fn block_forward(&self, i: usize, x: &Tensor, ctx: &mut AttnContext) -> Tensor {
        let block = &self.blocks[i];
        let adapters = self.adapters.bottleneck_at(i);
        let mut a = block.attn.forward(&block.norm_attn.forward(x), ctx, i);
        if let Some((after_attn, _)) = adapters {
            a = after_attn.forward(&a);
        }
        let x = x + a;
        let mut m = block.mlp.forward(&block.norm_mlp.forward(&x));
        if let Some((_, after_mlp)) = adapters {
            m = after_mlp.forward(&m);
        }
        x + m
    }

    /// Vocabulary logits (B, T, V) from hidden states (B, T, C).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if !self.heads.lm {
            return Err(CoreError::InvalidModel(
                "this model was built without an LM head".into(),
            ));
        }
        // `linear` takes the (V, C) weight itself: autocast caches its bf16 copy for the whole
        // region, where a transposed view (`matmul(w.tr())`) is cast again at every call,
        // which in decoding meant converting the whole vocabulary matrix at every token.
        Ok(hidden.linear(self.lm_head.as_ref().unwrap_or(&self.embed), None::<Tensor>))
    }

    /// Scalar head output (B, T) from hidden states (B, T, C).
    pub fn scores(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.score.as_ref().ok_or_else(|| {
            CoreError::InvalidModel("this model was built without a scalar (score) head".into())
        })?;
        Ok(head.forward(hidden).squeeze_dim(-1))
    }

    /// The `config.json` transformers needs for this model: a causal LM, or, for a model with a
    /// scalar head and no LM head (reward model, critic), `*ForSequenceClassification` with
    /// one label, which reads the score at the last non-pad token as temper does.
    pub fn hf_config_json(&self) -> serde_json::Value {
        let mut v = self.config.to_hf_json();
        if self.heads.score && !self.heads.lm {
            let arch = match self.config.arch {
                Arch::Gpt2 => "GPT2ForSequenceClassification".to_string(),
                Arch::Llama => format!(
                    "{}ForSequenceClassification",
                    self.config.family.class_prefix()
                ),
            };
            v["architectures"] = serde_json::json!([arch]);
            v["id2label"] = serde_json::json!({"0": "LABEL_0"});
            v["label2id"] = serde_json::json!({"LABEL_0": 0});
        }
        v
    }

    /// Scalar head output at each row's last real token: hidden (B, T, C), mask (B, T) under
    /// left or right padding → (B,).
    pub fn last_token_scores(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let last = last_real_index(mask); // (B,)
        let scores = self.scores(hidden)?; // (B, T)
        Ok(scores.gather(1, &last.unsqueeze(1), false).squeeze_dim(1))
    }

    /// One score per sequence, pooled as `config.score_pooling` says: hidden (B, T, C),
    /// attention mask (B, T) under left or right padding, response mask (B, T) with 1 on the
    /// response's tokens (EOS included) → (B,). Reward models are always read through here,
    /// so training, PPO and evaluation agree.
    pub fn sequence_scores(
        &self,
        hidden: &Tensor,
        attention: &Tensor,
        response: &Tensor,
    ) -> Result<Tensor> {
        match self.config.score_pooling {
            ScorePooling::LastToken => self.last_token_scores(hidden, attention),
            ScorePooling::ResponseMean => {
                let m = response.to_kind(Kind::Float);
                let total = (self.scores(hidden)?.to_kind(Kind::Float) * &m).sum_dim_intlist(
                    1,
                    false,
                    Kind::Float,
                );
                Ok(total / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0))
            }
        }
    }

    /// Mean next-token loss of `ids` (B, T) over the targets whose `loss_mask` is 1, with
    /// `attention` (B, T) for padded rows, under autocast when `precision` asks for it.
    pub fn lm_loss(
        &self,
        ids: &Tensor,
        attention: Option<&Tensor>,
        loss_mask: &Tensor,
        precision: Precision,
    ) -> Result<Tensor> {
        with_autocast(self.device(), precision, || -> Result<Tensor> {
            let (_, logits) = self.forward(ids, attention)?;
            Ok(causal_lm_loss(&logits, ids, loss_mask))
        })?
    }

    /// Token-weighted mean loss over `batches` of (ids, attention, loss mask), without
    /// gradients: each batch counts by its number of trained targets.
    pub fn mean_lm_loss(
        &self,
        batches: impl IntoIterator<Item = (Tensor, Option<Tensor>, Tensor)>,
        precision: Precision,
    ) -> Result<f64> {
        let (total, weight) = self.lm_loss_sums(batches, precision)?;
        Ok(total / weight.max(1.0))
    }

    /// The sum of the per-target losses over `batches` and the number of targets, so shares
    /// of an evaluation set held by different ranks add up to the whole set's mean.
    pub fn lm_loss_sums(
        &self,
        batches: impl IntoIterator<Item = (Tensor, Option<Tensor>, Tensor)>,
        precision: Precision,
    ) -> Result<(f64, f64)> {
        let (mut total, mut weight) = (0.0, 0.0);
        tch::no_grad(|| -> Result<()> {
            for (ids, attn, mask) in batches {
                let targets = target_count(&mask);
                let loss = self.lm_loss(&ids, attn.as_ref(), &mask, precision)?;
                total += loss.to_kind(Kind::Double).double_value(&[]) * targets;
                weight += targets;
            }
            Ok(())
        })?;
        Ok((total, weight))
    }

    /// Convenience: hidden states and logits of a full sequence.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let hidden = self.hidden_states(ids, mask, None)?;
        let logits = self.logits(&hidden)?;
        Ok((hidden, logits))
    }
}

/// Index of each row's last real token in `mask` (B, T), whatever the padding side; 0 for a
/// row with none.
pub fn last_real_index(mask: &Tensor) -> Tensor {
    let t = mask.size()[1];
    let positions = Tensor::arange(t, (Kind::Int64, mask.device())).unsqueeze(0); // (1, T)
    (mask.to_kind(Kind::Int64) * (positions + 1)).argmax(1, false)
}

/// How many positions of a (B, T) loss mask are trained targets (each predicts the next token,
/// so the first column never is).
pub fn target_count(loss_mask: &Tensor) -> f64 {
    let t = loss_mask.size()[1];
    loss_mask
        .narrow(1, 1, t - 1)
        .to_kind(Kind::Double)
        .sum(Kind::Double)
        .double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_model(pooling: ScorePooling) -> (nn::VarStore, Transformer) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            arch: Arch::Gpt2,
            vocab_size: 32,
            n_layer: 2,
            n_head: 2,
            d_model: 16,
            max_position: 16,
            rope_theta: 10_000.0,
            pad_token_id: Some(0),
            score_pooling: pooling,
            ..Default::default()
        };
        let heads = Heads {
            lm: false,
            score: true,
        };
        let model = Transformer::new(&vs.root(), &cfg, heads).unwrap();
        (vs, model)
    }

    fn ids(v: &[i64]) -> Tensor {
        Tensor::from_slice(v).view([1, -1])
    }

    #[test]
    fn sequence_scores_pool_the_response_whatever_the_padding() {
        let seq = [5, 9, 3, 7, 11]; // prompt 5 9, response 3 7 11
        for pooling in [ScorePooling::LastToken, ScorePooling::ResponseMean] {
            let (_vs, model) = scalar_model(pooling);
            let h = model.hidden_states(&ids(&seq), None, None).unwrap();
            let per_token = Vec::<f64>::try_from(model.scores(&h).unwrap().view([-1])).unwrap();
            let expected = match pooling {
                ScorePooling::LastToken => per_token[4],
                ScorePooling::ResponseMean => per_token[2..].iter().sum::<f64>() / 3.0,
            };
            // The same sequence left-padded and right-padded by two positions.
            let left = ids(&[0, 0, 5, 9, 3, 7, 11]);
            let left_attn = ids(&[0, 0, 1, 1, 1, 1, 1]);
            let left_resp = ids(&[0, 0, 0, 0, 1, 1, 1]);
            let right = ids(&[5, 9, 3, 7, 11, 0, 0]);
            let right_attn = ids(&[1, 1, 1, 1, 1, 0, 0]);
            let right_resp = ids(&[0, 0, 1, 1, 1, 0, 0]);
            for (x, attn, resp) in [
                (&left, &left_attn, &left_resp),
                (&right, &right_attn, &right_resp),
            ] {
                let h = model.hidden_states(x, Some(attn), None).unwrap();
                let got = model
                    .sequence_scores(&h, attn, resp)
                    .unwrap()
                    .double_value(&[0]);
                assert!(
                    (got - expected).abs() < 1e-5,
                    "{pooling:?}: {got} vs hand-pooled {expected}"
                );
            }
        }
    }
}
