//! Losses as small pure tensor functions, each tested against values computed by hand.

use tch::{Kind, Tensor};

/// Bradley–Terry preference loss: mean over pairs of −log σ(r_chosen − r_rejected − margin).
/// chosen, rejected: (B,).
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor, margin: f64) -> Tensor {
    -(chosen - rejected - margin).log_sigmoid().mean(Kind::Float)
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
