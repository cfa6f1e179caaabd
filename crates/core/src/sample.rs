//! Batched generation with the KV cache: temperature, top-k, top-p or greedy; stops each
//! sequence at EOS and the batch when all have stopped or `max_new_tokens` is reached.
//!
//! Randomness is per sequence and counter-based: the uniform draw for sequence i at step t is a
//! hash of (seed_i, t), turned into a token by inverse-CDF on the device. A sequence's sample so
//! depends only on its own seed and logits, not on batch composition, and there is no RNG state
//! to checkpoint. Everything but that (B,) vector of draws stays on the device.

use tch::{Device, Kind, Tensor};
use temper_data::batch::SplitMix64;

use crate::error::{CoreError, Result};
use crate::kv_cache::KvCache;
use crate::model::Transformer;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    pub max_new_tokens: i64,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub eos_token_id: Option<i64>,
    /// Further ids that end a sequence like EOS (a model's `generation_config.json` may list
    /// several: Llama 3.1 stops at `<|eot_id|>`, `<|eom_id|>` and `<|end_of_text|>`).
    pub also_stop: Vec<i64>,
    /// Written after a sequence stops; those positions have `mask` = false.
    pub pad_token_id: i64,
}

impl SamplingConfig {
    /// Sampling replies in a chat template: it stops at the template's end of turn (and any
    /// other end the model lists) and pads with its pad token; no top-k or top-p filtering
    /// unless set afterwards.
    pub fn chat(
        template: &temper_data::ChatTemplate,
        max_new_tokens: i64,
        temperature: f64,
    ) -> Self {
        Self {
            max_new_tokens,
            temperature,
            top_k: None,
            top_p: None,
            eos_token_id: Some(template.eos as i64),
            also_stop: template.also_stop(),
            pad_token_id: template.pad as i64,
        }
    }

    pub fn greedy(max_new_tokens: i64) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            eos_token_id: None,
            also_stop: Vec::new(),
            pad_token_id: 0,
        }
    }
}

/// A stage's sampling keys as its config holds them, for [`check_sampling`].
pub struct SamplingKeys {
    pub max_new_tokens: i64,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    /// Why this stage cannot sample greedily (temperature 0), if it cannot.
    pub needs_temperature: Option<&'static str>,
}

/// `max_new_tokens`' default in every stage that samples: 32 new tokens.
pub fn default_max_new_tokens() -> i64 {
    32
}

/// `temperature`'s default where a stage samples to learn (RL, labelling): 1, the policy's
/// own distribution.
pub fn full_temperature() -> f64 {
    1.0
}

/// The sampling keys' ranges, each refused at its key: at least one new token, a temperature
/// ≥ 0 (0 is greedy) or > 0 where the stage needs different replies, top-k ≥ 1, top-p in
/// (0, 1].
pub fn check_sampling<T>(
    cfg: &temper_stage::ConfigFile<T>,
    k: SamplingKeys,
) -> std::result::Result<(), temper_stage::StageError> {
    cfg.ensure(
        k.max_new_tokens >= 1,
        "max_new_tokens",
        "must be at least 1",
    )?;
    let t = k.temperature;
    match k.needs_temperature {
        Some(why) => cfg.ensure(
            t.is_finite() && t > 0.0,
            "temperature",
            format!("must be positive ({why})"),
        )?,
        None => cfg.ensure(
            t.is_finite() && t >= 0.0,
            "temperature",
            "must be ≥ 0 (0 is greedy)",
        )?,
    }
    cfg.ensure(
        k.top_k.is_none_or(|k| k >= 1),
        "top_k",
        "must be at least 1",
    )?;
    cfg.ensure(
        k.top_p.is_none_or(|p| p > 0.0 && p <= 1.0),
        "top_p",
        "must be in (0, 1]",
    )
}

