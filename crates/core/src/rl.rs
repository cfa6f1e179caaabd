//! PPO's maths as small pure tensor functions, each tested on a few elements computed by hand.
//! Shapes: B sequences × N response tokens; `mask` (B, N) is 1.0 on real response tokens.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

fn f(mask: &Tensor) -> Tensor {
    mask.to_kind(Kind::Float)
}

/// Mean of `x` over the positions where `mask` is set.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    (x * f(mask)).sum(Kind::Float) / f(mask).sum(Kind::Float).clamp_min(1.0)
}

/// Variance over masked positions, with Bessel's correction (as TRL's `masked_var`).
pub fn masked_var(x: &Tensor, mask: &Tensor) -> Tensor {
    let mean = masked_mean(x, mask);
    let n = f(mask).sum(Kind::Float);
    let sq = masked_mean(&(x - &mean).square(), mask);
    sq * &n / (&n - 1.0).clamp_min(1.0)
}

/// (x − mean) / sqrt(var + 1e-8) over masked positions; masked-out positions become 0.
pub fn masked_whiten(x: &Tensor, mask: &Tensor) -> Tensor {
    let mean = masked_mean(x, mask);
    let var = masked_var(x, mask);
    (x - mean) * (var + 1e-8).rsqrt() * f(mask)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// log π − log π_ref: unbiased, can be negative per token.
    #[default]
    K1,
    /// (r − 1) − log r with r = π_ref / π: unbiased, never negative, lower variance.
    K3,
}

/// Per-token KL estimate between the policy and the reference, 0 where `mask` is unset.
pub fn kl_penalty(
    logp: &Tensor,
    ref_logp: &Tensor,
    mask: &Tensor,
    estimator: KlEstimator,
) -> Tensor {
    let log_ratio = logp - ref_logp;
    let kl = match estimator {
        KlEstimator::K1 => log_ratio,
        KlEstimator::K3 => (-&log_ratio).exp() - 1.0 + &log_ratio,
    };
    kl * f(mask)
}

/// Per-token rewards: −coef·KL on every response token, plus the sequence's score on its last
/// real token (the EOS when one was generated), whatever the padding.
pub fn token_rewards(score: &Tensor, kl: &Tensor, mask: &Tensor, coef: f64) -> Tensor {
    let last = crate::model::last_real_index(mask); // (B,)
    let place = Tensor::zeros_like(kl).scatter(
        1,
        &last.unsqueeze(1),
        &score.unsqueeze(1).to_kind(kl.kind()),
    );
    (-(kl * coef) + place) * f(mask)
}

/// Generalised advantage estimation over response tokens; returns (advantages, returns).
/// A position past the last real token is terminal: its value and advantage count as 0.
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lam: f64,
) -> (Tensor, Tensor) {
    let m = f(mask);
    let values = values * &m;
    let n = rewards.size()[1];
    let mut next_adv = Tensor::zeros([rewards.size()[0]], (Kind::Float, rewards.device()));
    let mut next_value = next_adv.zeros_like();
    let mut advs = Vec::with_capacity(n as usize);
    for t in (0..n).rev() {
        let (r, v, mt) = (rewards.select(1, t), values.select(1, t), m.select(1, t));
        let delta = &r + &next_value * gamma - &v;
        let adv = (delta + &next_adv * (gamma * lam)) * &mt;
        next_value = v;
        next_adv = adv.shallow_clone();
        advs.push(adv);
    }
    advs.reverse();
    let advantages = Tensor::stack(&advs, 1);
    let returns = (&advantages + &values) * &m;
    (advantages, returns)
}

