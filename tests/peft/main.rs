//! Parameter-efficient fine-tuning against the `peft` package, on adapters PEFT itself saved
//! (tests/fixtures/peft/<case>/, made by scripts/make_peft_goldens.py): logits with the adapters
//! attached and after merging, gradients of every adapter tensor, and one AdamW step.
//!
//! `against_peft`: forward, merge, gradients and a step against PEFT's goldens, and bad settings
//! named; `in_stages`: every stage trains with adapters and `peft` loads what they saved;
//! `pissa_and_adalora`: the two methods whose initialisation or rank changes as they train.

#[path = "../common.rs"]
mod common;

mod against_peft;
mod in_stages;
mod pissa_and_adalora;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::repo;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use temper_core::peft::{self, LoraConfig, PeftConfig};
use temper_core::{lm_target_mask, load_checkpoint, AdamWConfig, LoadSpec, ScoreHead, Transformer};

const CASES: [&str; 6] = [
    "gpt2_lora",
    "gpt2_rslora",
    "gpt2_dora",
    "gpt2_bias",
    "llama_lora",
    "llama_dora",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn golden(case: &str) -> (BTreeMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("peft").join(case);
    let g = Tensor::read_safetensors(dir.join("golden.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    (g, json)
}

/// The base fixture with the case's PEFT-saved adapter attached (unmerged).
fn with_adapter(case: &str, spec: LoadSpec) -> (VarStore, Transformer, peft::Tuning) {
    let (_, json) = golden(case);
    let base = fixtures().join(json["base"].as_str().unwrap());
    let (mut vs, mut model) = load_checkpoint(&base, spec, Device::Cpu).unwrap();
    let tuning = peft::load_adapter(&mut model, &mut vs, &fixtures().join("peft").join(case))
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    (vs, model, tuning)
}

fn max_diff_on(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let diff = (a - b).abs().amax([-1], false);
    diff.masked_select(&mask.to_kind(Kind::Bool))
        .max()
        .double_value(&[])
}

fn python_check(script: &str, args: &[&Path]) {
    let text = common::python_check(script, args);
    eprintln!("{}", text.lines().last().unwrap_or(""));
}

fn summary(work: &Path, stage: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(work.join("stages").join(stage).join("summary.json"));
    serde_json::from_str(&text.unwrap()).unwrap()
}

/// Saves what `tuning` trained into `ckpt`, over the fixture `base`.
fn save_over(tuning: &peft::Tuning, model: &Transformer, vs: &VarStore, base: &Path, ckpt: &Path) {
    tuning
        .save_into(
            ckpt,
            model,
            vs,
            &fixtures().join("tokenizer/gpt2_style.json"),
            Some(base),
            Default::default(),
        )
        .unwrap();
}

/// `scale·B·A` of every adapted layer, by module path (sign-free, unlike A and B themselves).
fn lora_products(tensors: &BTreeMap<String, Tensor>, scale: f64) -> BTreeMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, a)| {
            let module = k
                .strip_prefix("base_model.model.")?
                .strip_suffix(".lora_A.weight")?;
            let b = &tensors[&k.replace(".lora_A.", ".lora_B.")];
            Some((module.to_string(), b.matmul(a) * scale))
        })
        .collect()
}
