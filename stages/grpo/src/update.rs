//! The halves of an iteration that touch the policy: the rollout (sample, then the old and
//! reference log-probs without gradients), the advantages, and the passes of the clipped loss.

use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::critic_free::{self, ClipSettings};
use temper_core::sample::{generate, Joined};
use temper_core::scoring::{decode_prompts, response_logprobs};
use temper_core::{rl, with_autocast, AdamW};
use temper_data::{seed_for, shuffled};
use temper_stage::check_finite;

use crate::config::{Algorithm, Config};
use crate::rewards::Scored;
use crate::{sampling, Setup};

/// One rollout. B = prompts × G (a prompt's replies consecutive), N response columns.
pub struct Rollout {
    pub joined: Joined,
    pub prompt: Tensor,      // (B, P) left-padded
    pub prompt_mask: Tensor, // (B, P)
    pub prompt_len: i64,
    pub tokens: Tensor,           // (B, N)
    pub mask: Tensor,             // (B, N) float, 1 on real reply tokens (EOS included)
    pub has_eos: Tensor,          // (B,) bool
    pub old_logp: Tensor,         // (B, N) the sampling policy, at the sampling temperature
    pub ref_logp: Option<Tensor>, // (B, N) when beta > 0
    pub generate_s: f64,
}

pub fn rollout(s: &Setup, c: &Config, rows: &[usize], seeds: &[u64]) -> anyhow::Result<Rollout> {
    let ids: Vec<Vec<i64>> = rows
        .iter()
        .map(|&i| s.prompts[i].0.iter().map(|&t| t as i64).collect())
        .collect();
    let model = &s.policy.model;
    let device = model.device();
    let started = std::time::Instant::now();
    let g = with_autocast(device, c.precision, || {
        generate(model, &ids, &sampling(c, &s.template), seeds)
    })??;
    let generate_s = started.elapsed().as_secs_f64();
    let p = g.prompt.size()[1];
    let joined = g.joined();
    let mask = g.mask.to_kind(Kind::Float);
    let has_eos = g.stopped(&s.template.stop_ids());
    let t = c.temperature;
    let (old_logp, ref_logp) = tch::no_grad(|| {
        with_autocast(device, c.precision, || -> anyhow::Result<_> {
            let lp = |m: &temper_core::Transformer| {
                response_logprobs(m, &joined.seq, &joined.attention, p, &g.tokens, t)
                    .map(|(lp, _)| lp)
            };
            let old = lp(model)?;
            let reference = match s.reference(c) {
                Some(r) => Some(r.run(lp)?),
                None => None,
            };
            Ok((old, reference))
        })?
    })?;
    Ok(Rollout {
        prompt: g.prompt.shallow_clone(),
        prompt_mask: g.prompt_mask.shallow_clone(),
        prompt_len: p,
        tokens: g.tokens.shallow_clone(),
        mask,
        has_eos,
        old_logp,
        ref_logp,
        generate_s,
        joined,
    })
}

/// Advantages: (B,) per reply for GRPO and RLOO, (B, N) per token for REINFORCE++.
pub fn advantages(c: &Config, rewards: &Tensor, ro: &Rollout) -> Tensor {
    let g = c.num_generations as i64;
    match c.algorithm {
        Algorithm::Grpo => critic_free::group_advantages(rewards, g, c.scale),
        Algorithm::Rloo => critic_free::rloo_advantages(rewards, g),
        Algorithm::ReinforcePp => {
            let kl = match &ro.ref_logp {
                Some(r) => rl::kl_penalty(&ro.old_logp, r, &ro.mask, rl::KlEstimator::K1),
                None => ro.mask.zeros_like(),
            };
            critic_free::reinforce_pp_advantages(rewards, &kl, &ro.mask, c.beta)
        }
    }
}

/// What the passes over a rollout measured (means over minibatch updates).
pub struct Optimized {
    pub loss: f64,
    pub clipfrac: f64,
    pub entropy: f64,
    pub kl: f64,
    pub grad_norm: f64,
}

