//! An iteration's numbers over the whole rollout: with one process its own, with several
//! (data parallel) every rank's per-reply values gathered in rank order and its token
//! statistics reduced, so the metrics, the reward statistics and the KL controller see the
//! whole batch, as one process with all of it would.

use tch::{Kind, Tensor};
use temper_core::dist::World;
use temper_core::rl;
use temper_rewards::ProgramScores;

use crate::config::Config;
use crate::rollout::{OptimizeMetrics, Rollout};

/// What an iteration measured, over the whole rollout.
pub struct Whole {
    /// The shaped scores (B,), the reward model's (B,), each reply's KL (B,), lengths and
    /// EOS flags (B,).
    pub score: Tensor,
    /// None when only program rewards score (no reward model).
    pub rm_score: Option<Tensor>,
    pub seq_kl: Tensor,
    pub lengths: Tensor,
    pub has_eos: Tensor,
    pub per_name: Vec<(String, Vec<f64>)>,
    pub explained_var: f64,
    /// Generated tokens per second and trained tokens per second, summed over the ranks.
    pub generate_rate: f64,
    pub train_rate: f64,
}

/// The local quantities `Whole::new` reduces.
pub struct Local<'a> {
    pub ro: &'a Rollout,
    pub score: &'a Tensor,
    pub kl: &'a Tensor,
    pub returns: &'a Tensor,
    pub program: Option<&'a ProgramScores>,
    pub has_reward_model: bool,
}

impl<'a> Local<'a> {
    /// This rank's share of an iteration; its training time is added by the loop.
    pub fn new(
        ro: &'a Rollout,
        score: &'a Tensor,
        kl: &'a Tensor,
        returns: &'a Tensor,
        program: Option<&'a ProgramScores>,
        has_reward_model: bool,
    ) -> Self {
        Self {
            ro,
            score,
            kl,
            returns,
            program,
            has_reward_model,
        }
    }
}

impl Whole {
    /// The whole batch's numbers from every rank's `Local`; `train_s` the seconds this
    /// iteration's updates took.
    pub fn new(
        world: &World,
        x: Local,
        rows: usize,
        train_s: f64,
        c: &Config,
    ) -> anyhow::Result<Self> {
        let all = |t: &Tensor| world.whole_batch(t, rows);
        let ro = x.ro;
        let lengths = ro.mask.sum_dim_intlist(1, false, Kind::Float);
        let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
        let train_tokens = scalar(&ro.attention.sum(Kind::Float)) * c.ppo_epochs as f64;
        let rates = world.sum_values(&[
            scalar(&ro.mask.sum(Kind::Float)) / ro.generate_s,
            train_tokens / train_s,
        ])?;
        let mut per_name = Vec::new();
        for (name, values) in x.program.iter().flat_map(|p| &p.per_name) {
            let values = match world.size() {
                1 => values.clone(),
                _ => Vec::<f64>::try_from(all(&Tensor::from_slice(values))?.to_kind(Kind::Double))?,
            };
            per_name.push((name.clone(), values));
        }
        Ok(Self {
            score: all(x.score)?,
            rm_score: match x.has_reward_model {
                true => Some(all(&ro.scores)?),
                false => None,
            },
            seq_kl: all(&x.kl.sum_dim_intlist(1, false, Kind::Float))?,
            has_eos: all(&ro.has_eos.to_kind(Kind::Float))?,
            explained_var: world.explained_variance(&ro.values, x.returns, &ro.mask)?,
            lengths: all(&lengths)?,
            per_name,
            generate_rate: rates[0],
            train_rate: rates[1],
        })
    }

    /// The mean KL per reply (what the KL controller reads).
    pub fn kl(&self) -> f64 {
        self.seq_kl.mean(Kind::Float).double_value(&[])
    }

    pub fn tokens(&self) -> u64 {
        self.lengths.sum(Kind::Float).double_value(&[]) as u64
    }
}

/// What the update measured besides the rollout.
pub struct Stepped<'a> {
    pub m: &'a OptimizeMetrics,
    pub kl_coef: f64,
    pub lr: f64,
    pub tokens_seen: u64,
}

impl<'a> Stepped<'a> {
    pub fn new(m: &'a OptimizeMetrics, kl_coef: f64, lr: f64, tokens_seen: u64) -> Self {
        Self {
            m,
            kl_coef,
            lr,
            tokens_seen,
        }
    }
}

/// The numbers of one iteration, in the metrics schema's names, with its time split
/// (this rank's: the ranks run in step).
pub fn iteration_fields(ro: &Rollout, w: &Whole, x: &Stepped, train_s: f64) -> Vec<(String, f64)> {
    let scalar = |t: &Tensor| t.to_kind(Kind::Double).double_value(&[]);
    let mean = |t: &Tensor| scalar(&t.to_kind(Kind::Float).mean(Kind::Float));
    let mut out: Vec<(String, f64)> = [
        ("reward/mean", mean(&w.score)),
        ("reward/std", scalar(&w.score.std(true))),
        ("kl/mean", w.kl()),
        ("kl/coef", x.kl_coef),
        ("policy/loss", x.m.policy_loss),
        ("policy/clipfrac", x.m.clipfrac),
        ("policy/approx_kl", x.m.approx_kl),
        ("policy/entropy", x.m.entropy),
        ("value/loss", x.m.value_loss),
        ("value/clipfrac", x.m.value_clipfrac),
        ("value/explained_var", w.explained_var),
        ("response/len_mean", mean(&w.lengths)),
        ("response/eos_rate", mean(&w.has_eos)),
        ("lr", x.lr),
        ("grad_norm", x.m.grad_norm),
        ("tokens", x.tokens_seen as f64),
        ("tokens_per_s", w.generate_rate),
        ("train_tokens_per_s", w.train_rate),
        ("time/generate_s", ro.generate_s),
        ("time/score_s", ro.score_s),
        ("time/train_s", train_s),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(rm) = &w.rm_score {
        out.insert(2, ("score/mean".into(), mean(rm)));
    }
    for (name, values) in &w.per_name {
        let avg = values.iter().sum::<f64>() / values.len().max(1) as f64;
        out.push((format!("reward/{name}"), avg));
    }
    out
}

/// The reward-model scores plus the weighted program rewards, with the missing-EOS penalty,
/// running normalisation (its statistics over the whole batch) and clipping applied, as
/// configured.
pub fn shape_scores(
    ro: &Rollout,
    program: Option<&ProgramScores>,
    c: &Config,
    stats: &mut rl::RewardStats,
    world: &World,
    rows: usize,
) -> anyhow::Result<Tensor> {
    // (B,); never added to in place: `ro.scores` stays the reward model's, as logged.
    let mut score = match program {
        Some(p) => {
            let added = Tensor::from_slice(&p.total).to_kind(Kind::Float);
            &ro.scores + added.to_device(ro.scores.device())
        }
        None => ro.scores.shallow_clone(),
    };
    if let Some(p) = c.missing_eos_penalty {
        score = &score + ro.has_eos.logical_not().to_kind(Kind::Float) * p;
    }
    if c.reward_normalize {
        let all = world.whole_batch(&score, rows)?;
        stats.update(&Vec::<f64>::try_from(all.to_kind(Kind::Double))?);
        score = (score - stats.mean) / stats.std().max(1e-6);
    }
    if let Some(clip) = c.reward_clip {
        score = score.clamp(-clip, clip);
    }
    Ok(score)
}
