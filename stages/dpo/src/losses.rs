//! One batch of preference optimisation: completion log-probs of the policy (and the
//! reference, computed or read from the precomputed cache), the configured loss, and the
//! metrics in TRL's names. Pairs are scored in one forward pass over (2B, T): chosen rows
//! first, rejected rows after.

use tch::{Kind, Tensor};
use temper_core::peft::Reference;
use temper_core::preference::{self, PairLogps, PreferenceLoss};
use temper_core::scoring::completion_logps;
use temper_core::{BatchTensors, Precision, Transformer};
use temper_data::{Example, RenderedPair};

/// What the loss needs besides log-probs.
#[derive(Clone, Copy, Debug)]
pub struct LossSettings {
    pub loss: PreferenceLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    pub gamma: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// The batch's loss (a scalar with gradient) and its metrics.
pub struct BatchLoss {
    pub loss: Tensor,
    pub metrics: Vec<(&'static str, f64)>,
    pub tokens: u64,
}

/// Log-probs of `pairs` under `model`: chosen and rejected sums and lengths.
pub fn pair_logps(
    model: &Transformer,
    pairs: &[&RenderedPair],
    pad: u32,
    precision: Precision,
) -> anyhow::Result<(PairLogps, u64)> {
    let rows: Vec<&Example> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let b = BatchTensors::pad(&rows, pad, model.device());
    let (sums, lens) = completion_logps(model, &b.ids, &b.attention, &b.loss_mask, precision)?;
    let n = pairs.len() as i64;
    Ok((
        PairLogps {
            chosen: sums.narrow(0, 0, n),
            rejected: sums.narrow(0, n, n),
            chosen_len: lens.narrow(0, 0, n),
            rejected_len: lens.narrow(0, n, n),
        },
        b.tokens,
    ))
}

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
}

/// The loss of a batch of pairs; `reference` is None for the reference-free losses.
pub fn paired(
    policy: &PairLogps,
    reference: Option<&PairLogps>,
    s: &LossSettings,
) -> anyhow::Result<(Tensor, Vec<(&'static str, f64)>)> {
    let per_pair = match (s.loss, reference) {
        (PreferenceLoss::Sigmoid, Some(r)) => {
            preference::dpo_sigmoid(policy, r, s.beta, s.label_smoothing)
        }
        (PreferenceLoss::Ipo, Some(r)) => preference::ipo(policy, r, s.beta),
        (PreferenceLoss::Hinge, Some(r)) => preference::hinge(policy, r, s.beta),
        (PreferenceLoss::Simpo, _) => preference::simpo(policy, s.beta, s.gamma),
        (PreferenceLoss::Orpo, _) => {
            // The chosen reply's NLL, token-weighted over the batch, minus the odds-ratio term.
            let nll =
                -policy.chosen.sum(Kind::Float) / policy.chosen_len.sum(Kind::Float).clamp_min(1.0);
            nll - preference::orpo_odds_ratio(policy, s.beta)
        }
        (loss, r) => anyhow::bail!("{loss:?} with reference {}: not a paired loss", r.is_some()),
    };
    // TRL's rewards: β·log-ratio with a reference, β·average log-prob without.
    let (rc, rr) = match reference {
        Some(r) if s.loss.needs_reference() => (
            (&policy.chosen - &r.chosen) * s.beta,
            (&policy.rejected - &r.rejected) * s.beta,
        ),
        _ => (policy.chosen_avg() * s.beta, policy.rejected_avg() * s.beta),
    };
    let mean = |t: &Tensor| scalar(&t.mean(Kind::Float));
    let metrics = vec![
        ("rewards/chosen", mean(&rc)),
        ("rewards/rejected", mean(&rr)),
        (
            "rewards/accuracies",
            mean(&rc.gt_tensor(&rr).to_kind(Kind::Float)),
        ),
        ("rewards/margins", mean(&(&rc - &rr))),
        ("logps/chosen", mean(&policy.chosen)),
        ("logps/rejected", mean(&policy.rejected)),
    ];
    Ok((per_pair.mean(Kind::Float), metrics))
}

/// KTO on a batch of unpaired examples: their log-ratios, and the KL estimate from mismatched
/// pairs (each prompt with the next example's reply), computed without gradients.
pub fn kto(
    policy: &Transformer,
    reference: &Reference,
    examples: &[&(Example, bool)],
    pad: u32,
    precision: Precision,
    s: &LossSettings,
) -> anyhow::Result<BatchLoss> {
    let device = policy.device();
    let rows: Vec<&Example> = examples.iter().map(|e| &e.0).collect();
    let b = BatchTensors::pad(&rows, pad, device);
    let (lp, _) = completion_logps(policy, &b.ids, &b.attention, &b.loss_mask, precision)?;
    let (mismatched, ref_lp) = tch::no_grad(|| -> anyhow::Result<_> {
        let (ref_lp, _) = reference
            .run(|r| completion_logps(r, &b.ids, &b.attention, &b.loss_mask, precision))?;
        let n = rows.len();
        let swapped: Vec<Example> = (0..n)
            .map(|i| rows[i].with_reply_of(rows[(i + 1) % n]))
            .collect();
        let swapped_refs: Vec<&Example> = swapped.iter().collect();
        let m = BatchTensors::pad(&swapped_refs, pad, device);
        let (kl_policy, _) =
            completion_logps(policy, &m.ids, &m.attention, &m.loss_mask, precision)?;
        let (kl_ref, _) = reference
            .run(|r| completion_logps(r, &m.ids, &m.attention, &m.loss_mask, precision))?;
        Ok((preference::kto_kl(&kl_policy, &kl_ref), ref_lp))
    })?;
    let desirable =
        Tensor::from_slice(&examples.iter().map(|e| e.1).collect::<Vec<_>>()).to_device(device);
    let logratios = &lp - &ref_lp;
    let losses = preference::kto(
        &logratios,
        &desirable,
        &mismatched,
        s.beta,
        s.desirable_weight,
        s.undesirable_weight,
    );
    let rewards = logratios.detach() * s.beta;
    let mean_where = |t: &Tensor, m: &Tensor| {
        let n = scalar(&m.to_kind(Kind::Float).sum(Kind::Float));
        if n == 0.0 {
            f64::NAN
        } else {
            scalar(&(t * m.to_kind(Kind::Float)).sum(Kind::Float)) / n
        }
    };
    let undesirable = desirable.logical_not();
    let metrics = vec![
        ("rewards/chosen", mean_where(&rewards, &desirable)),
        ("rewards/rejected", mean_where(&rewards, &undesirable)),
        (
            "rewards/margins",
            mean_where(&rewards, &desirable) - mean_where(&rewards, &undesirable),
        ),
        ("logps/chosen", mean_where(&lp.detach(), &desirable)),
        ("logps/rejected", mean_where(&lp.detach(), &undesirable)),
        ("kl", scalar(&mismatched)),
    ];
    Ok(BatchLoss {
        loss: losses.mean(Kind::Float),
        metrics,
        tokens: b.tokens,
    })
}