/// The result of [`generate`]. Prompts are left-padded so all responses start at one column.
pub struct Generation {
    /// (B, P) left-padded prompts and their mask.
    pub prompt: Tensor,
    pub prompt_mask: Tensor,
    /// (B, N) generated tokens; after a sequence's EOS, `pad_token_id`.
    pub tokens: Tensor,
    /// (B, N) log-probability of each generated token under the sampling distribution before
    /// top-k/top-p truncation, i.e. log_softmax(logits / temperature); greedy uses T = 1.
    pub logprobs: Tensor,
    /// (B, N) bool: true for real generated tokens, EOS included.
    pub mask: Tensor,
}

/// A generation as whole sequences, the form every scoring model reads; all (B, P + N) Int64.
pub struct Joined {
    /// Prompt then response tokens.
    pub seq: Tensor,
    /// 1 on real tokens, prompt and response.
    pub attention: Tensor,
    /// 1 on real response tokens only (what a reply-pooled reward model averages over).
    pub response: Tensor,
}

impl Generation {
    /// (B,) bool: which replies ended with one of `stops` (EOS or another stop token) rather
    /// than running out of tokens.
    pub fn stopped(&self, stops: &[u32]) -> Tensor {
        let mut ended = Tensor::zeros_like(&self.mask).to_kind(Kind::Bool);
        for &stop in stops {
            ended = ended.logical_or(&self.tokens.eq(i64::from(stop)));
        }
        ended.logical_and(&self.mask).any_dim(1, false)
    }

    /// Prompt and response side by side, with their masks.
    pub fn joined(&self) -> Joined {
        let response = self.mask.to_kind(Kind::Int64);
        let prompt_mask = self.prompt_mask.to_kind(Kind::Int64);
        Joined {
            seq: Tensor::cat(&[&self.prompt, &self.tokens], 1),
            attention: Tensor::cat(&[&prompt_mask, &response], 1),
            response: Tensor::cat(&[&prompt_mask.zeros_like(), &response], 1),
        }
    }
}

/// Left-pads `seqs` into (B, P) ids and mask.
pub fn left_pad(seqs: &[Vec<i64>], pad: i64, device: Device) -> (Tensor, Tensor) {
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * width);
    let mut mask = Vec::with_capacity(seqs.len() * width);
    for s in seqs {
        let pad_n = width - s.len();
        ids.extend(std::iter::repeat_n(pad, pad_n).chain(s.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad_n).chain(std::iter::repeat_n(1, s.len())));
    }
    let shape = [seqs.len() as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    )
}

