//! The two halves of a PPO iteration that touch the models: the rollout (generate, then score
//! with every model without gradients) and the optimisation epochs over its minibatches.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tch::{Kind, Tensor};
use temper_core::dist::{GradSync, World};
use temper_core::peft::{Reference, Tuning};
use temper_core::rl;
use temper_core::sample::{generate, SamplingConfig};
use temper_core::scoring::{
    decode_prompts, decode_replies, response_logprobs, response_values, reward_scores,
};
use temper_core::{with_autocast, AdamW, Precision, Transformer};
use temper_data::{seed_for, shuffled, ChatTemplate, TextTokenizer};
use temper_rewards::{ProgramRewards, ProgramScores, ReplyText};
use temper_stage::check_finite;

pub struct Models<'a> {
    pub actor: &'a Transformer,
    /// What of the actor trains (AdaLoRA's allocator runs after each actor update).
    pub actor_tuning: &'a Tuning,
    pub reference: Reference<'a>,
    pub reward: Option<&'a Transformer>,
    pub critic: &'a Transformer,
    pub template: ChatTemplate,
    pub precision: Precision,
}

/// One batch of experience. N = response columns, P = prompt columns (left-padded).
pub struct Rollout {
    pub seq: Tensor,          // (B, P + N) prompt then response
    pub attention: Tensor,    // (B, P + N)
    pub prompt: Tensor,       // (B, P) left-padded
    pub prompt_mask: Tensor,  // (B, P)
    pub prompt_len: i64,      // P
    pub tokens: Tensor,       // (B, N)
    pub mask: Tensor,         // (B, N) float, 1 on real response tokens (EOS included)
    pub has_eos: Tensor,      // (B,) bool
    pub logprobs: Tensor,     // (B, N) actor, at the sampling temperature
    pub ref_logprobs: Tensor, // (B, N) reference, same temperature
    pub values: Tensor,       // (B, N) critic, times the row's sign
    pub scores: Tensor,       // (B,) reward model, pooled as it was trained, signed (0 without one)
    /// (B, 1) each row's reward sign (the reward model's `temper_score_sign` read from the
    /// prompt; 1 without one). The critic is scored like the reward model: it predicts the
    /// unsigned value and the sign multiplies it, so a critic that starts as the reward model
    /// starts right on both kinds of prompt instead of backwards on the negative ones.
    pub signs: Tensor,
    /// Seconds spent generating, and scoring with the actor, reference, critic and reward model.
    pub generate_s: f64,
    pub score_s: f64,
}

pub fn rollout(
    m: &Models,
    prompts: &[&Vec<u32>],
    signs: &[f32],
    sampling: &SamplingConfig,
    seeds: &[u64],
) -> anyhow::Result<Rollout> {
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| p.iter().map(|&t| t as i64).collect())
        .collect();
    let device = m.actor.device();
    let started = std::time::Instant::now();
    let g = with_autocast(device, m.precision, || {
        generate(m.actor, &ids, sampling, seeds)
    })??;
    let generate_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let p = g.prompt.size()[1];
    let n = g.tokens.size()[1];
    let joined = g.joined();
    let (seq, attention) = (&joined.seq, &joined.attention);
    let mask = g.mask.to_kind(Kind::Float);
    let has_eos = g.stopped(&m.template.stop_ids());
    let t = sampling.temperature;
    let signs = Tensor::from_slice(signs).to_device(device).unsqueeze(1);
    tch::no_grad(|| {
        with_autocast(device, m.precision, || -> anyhow::Result<Rollout> {
            let (logprobs, _) = response_logprobs(m.actor, seq, attention, p, &g.tokens, t)?;
            let (ref_logprobs, _) = m
                .reference
                .run(|r| response_logprobs(r, seq, attention, p, &g.tokens, t))?;
            let values = response_values(m.critic, seq, attention, p, n)? * &signs * &mask;
            let scores = match m.reward {
                Some(rm) => reward_scores(rm, &joined)? * signs.squeeze_dim(1),
                None => Tensor::zeros([seq.size()[0]], (Kind::Float, device)),
            };
            Ok(Rollout {
                seq: seq.shallow_clone(),
                attention: attention.shallow_clone(),
                prompt: g.prompt.shallow_clone(),
                prompt_mask: g.prompt_mask.shallow_clone(),
                prompt_len: p,
                tokens: g.tokens.shallow_clone(),
                mask: mask.shallow_clone(),
                has_eos: has_eos.shallow_clone(),
                logprobs,
                ref_logprobs,
                values,
                scores,
                signs: signs.shallow_clone(),
                generate_s,
                score_s: started.elapsed().as_secs_f64(),
            })
        })?
    })
}

