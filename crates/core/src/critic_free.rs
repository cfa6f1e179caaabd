//! Critic-free RL maths as pure tensor functions: group-relative advantages (GRPO and Dr.
//! GRPO), RLOO's leave-one-out baseline, REINFORCE++'s batch-normalised returns, the clipped
//! ratio loss with DAPO's clip-higher and GSPO's sequence-level ratio, and the loss
//! aggregations, each tested on values computed by hand and against TRL's GRPO loss by the
//! goldens in tests/fixtures/grpo.
//!
//! Shapes: B = prompts × G replies, rows of one prompt consecutive; N response tokens; `mask`
//! (B, N) is 1.0 on real response tokens.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How group-relative advantages are scaled (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// By the standard deviation of the group's rewards (GRPO).
    #[default]
    Group,
    /// By the standard deviation of the whole batch's rewards.
    Batch,
    /// Not at all (Dr. GRPO: the group std biases towards easy and hard prompts).
    None,
}

/// How the per-token losses become one number (TRL's `loss_type` for the clipped loss).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean over each sequence's tokens, then over sequences (GRPO).
    #[default]
    Grpo,
    /// Sum over the minibatch's tokens / its active tokens.
    Bnpo,
    /// Sum over tokens / (sequences × max completion length) (Dr. GRPO).
    DrGrpo,
    /// Sum over tokens / active tokens of the whole rollout batch (DAPO).
    Dapo,
}

/// Whether the importance ratio is per token or one per sequence (GSPO).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatioLevel {
    #[default]
    Token,
    Sequence,
}

/// Unbiased standard deviation along the last dimension (TRL's `nanstd` without NaNs).
fn std_last(x: &Tensor) -> Tensor {
    x.std_dim(-1, true, true)
}

/// Rewards (B,) in groups of `g` → advantages (B,): reward minus its group's mean, scaled as
/// `scale` says (by std + 1e-4).
pub fn group_advantages(rewards: &Tensor, g: i64, scale: Scale) -> Tensor {
    let grouped = rewards.view([-1, g]); // (P, G)
    let centred = &grouped - grouped.mean_dim(-1, true, Kind::Float);
    let scaled = match scale {
        Scale::Group => centred / (std_last(&grouped) + 1e-4),
        Scale::Batch => centred / (std_last(&rewards.view([1, -1])) + 1e-4),
        Scale::None => centred,
    };
    scaled.view([-1])
}

/// RLOO: each reward minus the mean of the *other* replies to its prompt: (G r − Σ) / (G − 1).
pub fn rloo_advantages(rewards: &Tensor, g: i64) -> Tensor {
    let grouped = rewards.view([-1, g]);
    let sum = grouped.sum_dim_intlist(-1, true, Kind::Float);
    ((&grouped * g as f64 - sum) / (g - 1) as f64).view([-1])
}

/// Whether every reply to a prompt got the same reward (no signal): (B,) bool per row.
pub fn zero_std_groups(rewards: &Tensor, g: i64) -> Tensor {
    let grouped = rewards.view([-1, g]);
    let spread = grouped.amax(-1, true) - grouped.amin(-1, true);
    spread.le(1e-12).expand_as(&grouped).reshape([-1])
}

/// REINFORCE++: per-token rewards (−coef·KL on every token, the score on the last real one),
/// summed into returns-to-go (γ = 1), whitened over the batch's real tokens.
pub fn reinforce_pp_advantages(score: &Tensor, kl: &Tensor, mask: &Tensor, coef: f64) -> Tensor {
    crate::rl::masked_whiten(&reinforce_pp_returns(score, kl, mask, coef), mask)
}

/// REINFORCE++'s returns before whitening (data parallel whitens them over every rank's).
pub fn reinforce_pp_returns(score: &Tensor, kl: &Tensor, mask: &Tensor, coef: f64) -> Tensor {
    let rewards = crate::rl::token_rewards(score, kl, mask, coef); // (B, N)
    rewards.flip([1]).cumsum(1, Kind::Float).flip([1]) * mask
}

/// The per-token k3 estimate of KL(π ‖ π_ref): e^(ref − logp) − (ref − logp) − 1.
pub fn k3(logp: &Tensor, ref_logp: &Tensor) -> Tensor {
    let d = ref_logp - logp;
    d.exp() - &d - 1.0
}

/// Settings of the clipped surrogate.
#[derive(Clone, Copy, Debug)]
pub struct ClipSettings {
    pub epsilon: f64,
    /// Upper clip (DAPO's clip-higher); equal to `epsilon` for the symmetric clip.
    pub epsilon_high: f64,
    pub level: RatioLevel,
    pub aggregation: Aggregation,
    /// β of the k3 KL penalty (0: none).
    pub beta: f64,
    /// Dr. GRPO's constant: the longest a completion may be.
    pub max_len: i64,
    /// DAPO's constant: active tokens in the whole rollout batch.
    pub batch_tokens: f64,
    /// Data parallel: the minibatch this call sees part of. Its rows and tokens divide the
    /// loss instead of the part's own, so the ranks' losses sum to the whole minibatch's.
    pub whole: Option<Whole>,
}