pub fn optimize(
    s: &Setup,
    c: &Config,
    ro: &Rollout,
    adv: &Tensor,
    mask: &Tensor,
    opt: &mut AdamW,
    iter: u64,
) -> anyhow::Result<Optimized> {
    let b = ro.tokens.size()[0] as usize;
    let minibatch = c.minibatch_size.unwrap_or(b);
    let settings = ClipSettings {
        epsilon: c.epsilon,
        epsilon_high: c.epsilon_high(),
        level: c.importance,
        aggregation: c.loss_aggregation,
        // REINFORCE++ puts its KL in the rewards, not the loss.
        beta: if c.algorithm == Algorithm::ReinforcePp {
            0.0
        } else {
            c.beta
        },
        max_len: c.max_new_tokens,
        batch_tokens: mask.sum(Kind::Float).double_value(&[]),
    };
    let device = ro.tokens.device();
    let lr = c.optim.lr_at(iter, c.iterations);
    let last_saved = iter / c.save_every.get() * c.save_every.get();
    let mut sums = [0.0; 5];
    let mut updates = 0.0;
    for pass in 0..c.updates_per_iteration {
        let order = shuffled(
            b,
            seed_for(c.seed, "grpo-minibatch", iter * 1000 + pass as u64),
        );
        for chunk in order.chunks(minibatch) {
            let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(device);
            let pick = |t: &Tensor| t.index_select(0, &idx);
            let (seq, attn) = (pick(&ro.joined.seq), pick(&ro.joined.attention));
            let (tokens, m) = (pick(&ro.tokens), pick(mask));
            let out = with_autocast(device, c.precision, || -> anyhow::Result<_> {
                let (logp, logits) = response_logprobs(
                    &s.policy.model,
                    &seq,
                    &attn,
                    ro.prompt_len,
                    &tokens,
                    c.temperature,
                )?;
                let reference = ro.ref_logp.as_ref().map(pick);
                let (loss, clipfrac) = critic_free::clipped_loss(
                    &logp,
                    &pick(&ro.old_logp),
                    reference.as_ref(),
                    &pick(adv),
                    &m,
                    &settings,
                );
                let entropy = rl::entropy(&logits, &m).detach();
                let kl = match &reference {
                    Some(r) => {
                        (critic_free::k3(&logp, r) * &m).sum(Kind::Float)
                            / m.sum(Kind::Float).clamp_min(1.0)
                    }
                    None => Tensor::from(0.0f32),
                };
                Ok((loss, clipfrac, entropy, kl.detach()))
            })??;
            let (loss, clipfrac, entropy, kl) = out;
            let value = loss.double_value(&[]);
            // Stop before an update that would write NaN into the weights; state/ keeps the
            // last saved iteration.
            check_finite(value, iter + 1, last_saved)?;
            s.policy.tuning.regularised(loss).backward();
            let grad_norm =
                opt.update_then(c.optim.grad_clip, lr, || s.policy.tuning.after_update())?;
            let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
            let values = [
                value,
                scalar(&clipfrac),
                scalar(&entropy),
                scalar(&kl),
                grad_norm,
            ];
            sums.iter_mut().zip(values).for_each(|(acc, v)| *acc += v);
            updates += 1.0;
        }
    }
    let [loss, clipfrac, entropy, kl, grad_norm] = sums.map(|v| v / updates);
    Ok(Optimized {
        loss,
        clipfrac,
        entropy,
        kl,
        grad_norm,
    })
}

/// One iteration's numbers in the metrics schema's names.
pub fn iteration_fields(
    ro: &Rollout,
    scored: &Scored,
    zero_std: &Tensor,
    m: &Optimized,
    c: &Config,
    iter: u64,
) -> Vec<(String, f64)> {
    let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
    let mean = |t: &Tensor| scalar(&t.to_kind(Kind::Float).mean(Kind::Float));
    let g = c.num_generations as i64;
    let grouped = scored.total.view([-1, g]);
    let within = if g > 1 {
        mean(&grouped.std_dim(-1, true, false))
    } else {
        0.0
    };
    let gen_tokens = scalar(&ro.mask.sum(Kind::Float));
    let mut out: Vec<(String, f64)> = vec![
        ("reward/mean".into(), mean(&scored.total)),
        ("reward/std".into(), scalar(&scored.total.std(true))),
        ("reward/std_within_group".into(), within),
        ("frac_zero_std_groups".into(), mean(zero_std)),
    ];
    for (name, values) in &scored.per_name {
        let avg = values.iter().sum::<f64>() / values.len().max(1) as f64;
        out.push((format!("reward/{name}"), avg));
    }
    out.extend([
        ("loss".into(), m.loss),
        ("kl".into(), m.kl),
        ("clipfrac".into(), m.clipfrac),
        ("entropy".into(), m.entropy),
        (
            "response/len_mean".into(),
            mean(&ro.mask.sum_dim_intlist(1, false, Kind::Float)),
        ),
        ("response/eos_rate".into(), mean(&ro.has_eos)),
        ("lr".into(), c.optim.lr_at(iter, c.iterations)),
        ("grad_norm".into(), m.grad_norm),
        ("tokens_per_s".into(), gen_tokens / ro.generate_s.max(1e-9)),
        ("time/generate_s".into(), ro.generate_s),
    ]);
    out
}

/// The first eight replies (the first groups) with their rewards, for samples.jsonl.
pub fn sample_records(
    s: &Setup,
    ro: &Rollout,
    scored: &Scored,
    step: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let k = ro.tokens.size()[0].min(8);
    let prompts = decode_prompts(
        &s.policy.tokenizer,
        &ro.prompt.narrow(0, 0, k),
        &ro.prompt_mask.narrow(0, 0, k),
    )?;
    let total = Vec::<f64>::try_from(scored.total.to_kind(Kind::Double))?;
    Ok((0..k as usize)
        .map(|i| {
            let parts: serde_json::Map<String, serde_json::Value> = scored
                .per_name
                .iter()
                .map(|(n, v)| (n.clone(), json!(v[i])))
                .collect();
            json!({
                "step": step,
                "prompt": prompts[i],
                "response": scored.replies[i],
                "reward": total[i],
                "rewards": parts,
                "ended_with_eos": ro.has_eos.int64_value(&[i as i64]) != 0,
            })
        })
        .collect())
}
