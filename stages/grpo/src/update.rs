//! The halves of an iteration that touch the policy: the rollout (sample, then the old and
//! reference log-probs without gradients), the advantages, and the passes of the clipped loss.

use serde_json::json;
use tch::{Kind, Tensor};
use temper_core::critic_free::{self, ClipSettings, Whole};
use temper_core::dist::{GradSync, World};
use temper_core::sample::{generate, Joined};
use temper_core::scoring::{decode_prompts, response_logprobs};
use temper_core::{rl, with_autocast, AdamW};
use temper_data::{pass_batch, seed_for, seeds_for, shuffled};
use temper_stage::check_finite;

use crate::config::{Algorithm, Config};
use crate::setup::{sampling, Setup};
use temper_core::reward_set::{ReplyBatch, Scored};

/// An iteration's rows: a seeded pass over the prompts (for every rank), each prompt
/// repeated G times, with their sampling seeds, and this rank's range of them (whole groups).
pub fn group_rows(
    s: &Setup,
    c: &Config,
    world: &World,
    iter: u64,
) -> (Vec<usize>, Vec<u64>, std::ops::Range<usize>) {
    let g = c.num_generations;
    let picked = pass_batch(
        s.prompts.len(),
        c.prompts_per_iteration * world.size(),
        c.seed,
        iter,
    );
    let rows: Vec<usize> = picked
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, g))
        .collect();
    let seeds = seeds_for(c.seed, "rollout", iter, rows.len());
    let mine = world.shard(picked.len());
    (rows, seeds, mine.start * g..mine.end * g)
}

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

impl Rollout {
    /// The replies as the rewards read them.
    pub fn replies(&self) -> ReplyBatch<'_> {
        ReplyBatch {
            joined: &self.joined,
            prompt: &self.prompt,
            prompt_mask: &self.prompt_mask,
            tokens: &self.tokens,
            mask: &self.mask,
        }
    }
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

/// Advantages: (B,) per reply for GRPO and RLOO, (B, N) per token for REINFORCE++, for this
/// rank's rows. `rewards` holds the whole rollout's (every rank's, in rank order), of which
/// this rank's are `mine`: group and batch statistics are the whole rollout's, as one process
/// would compute them.
pub fn advantages(
    c: &Config,
    rewards: &Tensor,
    mine: std::ops::Range<usize>,
    ro: &Rollout,
    world: &World,
) -> anyhow::Result<Tensor> {
    let g = c.num_generations as i64;
    let local = |t: Tensor| t.narrow(0, mine.start as i64, mine.len() as i64);
    Ok(match c.algorithm {
        Algorithm::Grpo => local(critic_free::group_advantages(rewards, g, c.scale)),
        Algorithm::Rloo => local(critic_free::rloo_advantages(rewards, g)),
        Algorithm::ReinforcePp => {
            let kl = match &ro.ref_logp {
                Some(r) => rl::kl_penalty(&ro.old_logp, r, &ro.mask, rl::KlEstimator::K1),
                None => ro.mask.zeros_like(),
            };
            let score = local(rewards.shallow_clone());
            match world.size() {
                1 => critic_free::reinforce_pp_advantages(&score, &kl, &ro.mask, c.beta),
                _ => world.masked_whiten(
                    &critic_free::reinforce_pp_returns(&score, &kl, &ro.mask, c.beta),
                    &ro.mask,
                )?,
            }
        }
    })
}

/// Step 3 of an iteration: the whole rollout's rewards gathered, this rank's advantages, and
/// the loss mask — DAPO's dynamic sampling leaves out the groups where every reply scored the
/// same, which carry no signal.
pub fn scored_advantages(
    c: &Config,
    world: &World,
    ro: &Rollout,
    scored: &Scored,
    rows: usize,
    mine: std::ops::Range<usize>,
) -> anyhow::Result<(Gathered, Tensor, Tensor)> {
    let zero_std = critic_free::zero_std_groups(&scored.total, c.num_generations as i64);
    let all = Gathered::new(world, ro, scored, &zero_std, rows)?;
    let adv = advantages(c, &all.total, mine, ro, world)?;
    let mask = if c.dynamic_sampling {
        &ro.mask * zero_std.logical_not().to_kind(Kind::Float).unsqueeze(1)
    } else {
        ro.mask.shallow_clone()
    };
    Ok((all, adv, mask))
}