/// A uniform draw in (0, 1) for `seed` at `step`: splitmix64 of the seed, mixed with the step.
pub fn uniform_draw(seed: u64, step: u64) -> f64 {
    let mixed = SplitMix64(seed).next_u64() ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let bits = SplitMix64(mixed).next_u64();
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Each sequence's uniform draw (B,) for decode step `step`.
/// Every step's uniform draw for every row, (steps, B), moved to the device once: a copy from
/// host memory at each step would make the host wait for the device every token.
fn draws(seeds: &[u64], steps: i64, device: Device) -> Tensor {
    let u: Vec<f32> = (0..steps as u64)
        .flat_map(|step| seeds.iter().map(move |&s| uniform_draw(s, step) as f32))
        .collect();
    Tensor::from_slice(&u)
        .view([steps, seeds.len() as i64])
        .to_device(device)
}

/// Logits (B, V) with everything outside top-k / nucleus top-p set to -inf: top-k first, then
/// the smallest set of the remaining tokens whose probability reaches p (as transformers'
/// TopK and TopP logits processors, checked in tests/parity/sampling.rs).
pub fn truncate(logits: &Tensor, top_k: Option<i64>, top_p: Option<f64>) -> Tensor {
    let mut logits = logits.shallow_clone();
    let v = logits.size()[1];
    if let Some(k) = top_k.filter(|&k| k > 0 && k < v) {
        let (kth, _) = logits.topk(k, -1, true, true);
        let threshold = kth.narrow(1, k - 1, 1); // (B, 1)
        logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if let Some(p) = top_p.filter(|&p| p < 1.0) {
        let (sorted, order) = logits.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token when the tokens ranked above it already reach p; the top one stays.
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = before.gt(p);
        let drop = drop_sorted.scatter(-1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
}

/// Picks one token per row of `logits` (B, V): argmax when greedy, else inverse-CDF with the
/// uniform draws `u` (B,). Returns (tokens (B,), log-probs (B,)).
fn pick(logits: &Tensor, cfg: &SamplingConfig, u: Option<&Tensor>) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    if cfg.temperature <= 0.0 {
        let tok = logits.argmax(-1, false);
        let lp = logits
            .log_softmax(-1, Kind::Float)
            .gather(-1, &tok.unsqueeze(-1), false);
        return (tok, lp.squeeze_dim(-1));
    }
    let scaled = logits / cfg.temperature;
    let logp = scaled.log_softmax(-1, Kind::Float);
    let probs = if cfg.top_k.is_some() || cfg.top_p.is_some() {
        truncate(&scaled, cfg.top_k, cfg.top_p).softmax(-1, Kind::Float)
    } else {
        logp.exp()
    };
    let cdf = probs.cumsum(-1, Kind::Float); // (B, V)
    let total = cdf.narrow(1, cdf.size()[1] - 1, 1);
    let target = u.expect("sampling needs draws").unsqueeze(1) * total; // (B, 1)
    let tok = target
        .searchsorted(&cdf, false, false, "left", None::<Tensor>)
        .squeeze_dim(1)
        .clamp_max(cdf.size()[1] - 1);
    let lp = logp.gather(-1, &tok.unsqueeze(-1), false).squeeze_dim(-1);
    (tok, lp)
}

/// Generates up to `cfg.max_new_tokens` tokens after each prompt. `seeds` gives one seed per
/// prompt (ignored when greedy).
pub fn generate(
    model: &Transformer,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    seeds: &[u64],
) -> Result<Generation> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(CoreError::Shape(
            "generate needs at least one non-empty prompt".into(),
        ));
    }
    if seeds.len() != prompts.len() {
        return Err(CoreError::Shape(format!(
            "{} prompts but {} seeds",
            prompts.len(),
            seeds.len()
        )));
    }
    let device = model.device();
    let b = prompts.len() as i64;
    let (prompt, prompt_mask) = left_pad(prompts, cfg.pad_token_id, device);
    let width = prompt.size()[1];
    let mut cache = KvCache::new(
        &model.config,
        b,
        width + cfg.max_new_tokens + model.virtual_tokens(),
        Kind::Float,
        device,
    );
    let (tokens, logprobs, mask) = tch::no_grad(|| -> Result<_> {
        // Only a ragged batch needs masks; decode steps never do: a stopped sequence's later
        // tokens only ever influence that sequence's own (discarded) continuation.
        let ragged = prompts.iter().any(|p| p.len() as i64 != width);
        let hidden =
            model.hidden_states(&prompt, ragged.then_some(&prompt_mask), Some(&mut cache))?;
        let mut last = model
            .logits(&hidden.narrow(1, width - 1, 1))?
            .squeeze_dim(1); // (B, V)
        let mut done = Tensor::zeros([b], (Kind::Bool, device));
        let pad = Tensor::from(cfg.pad_token_id).to_device(device);
        let zero = Tensor::zeros([], (Kind::Float, device));
        let (mut tokens, mut logprobs, mut masks) = (Vec::new(), Vec::new(), Vec::new());
        let all_draws =
            (cfg.temperature > 0.0).then(|| draws(seeds, cfg.max_new_tokens.max(1), device));
        for step in 0..cfg.max_new_tokens {
            let draws = all_draws.as_ref().map(|d| d.get(step));
            let (tok, lp) = pick(&last, cfg, draws.as_ref());
            let live = done.logical_not();
            let tok = tok.where_self(&live, &pad);
            tokens.push(tok.shallow_clone());
            logprobs.push(lp.where_self(&live, &zero));
            masks.push(live);
            for &stop in cfg.eos_token_id.iter().chain(&cfg.also_stop) {
                done = done.logical_or(&tok.eq(stop));
            }
            if step + 1 == cfg.max_new_tokens {
                break;
            }
            // Checking for "all stopped" syncs with the device; every 8 steps keeps it cheap.
            let stops = cfg.eos_token_id.is_some() || !cfg.also_stop.is_empty();
            if stops && step % 8 == 7 && bool::try_from(done.all())? {
                break;
            }
            // No mask: a stopped row's pad token only feeds that row's discarded continuation.
            let hidden = model.hidden_states(&tok.unsqueeze(1), None, Some(&mut cache))?;
            last = model.logits(&hidden)?.squeeze_dim(1);
        }
        Ok((
            Tensor::stack(&tokens, 1),
            Tensor::stack(&logprobs, 1),
            Tensor::stack(&masks, 1),
        ))
    })?;
    // Drop trailing columns where every sequence had already stopped.
    let used = i64::try_from(mask.any_dim(0, false).to_kind(Kind::Int64).sum(Kind::Int64))?;
    Ok(Generation {
        prompt,
        prompt_mask,
        tokens: tokens.narrow(1, 0, used),
        logprobs: logprobs.narrow(1, 0, used),
        mask: mask.narrow(1, 0, used),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_ended_by_any_stop_token_counts_as_stopped() {
        // Row 0 ends with EOS (9), row 1 with the template's other stop (7), row 2 runs out of
        // tokens, row 3 has a stop id only after its end (padding, not generated).
        let tokens = Tensor::from_slice(&[1i64, 9, 0, 2, 3, 7, 4, 5, 6, 8, 8, 7]).view([4, 3]);
        let mask = Tensor::from_slice(&[
            true, true, false, true, true, true, true, true, true, true, true, false,
        ])
        .view([4, 3]);
        let g = Generation {
            prompt: Tensor::zeros([4, 1], (Kind::Int64, Device::Cpu)),
            prompt_mask: Tensor::ones([4, 1], (Kind::Int64, Device::Cpu)),
            tokens,
            logprobs: Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)),
            mask,
        };
        let got = |stops: &[u32]| Vec::<bool>::try_from(g.stopped(stops)).unwrap();
        assert_eq!(got(&[9, 7]), [true, true, false, false]);
        assert_eq!(got(&[9]), [true, false, false, false]);
    }

    #[test]
    fn under_bf16_autocast_the_cache_holds_bf16_and_greedy_decoding_matches_a_full_forward() {
        use crate::config::{Arch, ModelConfig};
        use crate::device::{with_autocast, Precision};
        tch::manual_seed(3);
        let cfg = ModelConfig {
            arch: Arch::Llama,
            vocab_size: 50,
            n_layer: 2,
            n_head: 2,
            d_model: 32,
            max_position: 32,
            d_ff: Some(48),
            ..Default::default()
        };
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let heads = crate::model::Heads {
            lm: true,
            score: false,
        };
        let model = crate::model::Transformer::new(&vs.root(), &cfg, heads).unwrap();
        let prompt = vec![3i64, 17, 5, 41];
        let sampling = SamplingConfig::greedy(6);
        with_autocast(Device::Cpu, Precision::Bf16, || {
            // The cache takes the keys' precision on the first write.
            let mut cache = KvCache::new(&cfg, 1, 8, Kind::Float, Device::Cpu);
            let ids = Tensor::from_slice(&prompt).view([1, -1]);
            let _ = model.hidden_states(&ids, None, Some(&mut cache)).unwrap();
            assert_eq!(cache.layers[0].0.kind(), Kind::BFloat16);

            // Each greedy token is the argmax of a full (uncached) forward over everything
            // before it, also in bf16.
            let g = generate(&model, std::slice::from_ref(&prompt), &sampling, &[0]).unwrap();
            let new = Vec::<i64>::try_from(g.tokens.view([-1])).unwrap();
            let mut seq = prompt.clone();
            for &tok in &new {
                let ids = Tensor::from_slice(&seq).view([1, -1]);
                let (_, logits) = model.forward(&ids, None).unwrap();
                let expected = logits.get(0).get(seq.len() as i64 - 1).argmax(-1, false);
                assert_eq!(tok, expected.int64_value(&[]), "after {seq:?}");
                seq.push(tok);
            }
        })
        .unwrap();
    }
}