/// The clipped surrogate loss. Returns (loss, clipfrac, approx_kl) where clipfrac is the share
/// of tokens whose clipped term was the larger, and approx_kl = mean((r − 1) − log r), the k3
/// estimate of KL(old ‖ new).
pub fn ppo_clip_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> (Tensor, Tensor, Tensor) {
    let log_ratio = logp - old_logp;
    let ratio = log_ratio.exp();
    let unclipped = -advantages * &ratio;
    let clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip);
    let loss = masked_mean(&unclipped.max_other(&clipped), mask);
    let clipfrac = masked_mean(&clipped.gt_tensor(&unclipped).to_kind(Kind::Float), mask);
    let approx_kl = masked_mean(&(&ratio - 1.0 - &log_ratio), mask);
    (loss, clipfrac.detach(), approx_kl.detach())
}

/// The clipped value loss, ½·mean(max((v − R)², (v_clip − R)²)) with v_clip within `clip` of
/// the rollout's values. Returns (loss, clipfrac).
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> (Tensor, Tensor) {
    let clipped = old_values + (values - old_values).clamp(-clip, clip);
    let l1 = (values - returns).square();
    let l2 = (&clipped - returns).square();
    let loss = masked_mean(&l1.max_other(&l2), mask) * 0.5;
    let clipfrac = masked_mean(&l2.gt_tensor(&l1).to_kind(Kind::Float), mask);
    (loss, clipfrac.detach())
}

/// Mean per-token entropy of the distributions `logits` (B, N, V) over masked tokens.
pub fn entropy(logits: &Tensor, mask: &Tensor) -> Tensor {
    let logp = logits.log_softmax(-1, Kind::Float);
    let h = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
    masked_mean(&h, mask)
}

/// 1 − Var(returns − values) / Var(returns): how much of the returns the critic explains.
pub fn explained_variance(values: &Tensor, returns: &Tensor, mask: &Tensor) -> Tensor {
    let var_r = masked_var(returns, mask);
    1.0 - masked_var(&(returns - values), mask) / var_r.clamp_min(1e-8)
}

/// The KL penalty's coefficient: fixed, or adaptive towards a target KL per sequence.
#[derive(Clone, Debug, PartialEq)]
pub enum KlControl {
    /// The coefficient adapts (Ziegler et al.) towards `target` nats per sequence, by at most
    /// ±20 % of the error per `horizon` samples.
    Adaptive {
        coef: f64,
        target: f64,
        horizon: f64,
    },
    Fixed {
        coef: f64,
    },
}

impl KlControl {
    pub fn initial_coef(&self) -> f64 {
        match self {
            KlControl::Adaptive { coef, .. } | KlControl::Fixed { coef } => *coef,
        }
    }

    /// The coefficient after an iteration measured `kl` per sequence over `n` samples.
    pub fn next_coef(&self, coef: f64, kl: f64, n: usize) -> f64 {
        match self {
            KlControl::Fixed { .. } => coef,
            KlControl::Adaptive {
                target, horizon, ..
            } => {
                let mut c = AdaptiveKl {
                    coef,
                    target: *target,
                    horizon: *horizon,
                };
                c.update(kl, n);
                c.coef
            }
        }
    }
}

/// Running mean and variance of scores (Welford), for reward normalisation; part of the state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardStats {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl RewardStats {
    pub fn update(&mut self, xs: &[f64]) {
        for &x in xs {
            self.count += 1.0;
            let d = x - self.mean;
            self.mean += d / self.count;
            self.m2 += d * (x - self.mean);
        }
    }

    /// The sample standard deviation; 1 until there are two values.
    pub fn std(&self) -> f64 {
        if self.count < 2.0 {
            1.0
        } else {
            (self.m2 / (self.count - 1.0)).sqrt()
        }
    }
}