/// The clipped loss of the rollout's rows `idx` (with gradient), and their clip fraction,
/// entropy and KL to the reference (k3, 0 without one).
fn minibatch_loss(
    s: &Setup,
    c: &Config,
    ro: &Rollout,
    adv: &Tensor,
    idx: &Tensor,
    m: &Tensor,
    settings: &ClipSettings,
) -> anyhow::Result<(Tensor, [f64; 3])> {
    let pick = |t: &Tensor| t.index_select(0, idx);
    let out = with_autocast(idx.device(), c.precision, || -> anyhow::Result<_> {
        let (logp, logits) = response_logprobs(
            &s.policy.model,
            &pick(&ro.joined.seq),
            &pick(&ro.joined.attention),
            ro.prompt_len,
            &pick(&ro.tokens),
            c.temperature,
        )?;
        let reference = ro.ref_logp.as_ref().map(pick);
        let old = pick(&ro.old_logp);
        let (loss, clipfrac) =
            critic_free::clipped_loss(&logp, &old, reference.as_ref(), &pick(adv), m, settings);
        let entropy = rl::entropy(&logits, m).detach();
        let kl = match &reference {
            Some(r) => {
                (critic_free::k3(&logp, r) * m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
            }
            None => Tensor::from(0.0f32),
        };
        Ok((loss, clipfrac, entropy, kl.detach()))
    })??;
    let (loss, clipfrac, entropy, kl) = out;
    let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
    Ok((loss, [scalar(&clipfrac), scalar(&entropy), scalar(&kl)]))
}

/// What the passes over a rollout measured (means over minibatch updates).
pub struct Optimized {
    pub loss: f64,
    pub clipfrac: f64,
    pub entropy: f64,
    pub kl: f64,
    pub grad_norm: f64,
}

/// Which iteration's rollout, and where this rank's rows sit in it (all rows with one
/// process).
#[derive(Clone, Copy)]
pub struct Part<'w> {
    pub iteration: u64,
    pub world: &'w World,
    /// The policy optimizer's gradient averaging over the ranks.
    pub sync: &'w GradSync,
    /// The first of this rank's rows in the whole rollout, and the whole rollout's rows.
    pub offset: usize,
    pub rows: usize,
}

