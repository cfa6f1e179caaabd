//! Preference-optimisation losses (the DPO family) as pure functions of completion log-probs:
//! per-pair losses (B,) from (B,) tensors, each tested on values computed by hand and checked
//! against TRL's formulas by the goldens in tests/fixtures/preference.
//!
//! `logps` are log-probabilities summed over a completion's tokens; `lens` its token counts.
//! Δ = (log πθ(y_w) − log πref(y_w)) − (log πθ(y_l) − log πref(y_l)).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Completion log-probs of a batch of pairs under one model: sums (B,) and token counts (B,).
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub chosen_len: Tensor,
    pub rejected_len: Tensor,
}

impl PairLogps {
    pub fn chosen_avg(&self) -> Tensor {
        &self.chosen / self.chosen_len.clamp_min(1.0)
    }
    pub fn rejected_avg(&self) -> Tensor {
        &self.rejected / self.rejected_len.clamp_min(1.0)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceLoss {
    /// DPO: −log σ(β Δ); with label smoothing ε, conservative DPO (cDPO):
    /// −(1 − ε) log σ(β Δ) − ε log σ(−β Δ).
    #[default]
    Sigmoid,
    /// IPO: (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))², log-ratios averaged per token.
    Ipo,
    /// SLiC's hinge: max(0, 1 − β Δ).
    Hinge,
    /// ORPO (reference-free): NLL of the chosen reply − β · log σ(log-odds ratio).
    Orpo,
    /// SimPO (reference-free): −log σ(β (avg log p(y_w) − avg log p(y_l)) − γ).
    Simpo,
    /// KTO on unpaired examples: 1 − σ(β (r − z0)) for desirable ones, 1 − σ(β (z0 − r)) for
    /// undesirable ones, z0 the batch's KL estimate.
    Kto,
}

impl PreferenceLoss {
    /// Whether the loss compares the policy with a reference model.
    pub fn needs_reference(self) -> bool {
        !matches!(self, PreferenceLoss::Orpo | PreferenceLoss::Simpo)
    }
}

/// Δ of every pair.
pub fn delta(policy: &PairLogps, reference: &PairLogps) -> Tensor {
    (&policy.chosen - &reference.chosen) - (&policy.rejected - &reference.rejected)
}

pub fn dpo_sigmoid(
    policy: &PairLogps,
    reference: &PairLogps,
    beta: f64,
    label_smoothing: f64,
) -> Tensor {
    let z = delta(policy, reference) * beta;
    -(z.log_sigmoid() * (1.0 - label_smoothing)) - (-&z).log_sigmoid() * label_smoothing
}

pub fn ipo(policy: &PairLogps, reference: &PairLogps, beta: f64) -> Tensor {
    let w = (&policy.chosen - &reference.chosen) / policy.chosen_len.clamp_min(1.0);
    let l = (&policy.rejected - &reference.rejected) / policy.rejected_len.clamp_min(1.0);
    (w - l - 1.0 / (2.0 * beta)).square()
}

pub fn hinge(policy: &PairLogps, reference: &PairLogps, beta: f64) -> Tensor {
    let margin: Tensor = 1.0 - delta(policy, reference) * beta;
    margin.relu()
}

/// log(1 − exp(x)) for x < 0, stable near 0 and for large |x|.
fn log1mexp(x: &Tensor) -> Tensor {
    let near_zero = x.gt(-std::f64::consts::LN_2);
    let a = (-(x.expm1())).log();
    let b = (-(x.exp())).log1p();
    a.where_self(&near_zero, &b)
}

/// ORPO's odds-ratio term per pair (β · log σ(log-odds)), which the loss subtracts from the
/// chosen reply's NLL; its inputs are per-token average log-probs.
pub fn orpo_odds_ratio(policy: &PairLogps, beta: f64) -> Tensor {
    let (w, l) = (policy.chosen_avg(), policy.rejected_avg());
    let log_odds = (&w - &l) - (log1mexp(&w) - log1mexp(&l));
    log_odds.log_sigmoid() * beta
}

pub fn simpo(policy: &PairLogps, beta: f64, gamma: f64) -> Tensor {
    let z = (policy.chosen_avg() - policy.rejected_avg()) * beta - gamma;
    -z.log_sigmoid()
}

/// KTO per example: `logratios` (B,) log πθ(y) − log πref(y), `desirable` (B,) bool, `kl` the
/// batch's (detached, clamped ≥ 0) KL estimate.
pub fn kto(
    logratios: &Tensor,
    desirable: &Tensor,
    kl: &Tensor,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Tensor {
    let good: Tensor = (1.0 - ((logratios - kl) * beta).sigmoid()) * desirable_weight;
    let bad: Tensor = (1.0 - ((kl - logratios) * beta).sigmoid()) * undesirable_weight;
    good.where_self(desirable, &bad)
}

/// KTO's reference point: the mean log-ratio of mismatched (prompt, completion) pairs, clamped
/// at 0 and detached.
pub fn kto_kl(mismatched_policy: &Tensor, mismatched_reference: &Tensor) -> Tensor {
    (mismatched_policy - mismatched_reference)
        .mean(Kind::Float)
        .clamp_min(0.0)
        .detach()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    fn pair(c: &[f32], r: &[f32], cl: &[f32], rl: &[f32]) -> PairLogps {
        PairLogps {
            chosen: t(c),
            rejected: t(r),
            chosen_len: t(cl),
            rejected_len: t(rl),
        }
    }

    fn close(a: &Tensor, b: &[f64]) {
        let got = Vec::<f64>::try_from(a.to_kind(Kind::Double).reshape([-1])).unwrap();
        for (x, y) in got.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{got:?} vs {b:?}");
        }
        assert_eq!(got.len(), b.len());
    }

    #[test]
    fn losses_by_hand() {
        // Policy: chosen −10, rejected −12 (lengths 5, 4); reference: −11, −11.
        // Δ = (−10 + 11) − (−12 + 11) = 2; β = 0.5 → βΔ = 1.
        let p = pair(&[-10.0], &[-12.0], &[5.0], &[4.0]);
        let r = pair(&[-11.0], &[-11.0], &[5.0], &[4.0]);
        close(&delta(&p, &r), &[2.0]);
        // −log σ(1) = 0.313262; with ε = 0.1: 0.9·0.313262 + 0.1·1.313262 = 0.413262.
        close(&dpo_sigmoid(&p, &r, 0.5, 0.0), &[0.313_262]);
        close(&dpo_sigmoid(&p, &r, 0.5, 0.1), &[0.413_262]);
        // hinge: max(0, 1 − 1) = 0; with β = 0.25: 0.5.
        close(&hinge(&p, &r, 0.5), &[0.0]);
        close(&hinge(&p, &r, 0.25), &[0.5]);
        // IPO: 1/5 − (−1/4) = 0.45; − 1/(2·0.5) = −0.55 → 0.3025.
        close(&ipo(&p, &r, 0.5), &[0.3025]);
        // SimPO: averages −2 and −3 → 1; β = 2, γ = 0.5: −log σ(1.5) = 0.201413.
        close(&simpo(&p, 2.0, 0.5), &[0.201_413]);
        // ORPO: log-odds = (−2 + 3) − (log(1 − e^−2) − log(1 − e^−3))
        //      = 1 − (−0.145413 + 0.051069) = 1.094344; β·log σ(·) = 0.1 · −0.288751.
        close(&orpo_odds_ratio(&p, 0.1), &[-0.028_875_1]);
    }

    #[test]
    fn kto_by_hand() {
        // Log-ratios 1 (desirable) and 0.5 (undesirable), z0 = 0.2, β = 1:
        // 1 − σ(0.8) = 0.310026; weight 2 on undesirable: 2·(1 − σ(−0.3)) = 2·0.574443.
        let lr = t(&[1.0, 0.5]);
        let desirable = Tensor::from_slice(&[true, false]);
        let kl = kto_kl(&t(&[0.5, 0.1]), &t(&[0.2, 0.0]));
        close(&kl, &[0.2]);
        close(
            &kto(&lr, &desirable, &kl, 1.0, 1.0, 2.0),
            &[0.310_026, 1.148_885],
        );
        // A negative mean is clamped to 0.
        close(&kto_kl(&t(&[-1.0]), &t(&[0.0])), &[0.0]);
    }
}
