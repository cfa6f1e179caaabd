//! P-tuning (Liu et al., 2021, "GPT understands, too"): prompt tuning whose virtual tokens are
//! produced by a small prompt encoder while training — an MLP (Linear → ReLU → Linear → ReLU →
//! Linear) or a two-layer bidirectional LSTM followed by an MLP — over learned input
//! embeddings, as PEFT's `PromptEncoder`. Only the encoder's output is kept at the end (PEFT's
//! `P_TUNING` files hold `prompt_embeddings`, the output, which PEFT reads in inference mode),
//! so a trained P-tuning adapter is used exactly like a prompt-tuning one.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, RNN};
use tch::Tensor;

use super::PeftError;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    #[default]
    Mlp,
    Lstm,
}

impl EncoderKind {
    /// PEFT's `encoder_reparameterization_type`.
    pub fn peft_name(self) -> &'static str {
        match self {
            EncoderKind::Mlp => "MLP",
            EncoderKind::Lstm => "LSTM",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtuningConfig {
    pub num_virtual_tokens: i64,
    #[serde(default)]
    pub encoder: EncoderKind,
    /// Default: the model width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<i64>,
}

/// The prompt encoder: its parameters live in the adapter store under PEFT's names
/// (`prompt_encoder.mlp_head.0.weight`, `prompt_encoder.lstm_head.weight_ih_l0`, …).
pub struct Encoder {
    lstm: Option<nn::LSTM>,
    mlp: nn::Sequential,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.lstm.is_some() {
            "Encoder(LSTM)"
        } else {
            "Encoder(MLP)"
        })
    }
}

impl Encoder {
    /// Builds the encoder for virtual tokens of width `d` under `p`.
    pub(crate) fn new(p: &nn::Path, d: i64, c: &PtuningConfig) -> Result<Self, PeftError> {
        let h = c.encoder_hidden_size.unwrap_or(d);
        let lin =
            |name: &str, i, o| nn::linear(p.sub("mlp_head").sub(name), i, o, Default::default());
        Ok(match c.encoder {
            EncoderKind::Mlp => Self {
                lstm: None,
                mlp: nn::seq()
                    .add(lin("0", d, h))
                    .add_fn(|x| x.relu())
                    .add(lin("2", h, h))
                    .add_fn(|x| x.relu())
                    .add(lin("4", h, d)),
            },
            EncoderKind::Lstm => Self {
                lstm: Some(nn::lstm(
                    p.sub("lstm_head"),
                    d,
                    h,
                    nn::RNNConfig {
                        num_layers: 2,
                        bidirectional: true,
                        batch_first: true,
                        ..Default::default()
                    },
                )),
                mlp: nn::seq()
                    .add(lin("0", 2 * h, 2 * h))
                    .add_fn(|x| x.relu())
                    .add(lin("2", 2 * h, d)),
            },
        })
    }

    /// The virtual tokens (n, d) from the input embeddings (n, d).
    pub fn forward(&self, input: &Tensor) -> Tensor {
        match &self.lstm {
            Some(lstm) => {
                let (out, _) = lstm.seq(&input.unsqueeze(0));
                self.mlp.forward(&out.squeeze_dim(0))
            }
            None => self.mlp.forward(input),
        }
    }
}
