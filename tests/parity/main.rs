//! The parity ladder: temper-core against transformers on checked-in goldens
//! (tests/fixtures/<family>/, made by scripts/make_goldens.py). fp32, tight tolerances, on the
//! CPU — or on the device `TEMPER_TEST_DEVICE` names (`cuda`, `cuda:N`), which is how
//! scripts/gpu_check.sh runs the model-core half of the ladder on a GPU with the same goldens.
//! Every test runs over every family: GPT-2, Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms,
//! head_dim apart from the width), Mistral (sliding window) and Llama 3.1 (rope scaling,
//! attention and MLP biases, tied embeddings).
//!
//! `forward`: logits, log-probs, losses, KV-cache decoding, gradients, AdamW steps, bf16 and the
//! reward head; `checkpoints`: what temper saves loads in transformers, and what it cannot load
//! is named; `sampling`: seeded sampling, stops, top-k/top-p; `preference`: the DPO family's
//! losses against trl and the sentiment judge against the vader package.

#[path = "../common.rs"]
mod common;

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

/// The repository: where cargo says at run time (so a test binary carried to another machine,
/// as scripts/gpu_check.sh does, finds the fixtures there), else where it was built.
fn repo() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    Path::new(&manifest).join("..")
}

fn fixture(family: &str) -> PathBuf {
    repo().join("tests/fixtures").join(family)
}

/// Where the model-core tests run: the CPU unless `TEMPER_TEST_DEVICE` names a GPU.
fn device() -> Device {
    match std::env::var("TEMPER_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::Cuda(0),
        Ok(other) => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => panic!("TEMPER_TEST_DEVICE={other}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// The tensors of a golden file, on the device the tests run on.
fn read_golden(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{} readable: {e}", path.display()))
        .into_iter()
        .map(|(k, t)| (k, t.to_device(device())))
        .collect()
}

fn golden(family: &str) -> BTreeMap<String, Tensor> {
    read_golden(&fixture(family).join("golden.safetensors"))
}

fn golden_json(family: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(family).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(family: &str) -> (tch::nn::VarStore, Transformer) {
    load_checkpoint(&fixture(family), LoadSpec::CAUSAL_LM, device()).expect("fixture loads")
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