/// A whole minibatch's size, for a rank that holds some of its rows.
#[derive(Clone, Copy, Debug)]
pub struct Whole {
    pub rows: f64,
    pub tokens: f64,
}

/// The clipped ratio loss (a scalar) and its clip fraction: `logp`, `old_logp`, `ref_logp` and
/// `mask` (B, N), `advantages` (B,) or (B, N).
pub fn clipped_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    s: &ClipSettings,
) -> (Tensor, Tensor) {
    let adv = if advantages.dim() == 1 {
        advantages.unsqueeze(1)
    } else {
        advantages.shallow_clone()
    };
    let log_ratio = logp - old_logp;
    let log_w = match s.level {
        RatioLevel::Token => log_ratio,
        RatioLevel::Sequence => {
            (&log_ratio * mask).sum_dim_intlist(-1, true, Kind::Float)
                / mask.sum_dim_intlist(-1, true, Kind::Float).clamp_min(1.0)
        }
    };
    let ratio = log_w.exp();
    let clipped = ratio.clamp(1.0 - s.epsilon, 1.0 + s.epsilon_high);
    let unclipped_term = &ratio * &adv;
    let clipped_term = &clipped * &adv;
    // (B, N), or (B, 1) for sequence ratios; the KL term is per token either way, so it is
    // added by broadcasting rather than in place.
    let surrogate = -unclipped_term.minimum(&clipped_term);
    let per_token = match (ref_logp, s.beta != 0.0) {
        (Some(r), true) => surrogate + k3(logp, r) * s.beta,
        _ => surrogate,
    };
    let masked = &per_token * mask;
    let per_sequence = masked.sum_dim_intlist(-1, false, Kind::Float)
        / mask.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0);
    let loss = match (s.aggregation, s.whole) {
        (Aggregation::Grpo, None) => per_sequence.mean(Kind::Float),
        (Aggregation::Grpo, Some(w)) => per_sequence.sum(Kind::Float) / w.rows.max(1.0),
        (Aggregation::Bnpo, None) => masked.sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0),
        (Aggregation::Bnpo, Some(w)) => masked.sum(Kind::Float) / w.tokens.max(1.0),
        (Aggregation::DrGrpo, None) => {
            masked.sum(Kind::Float) / (logp.size()[0] * s.max_len) as f64
        }
        (Aggregation::DrGrpo, Some(w)) => {
            masked.sum(Kind::Float) / (w.rows * s.max_len as f64).max(1.0)
        }
        (Aggregation::Dapo, _) => masked.sum(Kind::Float) / s.batch_tokens.max(1.0),
    };
    let was_clipped = clipped_term
        .lt_tensor(&unclipped_term)
        .to_kind(Kind::Float)
        .expand_as(mask);
    let clipfrac = (was_clipped * mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0);
    (loss, clipfrac.detach())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    fn close(a: &Tensor, b: &[f64]) {
        let got = Vec::<f64>::try_from(a.to_kind(Kind::Double).reshape([-1])).unwrap();
        assert_eq!(got.len(), b.len(), "{got:?} vs {b:?}");
        for (x, y) in got.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{got:?} vs {b:?}");
        }
    }

    #[test]
    fn advantages_by_hand() {
        // Two prompts × 3 replies: rewards (1, 0, 2) and (5, 5, 5).
        let r = t(&[1.0, 0.0, 2.0, 5.0, 5.0, 5.0], &[6]);
        // Group 1: mean 1, unbiased std 1 → (0, −1, 1)/1.0001; group 2 all zero.
        close(
            &group_advantages(&r, 3, Scale::Group),
            &[0.0, -0.9999, 0.9999, 0.0, 0.0, 0.0],
        );
        close(
            &group_advantages(&r, 3, Scale::None),
            &[0.0, -1.0, 1.0, 0.0, 0.0, 0.0],
        );
        // Batch std of (1, 0, 2, 5, 5, 5): mean 3, squares 4+9+1+4+4+4 = 26 / 5 = 5.2.
        let s = 5.2f64.sqrt() + 1e-4;
        close(
            &group_advantages(&r, 3, Scale::Batch),
            &[0.0, -1.0 / s, 1.0 / s, 0.0, 0.0, 0.0],
        );
        // RLOO: 1 − (0 + 2)/2 = 0; 0 − 1.5 = −1.5; 2 − 0.5 = 1.5.
        close(&rloo_advantages(&r, 3), &[0.0, -1.5, 1.5, 0.0, 0.0, 0.0]);
        let z = Vec::<bool>::try_from(zero_std_groups(&r, 3)).unwrap();
        assert_eq!(z, [false, false, false, true, true, true]);
    }

    #[test]
    fn reinforce_pp_returns_by_hand() {
        // One sequence of 3 tokens, KL (0.1, 0.2, 0.3), coef 1, score 1 on the last token:
        // rewards (−0.1, −0.2, 0.7) → returns (0.4, 0.5, 0.7); whitened: mean 0.5333,
        // unbiased std 0.15275 → (−0.8729, −0.2182, 1.0911).
        let a = reinforce_pp_advantages(
            &t(&[1.0], &[1]),
            &t(&[0.1, 0.2, 0.3], &[1, 3]),
            &t(&[1.0, 1.0, 1.0], &[1, 3]),
            1.0,
        );
        close(&a, &[-0.872_87, -0.218_22, 1.091_09]);
    }

    #[test]
    fn clipped_loss_by_hand() {
        // One sequence, two tokens: log ratios ln 1.5 and ln 0.5, advantage 1, mask (1, 1).
        // ε = 0.2, ε_high = 0.28: token 0 min(1.5, 1.28) = 1.28; token 1 min(0.5, 0.8) = 0.5.
        // GRPO: −(1.28 + 0.5)/2 = −0.89; clipfrac 1/2.
        let old = t(&[0.0, 0.0], &[1, 2]);
        let new = t(&[1.5f32.ln(), 0.5f32.ln()], &[1, 2]);
        let m = t(&[1.0, 1.0], &[1, 2]);
        let mut s = ClipSettings {
            epsilon: 0.2,
            epsilon_high: 0.28,
            level: RatioLevel::Token,
            aggregation: Aggregation::Grpo,
            beta: 0.0,
            max_len: 4,
            batch_tokens: 8.0,
            whole: None,
        };
        let adv = t(&[1.0], &[1]);
        let (loss, clipfrac) = clipped_loss(&new, &old, None, &adv, &m, &s);
        close(&loss, &[-0.89]);
        close(&clipfrac, &[0.5]);
        // Dr. GRPO divides the sum by 1 sequence × 4 tokens; DAPO by the batch's 8 tokens.
        s.aggregation = Aggregation::DrGrpo;
        close(
            &clipped_loss(&new, &old, None, &adv, &m, &s).0,
            &[-1.78 / 4.0],
        );
        s.aggregation = Aggregation::Dapo;
        close(
            &clipped_loss(&new, &old, None, &adv, &m, &s).0,
            &[-1.78 / 8.0],
        );
        // GSPO: one ratio exp(mean(ln 1.5, ln 0.5)) = √0.75 = 0.866025 (inside the clip range).
        s.aggregation = Aggregation::Grpo;
        s.level = RatioLevel::Sequence;
        close(
            &clipped_loss(&new, &old, None, &adv, &m, &s).0,
            &[-0.866_025],
        );
        // k3 of logp = ln 1.5 against ref 0: e^(−0.405465) + 0.405465 − 1 = 0.072132.
        close(
            &k3(&t(&[1.5f32.ln()], &[1]), &t(&[0.0], &[1])),
            &[0.072_132],
        );
    }

    #[test]
    fn parts_of_a_minibatch_sum_to_its_loss() {
        // Three replies of unequal length, split 2 + 1 as two ranks hold them: with `whole`
        // the parts' losses add up to the whole minibatch's under every aggregation.
        let new = t(&[0.1, -0.2, 0.3, 0.05, 0.0, 0.0, -0.1, 0.2, 0.0], &[3, 3]);
        let old = new.zeros_like();
        let m = t(&[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0], &[3, 3]);
        let adv = t(&[1.0, -0.5, 2.0], &[3]);
        let reference = t(&[0.0, 0.1, 0.2, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0], &[3, 3]);
        for aggregation in [
            Aggregation::Grpo,
            Aggregation::Bnpo,
            Aggregation::DrGrpo,
            Aggregation::Dapo,
        ] {
            let mut s = ClipSettings {
                epsilon: 0.2,
                epsilon_high: 0.2,
                level: RatioLevel::Token,
                aggregation,
                beta: 0.1,
                max_len: 3,
                batch_tokens: 6.0,
                whole: None,
            };
            let whole = clipped_loss(&new, &old, Some(&reference), &adv, &m, &s).0;
            s.whole = Some(Whole {
                rows: 3.0,
                tokens: 6.0,
            });
            let part = |rows: &[i64]| {
                let idx = Tensor::from_slice(rows);
                let pick = |x: &Tensor| x.index_select(0, &idx);
                let r = pick(&reference);
                clipped_loss(
                    &pick(&new),
                    &pick(&old),
                    Some(&r),
                    &pick(&adv),
                    &pick(&m),
                    &s,
                )
                .0
            };
            let summed = part(&[0, 1]) + part(&[2]);
            let got = summed.double_value(&[]);
            let want = whole.double_value(&[]);
            assert!(
                (got - want).abs() < 1e-6,
                "{aggregation:?}: {got} vs {want}"
            );
        }
    }
}
