//! The parity ladder: temper-core against transformers on checked-in goldens
//! (tests/fixtures/<family>/, made by scripts/make_goldens.py). CPU, fp32, tight tolerances.
//! Every test runs over every family: GPT-2, Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms,
//! head_dim apart from the width), Mistral (sliding window) and Llama 3.1 (rope scaling,
//! attention and MLP biases, tied embeddings).
//!
//! `forward`: logits, log-probs, losses, KV-cache decoding, gradients, AdamW steps, bf16 and the
//! reward head; `checkpoints`: what temper saves loads in transformers, and what it cannot load
//! is named; `sampling`: seeded sampling, stops, top-k/top-p; `preference`: the DPO family's
//! losses against trl and the sentiment judge against the vader package.

mod checkpoints;
mod forward;
mod preference;
mod sampling;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use temper_core::checkpoint::{load_weights, WEIGHTS_FILE};
use temper_core::sample::{generate, left_pad, SamplingConfig};
use temper_core::{
    lm_target_mask, load_checkpoint, save_checkpoint, with_autocast, AdamW, AdamWConfig, CoreError,
    KvCache, LoadSpec, Precision, Transformer,
};

const FAMILIES: [&str; 6] = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "llama3"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(family: &str) -> PathBuf {
    repo().join("tests/fixtures").join(family)
}

fn golden(family: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(fixture(family).join("golden.safetensors"))
        .expect("golden.safetensors readable")
        .into_iter()
        .collect()
}

fn golden_json(family: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(family).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(family: &str) -> (tch::nn::VarStore, Transformer) {
    load_checkpoint(&fixture(family), LoadSpec::CAUSAL_LM, Device::Cpu).expect("fixture loads")
}

/// Largest absolute difference between `a` and `b` where `mask` (B, T) is set.
fn max_diff_on(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let m = mask.to_kind(Kind::Bool);
    let diff = (a - b).abs();
    let diff = if diff.dim() == 3 {
        diff.amax([-1], false)
    } else {
        diff
    };
    diff.masked_select(&m).max().double_value(&[])
}