/// The program rewards of every reply (None when the stage lists none): the replies and
/// prompts decoded once, each reward scored over the batch.
pub fn program_scores(
    rewards: &mut ProgramRewards,
    ro: &Rollout,
    fields: &[&BTreeMap<String, Value>],
    tok: &TextTokenizer,
    stops: &[u32],
) -> anyhow::Result<Option<ProgramScores>> {
    if rewards.is_empty() {
        return Ok(None);
    }
    let replies = decode_replies(tok, &ro.tokens, &ro.mask, stops)?;
    let prompts = decode_prompts(tok, &ro.prompt, &ro.prompt_mask)?;
    let lengths = Vec::<i64>::try_from(ro.mask.sum_dim_intlist(1, false, Kind::Int64))?;
    let batch: Vec<ReplyText> = (0..replies.len())
        .map(|i| ReplyText {
            prompt: &prompts[i],
            reply: &replies[i].text,
            reply_tokens: lengths[i] as usize,
            fields: fields[i],
        })
        .collect();
    Ok(Some(rewards.score(&batch)?))
}

#[derive(Clone, Copy)]
pub struct OptimizeSettings<'w> {
    /// Data parallel: the ranks, where this rank's rows start in the whole rollout, and the
    /// whole rollout's rows (one process: 0 and all of them).
    pub world: &'w World,
    /// The actor's (with `optimizer: shared`, the actor's and critic's) and the critic's
    /// gradient averaging over the ranks.
    pub actor_sync: &'w GradSync,
    pub critic_sync: Option<&'w GradSync>,
    pub offset: usize,
    pub rows: usize,
    pub epochs: usize,
    pub minibatch: usize,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub entropy_coef: f64,
    pub temperature: f64,
    pub actor_lr: f64,
    pub actor_clip: f64,
    pub critic_lr: f64,
    pub critic_clip: f64,
    pub seed: u64,
    /// For the NaN guard's message: this iteration and the last one saved in state/.
    pub iteration: u64,
    pub last_saved: u64,
}

/// Means over all minibatch updates of one iteration.
#[derive(Default)]
pub struct OptimizeMetrics {
    pub policy_loss: f64,
    pub clipfrac: f64,
    pub approx_kl: f64,
    pub entropy: f64,
    pub value_loss: f64,
    pub value_clipfrac: f64,
    pub grad_norm: f64,
}

/// PPO epochs: clipped policy loss (minus an optional entropy bonus) for the actor, clipped
/// value loss for the critic; with `critic_opt` None they share one optimizer and one loss.
/// With several ranks every rank shuffles the whole rollout the same way; each weighs the
/// token means of its rows of a minibatch by its share of the minibatch's tokens, and the
/// gradients are summed, so every update is the one one process would take.
pub fn optimize(
    m: &Models,
    ro: &Rollout,
    adv: &Tensor,
    returns: &Tensor,
    s: OptimizeSettings,
    actor_opt: &mut AdamW,
    mut critic_opt: Option<&mut AdamW>,
) -> anyhow::Result<OptimizeMetrics> {
    let (world, ranks) = (s.world, s.world.size());
    let mine = s.offset..s.offset + ro.seq.size()[0] as usize;
    let device = ro.seq.device();
    let mut sums = [0.0; 7];
    let mut updates = 0.0;
    for epoch in 0..s.epochs {
        let order = shuffled(s.rows, seed_for(s.seed, "ppo-epoch", epoch as u64));
        for chunk in order.chunks(s.minibatch) {
            let rows: Vec<i64> = chunk
                .iter()
                .filter(|i| mine.contains(i))
                .map(|&i| (i - s.offset) as i64)
                .collect();
            let idx = Tensor::from_slice(&rows).to_device(device);
            let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
            // This rank's share of the minibatch's tokens (1 with one process).
            let share = match ranks {
                1 => 1.0,
                _ => {
                    let tokens = scalar(&ro.mask.index_select(0, &idx).sum(Kind::Float));
                    tokens / world.sum_values(&[tokens])?[0].max(1.0)
                }
            };
            let l = match rows.is_empty() {
                true => None,
                false => Some(minibatch_losses(m, ro, adv, returns, &idx, &s)?),
            };
            let local = l.as_ref().map_or([0.0; 6], |l| {
                [
                    scalar(&l.policy_loss),
                    scalar(&l.clipfrac),
                    scalar(&l.approx_kl),
                    scalar(&l.entropy),
                    scalar(&l.value_loss),
                    scalar(&l.value_clipfrac),
                ]
            });
            let [plv, clipfrac, approx_kl, entropy, vlv, value_clipfrac] = match ranks {
                1 => local,
                _ => {
                    let v = world.sum_values(&local.map(|x| x * share))?;
                    [v[0], v[1], v[2], v[3], v[4], v[5]]
                }
            };
            // Stop before an update that would write NaN into the weights; state/ keeps the
            // last saved iteration.
            check_finite(plv + vlv, s.iteration + 1, s.last_saved)?;
            // The loss each rank differentiates: its token share of the minibatch's mean,
            // times the ranks (the gradients are averaged).
            let weight = (ranks > 1).then_some(share * ranks as f64);
            let opts = (&mut *actor_opt, critic_opt.as_deref_mut());
            let grad_norm = update(l.as_ref(), m, &s, weight, opts)?;
            let values = [
                plv,
                clipfrac,
                approx_kl,
                entropy,
                vlv,
                value_clipfrac,
                grad_norm,
            ];
            sums.iter_mut().zip(values).for_each(|(acc, v)| *acc += v);
            updates += 1.0;
        }
    }
    let [policy_loss, clipfrac, approx_kl, entropy, value_loss, value_clipfrac, grad_norm] =
        sums.map(|v| v / updates);
    Ok(OptimizeMetrics {
        policy_loss,
        clipfrac,
        approx_kl,
        entropy,
        value_loss,
        value_clipfrac,
        grad_norm,
    })
}