/// The adaptive KL controller of Ziegler et al. (2019): moves the coefficient so the measured
/// KL approaches `target`, by at most ±20 % of the error per `horizon` samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKl {
    pub coef: f64,
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    pub fn update(&mut self, current_kl: f64, n_samples: usize) {
        let error = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.coef *= 1.0 + error * n_samples as f64 / self.horizon;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    fn close(a: &Tensor, b: &[f64]) {
        let got = Vec::<f64>::try_from(a.flatten(0, -1).to_kind(Kind::Double)).unwrap();
        assert_eq!(got.len(), b.len(), "{got:?} vs {b:?}");
        for (x, y) in got.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{got:?} vs {b:?}");
        }
    }

    #[test]
    fn masked_statistics() {
        let x = t(&[1.0, 2.0, 3.0, 100.0], &[1, 4]);
        let m = t(&[1.0, 1.0, 1.0, 0.0], &[1, 4]);
        close(&masked_mean(&x, &m), &[2.0]);
        // Deviations -1, 0, 1: sum of squares 2, unbiased over n - 1 = 2 → 1.
        close(&masked_var(&x, &m), &[1.0]);
        close(&masked_whiten(&x, &m), &[-1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn kl_estimators_by_hand() {
        let lp = t(&[-1.0, -2.0, -0.5], &[1, 3]);
        let rp = t(&[-1.5, -1.0, -0.5], &[1, 3]);
        let m = t(&[1.0, 1.0, 0.0], &[1, 3]);
        close(
            &kl_penalty(&lp, &rp, &m, KlEstimator::K1),
            &[0.5, -1.0, 0.0],
        );
        // k3 with d = lp − rp: e^{−d} − 1 + d. d = 0.5: 0.606531 − 0.5 = 0.106531; d = −1: e − 2 = 0.718282.
        close(
            &kl_penalty(&lp, &rp, &m, KlEstimator::K3),
            &[0.106_531, 0.718_282, 0.0],
        );
    }

    #[test]
    fn score_lands_on_the_last_real_token_under_any_padding() {
        let kl = t(&[0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3, 0.4], &[2, 4]);
        let score = t(&[1.0, 2.0], &[2]);
        // Row 0 stopped at EOS after 2 tokens (right padding); row 1 never emitted EOS.
        let mask = t(&[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], &[2, 4]);
        close(
            &token_rewards(&score, &kl, &mask, 0.5),
            &[-0.05, 0.9, 0.0, 0.0, -0.05, -0.1, -0.15, 1.8],
        );
        // Left padding: the last real token is still the last masked one.
        let left = t(&[0.0, 1.0, 1.0, 1.0], &[1, 4]);
        close(
            &token_rewards(&t(&[3.0], &[1]), &t(&[0.0; 4], &[1, 4]), &left, 0.1),
            &[0.0, 0.0, 0.0, 3.0],
        );
        assert_eq!(
            crate::model::last_real_index(&t(&[0.0, 1.0, 1.0, 0.0], &[1, 4])).int64_value(&[0]),
            2
        );
    }

    #[test]
    fn gae_by_hand() {
        // γ = 0.9, λ = 0.8; rewards (0, 0, 1), values (0.5, 0.6, 0.7), the 4th token masked.
        // δ2 = 1 − 0.7 = 0.3;            A2 = 0.3
        // δ1 = 0 + 0.9·0.7 − 0.6 = 0.03; A1 = 0.03 + 0.72·0.3 = 0.246
        // δ0 = 0 + 0.9·0.6 − 0.5 = 0.04; A0 = 0.04 + 0.72·0.246 = 0.21712
        let r = t(&[0.0, 0.0, 1.0, 5.0], &[1, 4]);
        let v = t(&[0.5, 0.6, 0.7, 9.0], &[1, 4]);
        let m = t(&[1.0, 1.0, 1.0, 0.0], &[1, 4]);
        let (a, ret) = gae(&r, &v, &m, 0.9, 0.8);
        close(&a, &[0.21712, 0.246, 0.3, 0.0]);
        close(&ret, &[0.71712, 0.846, 1.0, 0.0]);
    }

    #[test]
    fn ppo_clip_loss_by_hand() {
        // log ratios ln 1.5, ln 0.5, 0 with advantages 1, −1, 2 and ε = 0.2:
        // token 0: max(−1.5, −1.2) = −1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
        // token 2: max(−2, −2) = −2. Loss = (−1.2 + 0.8 − 2) / 3 = −0.8; clipfrac = 2/3.
        // approx_kl: (0.5 − ln 1.5 + (−0.5 − ln 0.5) + 0) / 3 = (0.094535 + 0.193147) / 3.
        let old = t(&[0.0, 0.0, 0.0], &[1, 3]);
        let new = t(&[1.5f32.ln(), 0.5f32.ln(), 0.0], &[1, 3]);
        let adv = t(&[1.0, -1.0, 2.0], &[1, 3]);
        let m = t(&[1.0, 1.0, 1.0], &[1, 3]);
        let (loss, clipfrac, kl) = ppo_clip_loss(&new, &old, &adv, &m, 0.2);
        close(&loss, &[-0.8]);
        close(&clipfrac, &[2.0 / 3.0]);
        close(&kl, &[(0.094_535 + 0.193_147) / 3.0]);
    }

    #[test]
    fn value_loss_by_hand() {
        // old 0, new (1, −0.1), returns (0.5, 0), clip 0.2: clipped (0.2, −0.1).
        // token 0: max(0.25, 0.09) = 0.25; token 1: max(0.01, 0.01) = 0.01. ½·mean = 0.065.
        let (loss, clipfrac) = value_loss(
            &t(&[1.0, -0.1], &[1, 2]),
            &t(&[0.0, 0.0], &[1, 2]),
            &t(&[0.5, 0.0], &[1, 2]),
            &t(&[1.0, 1.0], &[1, 2]),
            0.2,
        );
        close(&loss, &[0.065]);
        close(&clipfrac, &[0.0]);
    }

    #[test]
    fn adaptive_kl_by_hand() {
        let mut c = AdaptiveKl {
            coef: 0.1,
            target: 6.0,
            horizon: 10_000.0,
        };
        c.update(9.0, 1000); // error clipped to 0.2: × (1 + 0.2·0.1) = 0.102
        assert!((c.coef - 0.102).abs() < 1e-12);
        c.update(3.0, 1000); // error −0.5 → −0.2: × 0.98
        assert!((c.coef - 0.09996).abs() < 1e-12);
    }

    #[test]
    fn reward_stats_by_hand() {
        // 1, 2, 4 then 7: mean 3.5; squared deviations 6.25 + 2.25 + 0.25 + 12.25 = 21,
        // sample variance 21 / 3 = 7.
        let mut s = RewardStats::default();
        assert_eq!(s.std(), 1.0);
        s.update(&[1.0, 2.0, 4.0]);
        assert!((s.mean - 7.0 / 3.0).abs() < 1e-12);
        s.update(&[7.0]);
        assert!((s.mean - 3.5).abs() < 1e-12);
        assert!((s.std() - 7f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn kl_control_fixed_and_adaptive() {
        let fixed = KlControl::Fixed { coef: 0.2 };
        assert_eq!(fixed.next_coef(0.2, 50.0, 100), 0.2);
        let adaptive = KlControl::Adaptive {
            coef: 0.1,
            target: 6.0,
            horizon: 10_000.0,
        };
        // Same numbers as adaptive_kl_by_hand: KL 9 over 1000 samples → × 1.02.
        assert!((adaptive.next_coef(0.1, 9.0, 1000) - 0.102).abs() < 1e-12);
    }

    #[test]
    fn entropy_and_explained_variance() {
        // Uniform over 4 tokens: entropy ln 4.
        let logits = Tensor::zeros([1, 2, 4], (Kind::Float, tch::Device::Cpu));
        close(&entropy(&logits, &t(&[1.0, 1.0], &[1, 2])), &[4f64.ln()]);
        let r = t(&[1.0, 2.0, 3.0], &[1, 3]);
        let m = t(&[1.0, 1.0, 1.0], &[1, 3]);
        close(&explained_variance(&r, &r, &m), &[1.0]);
        close(
            &explained_variance(&t(&[0.0, 0.0, 0.0], &[1, 3]), &r, &m),
            &[0.0],
        );
    }
}