/// `updates_per_iteration` passes over the whole rollout in shuffled minibatches, one update
/// each. With several ranks every rank shuffles the whole rollout the same way and computes
/// the loss of its rows of each minibatch over the whole minibatch's rows and tokens; the
/// gradients are summed across ranks, so every update is the one one process would take.
pub fn optimize(
    s: &Setup,
    c: &Config,
    ro: &Rollout,
    adv: &Tensor,
    mask: &Tensor,
    opt: &mut AdamW,
    part: Part,
) -> anyhow::Result<Optimized> {
    let (world, iter) = (part.world, part.iteration);
    let ranks = world.size();
    let local_rows = ro.tokens.size()[0] as usize;
    let minibatch = c.minibatch_size.unwrap_or(part.rows);
    let mut settings = ClipSettings {
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
        batch_tokens: world.sum_values(&[mask.sum(Kind::Float).double_value(&[])])?[0],
        whole: None,
    };
    let device = ro.tokens.device();
    let lr = c.optim.lr_at(iter, c.iterations);
    let last_saved = iter / c.save_every.get() * c.save_every.get();
    let mut sums = [0.0; 5];
    let mut updates = 0.0;
    let mine = part.offset..part.offset + local_rows;
    for pass in 0..c.updates_per_iteration {
        let order = shuffled(
            part.rows,
            seed_for(c.seed, "grpo-minibatch", iter * 1000 + pass as u64),
        );
        for chunk in order.chunks(minibatch) {
            let rows: Vec<i64> = chunk
                .iter()
                .filter(|i| mine.contains(i))
                .map(|&i| (i - part.offset) as i64)
                .collect();
            let idx = Tensor::from_slice(&rows).to_device(device);
            let m = mask.index_select(0, &idx);
            let tokens = m.sum(Kind::Float).double_value(&[]);
            if ranks > 1 {
                settings.whole = Some(Whole {
                    rows: chunk.len() as f64,
                    tokens: world.sum_values(&[tokens])?[0],
                });
            }
            // [loss, clipfrac, entropy, kl] of this rank's rows; nothing when it has none.
            let mut local = [0.0; 4];
            if !rows.is_empty() {
                let (loss, [clipfrac, entropy, kl]) =
                    minibatch_loss(s, c, ro, adv, &idx, &m, &settings)?;
                local = [loss.double_value(&[]), clipfrac, entropy, kl];
                // A NaN stops below, before any update writes it into the weights.
                if local[0].is_finite() {
                    let scaled = if ranks > 1 { loss * ranks as f64 } else { loss };
                    part.sync.arm_last_backward();
                    s.policy.tuning.regularised(scaled).backward();
                }
            }
            // The whole minibatch's loss, and its token means of the rest.
            let [value, clipfrac, entropy, kl] = if ranks > 1 {
                part.sync.finish()?;
                let [l, cf, e, k] = local;
                let g = world.sum_values(&[l, cf * tokens, e * tokens, k * tokens, tokens])?;
                let per_token = |v: f64| v / g[4].max(1.0);
                [g[0], per_token(g[1]), per_token(g[2]), per_token(g[3])]
            } else {
                local
            };
            // state/ keeps the last saved iteration.
            check_finite(value, iter + 1, last_saved)?;
            let grad_norm =
                opt.update_then(c.optim.grad_clip, lr, || s.policy.tuning.after_update())?;
            let values = [value, clipfrac, entropy, kl, grad_norm];
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

/// The whole rollout's per-reply numbers, on every rank: this rank's own with one process,
/// every rank's in rank order with several.
pub struct Gathered {
    pub total: Tensor, // (B,)
    pub per_name: Vec<(String, Tensor)>,
    pub lengths: Tensor,  // (B,) reply tokens
    pub has_eos: Tensor,  // (B,) 0/1
    pub zero_std: Tensor, // (B,) 0/1: the reply's group scored all the same
    /// Generated tokens per second, summed over the ranks.
    pub tokens_per_s: f64,
}

impl Gathered {
    pub fn new(
        world: &World,
        ro: &Rollout,
        scored: &Scored,
        zero_std: &Tensor,
        rows: usize,
    ) -> anyhow::Result<Self> {
        let all = |t: &Tensor| world.whole_batch(t, rows);
        let lengths = ro.mask.sum_dim_intlist(1, false, Kind::Float);
        let per_name = scored
            .per_name
            .iter()
            .map(|(n, v)| Ok((n.clone(), all(&Tensor::from_slice(v))?)))
            .collect::<anyhow::Result<_>>()?;
        let tokens = lengths.sum(Kind::Float).double_value(&[]);
        Ok(Self {
            total: all(&scored.total)?,
            per_name,
            tokens_per_s: world.sum_values(&[tokens / ro.generate_s.max(1e-9)])?[0],
            lengths: all(&lengths)?,
            has_eos: all(&ro.has_eos)?,
            zero_std: all(zero_std)?,
        })
    }

    pub fn tokens(&self) -> f64 {
        self.lengths.sum(Kind::Double).double_value(&[])
    }
}

/// One iteration's numbers in the metrics schema's names, over the whole rollout.
pub fn iteration_fields(
    ro: &Rollout,
    all: &Gathered,
    m: &Optimized,
    c: &Config,
    iter: u64,
) -> Vec<(String, f64)> {
    let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
    let mean = |t: &Tensor| scalar(&t.to_kind(Kind::Float).mean(Kind::Float));
    let g = c.num_generations as i64;
    let grouped = all.total.view([-1, g]);
    let within = if g > 1 {
        mean(&grouped.std_dim(-1, true, false))
    } else {
        0.0
    };
    let mut out: Vec<(String, f64)> = vec![
        ("reward/mean".into(), mean(&all.total)),
        ("reward/std".into(), scalar(&all.total.std(true))),
        ("reward/std_within_group".into(), within),
        ("frac_zero_std_groups".into(), mean(&all.zero_std)),
    ];
    for (name, values) in &all.per_name {
        let avg = scalar(&values.to_kind(Kind::Double).mean(Kind::Double));
        out.push((format!("reward/{name}"), avg));
    }
    out.extend([
        ("loss".into(), m.loss),
        ("kl".into(), m.kl),
        ("clipfrac".into(), m.clipfrac),
        ("entropy".into(), m.entropy),
        ("response/len_mean".into(), mean(&all.lengths)),
        ("response/eos_rate".into(), mean(&all.has_eos)),
        ("lr".into(), c.optim.lr_at(iter, c.iterations)),
        ("grad_norm".into(), m.grad_norm),
        ("tokens_per_s".into(), all.tokens_per_s),
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