/// One minibatch's losses (rows `idx` of the rollout), under autocast.
struct MinibatchLosses {
    /// What the actor minimises: the clipped policy loss minus the entropy bonus.
    objective: Tensor,
    policy_loss: Tensor,
    clipfrac: Tensor,
    approx_kl: Tensor,
    entropy: Tensor,
    value_loss: Tensor,
    value_clipfrac: Tensor,
}

/// A minibatch's backward passes and updates: the actor's, then the critic's with its own
/// optimizer, or both losses through one shared optimizer. `l` is None on a rank that holds
/// none of the minibatch (it still joins the gradient reductions); `weight` scales each
/// rank's losses (None with one process). Returns the actor's gradient norm.
fn update(
    l: Option<&MinibatchLosses>,
    m: &Models,
    s: &OptimizeSettings,
    weight: Option<f64>,
    (actor_opt, critic_opt): (&mut AdamW, Option<&mut AdamW>),
) -> anyhow::Result<f64> {
    let weigh = |t: Tensor| match weight {
        None => t,
        Some(w) => t * w,
    };
    let tuning = m.actor_tuning;
    let Some(copt) = critic_opt else {
        if let Some(l) = l {
            let loss = &l.objective + &l.value_loss * s.vf_coef;
            s.actor_sync.arm_last_backward();
            tuning.regularised(weigh(loss)).backward();
        }
        s.actor_sync.finish()?;
        return Ok(actor_opt.update_then(s.actor_clip, s.actor_lr, || tuning.after_update())?);
    };
    if let Some(l) = l {
        s.actor_sync.arm_last_backward();
        tuning
            .regularised(weigh(l.objective.shallow_clone()))
            .backward();
    }
    s.actor_sync.finish()?;
    let g = actor_opt.update_then(s.actor_clip, s.actor_lr, || tuning.after_update())?;
    let critic_sync = s.critic_sync.expect("a critic optimizer has its sync");
    if let Some(l) = l {
        critic_sync.arm_last_backward();
        weigh(l.value_loss.shallow_clone()).backward();
    }
    critic_sync.finish()?;
    copt.update(s.critic_clip, s.critic_lr)?;
    Ok(g)
}

fn minibatch_losses(
    m: &Models,
    ro: &Rollout,
    adv: &Tensor,
    returns: &Tensor,
    idx: &Tensor,
    s: &OptimizeSettings,
) -> anyhow::Result<MinibatchLosses> {
    let pick = |t: &Tensor| t.index_select(0, idx);
    let (seq, attn, tokens, mask) = (
        pick(&ro.seq),
        pick(&ro.attention),
        pick(&ro.tokens),
        pick(&ro.mask),
    );
    let (p, n) = (ro.prompt_len, ro.tokens.size()[1]);
    with_autocast(seq.device(), m.precision, || -> anyhow::Result<_> {
        let (logp, logits) = response_logprobs(m.actor, &seq, &attn, p, &tokens, s.temperature)?;
        let (policy_loss, clipfrac, approx_kl) =
            rl::ppo_clip_loss(&logp, &pick(&ro.logprobs), &pick(adv), &mask, s.cliprange);
        let entropy = rl::entropy(&logits, &mask);
        let values = response_values(m.critic, &seq, &attn, p, n)? * pick(&ro.signs);
        let (value_loss, value_clipfrac) = rl::value_loss(
            &values,
            &pick(&ro.values),
            &pick(returns),
            &mask,
            s.cliprange_value,
        );
        Ok(MinibatchLosses {
            objective: &policy_loss - &entropy * s.entropy_coef,
            policy_loss,
            clipfrac,
            approx_kl,
            entropy,
            value_loss,
            value_clipfrac,
        })
    })?
}

/// The first four rollouts as records for samples.jsonl: prompt, reply, score and KL.
pub fn sample_records(
    tok: &TextTokenizer,
    stops: &[u32],
    ro: &Rollout,
    kl: &Tensor,
    step: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let b = ro.seq.size()[0].min(4);
    let prompts = decode_prompts(
        tok,
        &ro.prompt.narrow(0, 0, b),
        &ro.prompt_mask.narrow(0, 0, b),
    )?;
    let replies = decode_replies(
        tok,
        &ro.tokens.narrow(0, 0, b),
        &ro.mask.narrow(0, 0, b),
        stops,
    )?;
    Ok(prompts
        .into_iter()
        .zip(replies)
        .enumerate()
        .map(|(i, (prompt, reply))| {
            json!({
                "step": step,
                "prompt": prompt,
                "response": reply.text,
                "ended_with_eos": reply.ended_with_eos,
                "score": ro.scores.double_value(&[i as i64]),
                "kl": kl.get(i as i64).sum(Kind::Float).double_value(&[]),
            })
        })
        .collect())
}
