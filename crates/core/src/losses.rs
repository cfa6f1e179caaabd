//! Losses as small pure tensor functions: the language-modelling loss on padded batches (checked
//! against transformers in tests/parity/) and the preference losses, tested against values
//! computed by hand.

use tch::{Kind, Tensor};

/// Bradley–Terry preference loss: mean over pairs of −log σ(r_chosen − r_rejected − margin).
/// chosen, rejected: (B,).
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor, margin: f64) -> Tensor {
    -(chosen - rejected - margin).log_sigmoid().mean(Kind::Float)
}

/// Log-probability of each `target` under `logits`: (B, T, V), (B, T) → (B, T), computed in
/// fp32 whatever the logits' dtype.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Tensor {
    // One fused log_softmax (forward and backward) rather than gather − logsumexp, whose
    // max/sub/exp/sum passes each materialise a (B, T, V) temporary.
    logits
        .log_softmax(-1, Kind::Float)
        .gather(-1, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1)
}

/// The loss mask for plain language modelling on a padded batch: target t counts when it and
/// the token before it are real (a left-padded row's first real token is predicted from padding).
pub fn lm_target_mask(attention_mask: &Tensor) -> Tensor {
    let m = attention_mask.to_kind(Kind::Int64);
    let t = m.size()[1];
    let prev = Tensor::cat(&[m.narrow(1, 0, 1).zeros_like(), m.narrow(1, 0, t - 1)], 1);
    m * prev
}

/// Mean next-token cross-entropy over positions whose *target* has `loss_mask` = 1.
/// ids, loss_mask: (B, T); logits: (B, T, V). Token t predicts token t+1.
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor, loss_mask: &Tensor) -> Tensor {
    let t = ids.size()[1];
    // Shift the targets, not the logits: the last position gets a dummy target with weight 0.
    // log_softmax then reads the whole contiguous (B, T, V) tensor; a narrowed view would be
    // copied first, and its backward would build a zero-filled (B, T, V) gradient to scatter
    // into — two extra passes over the largest tensor of the step.
    let pad = ids.narrow(1, 0, 1).zeros_like();
    let targets = Tensor::cat(&[&ids.narrow(1, 1, t - 1), &pad], 1);
    let m = Tensor::cat(
        &[
            &loss_mask.narrow(1, 1, t - 1),
            &pad.to_kind(loss_mask.kind()),
        ],
        1,
    )
    .to_kind(Kind::Float);
    let lp = token_logprobs(logits, &targets);
    -(lp * &m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bradley_terry_by_hand() {
        // Differences 0, 2, -1: −log σ(0) = ln 2 = 0.693147; −log σ(2) = ln(1 + e^-2) = 0.126928;
        // −log σ(-1) = ln(1 + e) = 1.313262. Mean = 0.711112.
        let c = Tensor::from_slice(&[1.0f32, 3.0, 0.0]);
        let r = Tensor::from_slice(&[1.0f32, 1.0, 1.0]);
        let got = bradley_terry_loss(&c, &r, 0.0).double_value(&[]);
        assert!((got - 0.711_112).abs() < 1e-5, "{got}");
        // A margin of 1 shifts the differences to -1, 1, -2: (1.313262 + 0.313262 + 2.126928) / 3.
        let got = bradley_terry_loss(&c, &r, 1.0).double_value(&[]);
        assert!((got - 1.251_151).abs() < 1e-5, "{got}");
    }
}
