//! QLoRA against bitsandbytes and PEFT (goldens by scripts/make_peft_goldens.py): the NF4
//! levels, the 8-bit dynamic map, the 4-bit codes and double-quantised block maxima of a weight
//! with a partial last block, and the logits of a LoRA adapter over a base that bitsandbytes
//! loaded in 4-bit.

mod common;

use std::collections::BTreeMap;

use common::{peft_golden, repo};

use tch::{Device, Kind, Tensor};
use temper_core::peft::{self, dynamic_map, Absmax, LoraConfig, Nf4Weight, PeftConfig, NF4_LEVELS};
use temper_core::{load_checkpoint, LoadSpec};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn mismatches(a: &Tensor, b: &Tensor) -> i64 {
    a.to_kind(Kind::Int64)
        .ne_tensor(&b.to_kind(Kind::Int64))
        .sum(Kind::Int64)
        .int64_value(&[])
}

#[test]
fn nf4_codes_and_double_quantised_maxima_match_bitsandbytes() {
    let g = peft_golden("nf4");
    let levels = Tensor::from_slice(&NF4_LEVELS);
    assert_eq!(max_diff(&levels, &g["nf4_code"]), 0.0, "the NF4 levels");
    // Each level is a linspace point times a power of ten: two fp32 roundings, which
    // PyTorch's kernel levels (vectorised or not) may each take the other way.
    let map = Tensor::from_slice(&dynamic_map());
    let want = &g["dynamic_map"];
    let rounding = want.abs().to_kind(Kind::Double) * (2.0 * f32::EPSILON as f64);
    let excess = ((&map - want).abs().to_kind(Kind::Double) - rounding)
        .max()
        .double_value(&[]);
    assert!(
        excess <= 0.0,
        "the dynamic 8-bit map differs beyond two roundings"
    );

    let w = &g["weight"];
    let plain = Nf4Weight::quantize(w, false);
    assert_eq!(
        mismatches(&plain.packed, &g["plain.packed"]),
        0,
        "4-bit codes"
    );
    let Absmax::Plain(absmax) = &plain.absmax else {
        panic!("plain maxima")
    };
    assert_eq!(max_diff(absmax, &g["plain.absmax"]), 0.0);
    let d = max_diff(&plain.dequantize(), &g["plain.dequantized"]);
    assert!(d < 1e-6, "dequantised weight differs by {d}");

    let double = Nf4Weight::quantize(w, true);
    assert_eq!(mismatches(&double.packed, &g["double.packed"]), 0);
    let Absmax::Double {
        codes,
        scales,
        offset,
    } = &double.absmax
    else {
        panic!("double-quantised maxima")
    };
    let n = codes.numel() as i64;
    let wrong = mismatches(codes, &g["double.absmax_codes"]);
    // bitsandbytes' C kernel and the midpoint rule may round an exact tie differently.
    assert!(wrong <= n / 100, "{wrong} of {n} 8-bit codes differ");
    assert!(max_diff(scales, &g["double.absmax2"]) < 1e-7);
    assert!((offset - g["double.offset"].double_value(&[0])).abs() < 1e-6);
    let d = max_diff(&double.dequantize(), &g["double.dequantized"]);
    assert!(d < 1e-5, "double-quantised weight differs by {d}");
    // Memory: 4 bits per weight plus a byte per 64 and 4 bytes per 256·64.
    let numel = w.numel() as i64;
    assert_eq!(double.bytes(), numel / 2 + n + 4 * 2 + 8);
    assert!(double.bytes() * 7 < numel * 4, "under 1/7 of fp32");
}

#[test]
fn a_qlora_adapter_over_the_bitsandbytes_base_gives_peft_logits() {
    let g = peft_golden("llama_qlora");
    let dir = repo().join("tests/fixtures").join("peft/llama_qlora");
    let (mut vs, mut model) =
        load_checkpoint(&dir.join("base"), LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
    let config = PeftConfig::Qlora(LoraConfig {
        r: 4,
        alpha: Some(16.0),
        dropout: 0.0,
        target_modules: Some(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
        layers: None,
        bias: Default::default(),
        rslora: false,
        dora: false,
        init: Default::default(),
        double_quant: Some(true),
    });
    let tuning = peft::apply(&mut model, &mut vs, Some(&config)).unwrap();
    // PEFT's saved factors into temper's adapter store (same keys).
    let saved: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let adapters = tuning.adapters.as_ref().unwrap().variables();
    assert_eq!(adapters.len(), saved.len());
    tch::no_grad(|| {
        for (k, t) in &saved {
            adapters[k].shallow_clone().copy_(t);
        }
    });
    let mask = &g["attention_mask"];
    let (_, logits) = tch::no_grad(|| model.forward(&g["input_ids"], Some(mask))).unwrap();
    let diff = (&logits - &g["logits"]).abs().amax([-1], false);
    let d = diff
        .masked_select(&mask.to_kind(Kind::Bool))
        .max()
        .double_value(&[]);
    eprintln!("llama_qlora: max |logits - peft over bitsandbytes 4-bit| = {d:.2e}");
    assert!(d < 1e-4, "QLoRA logits differ by {d}");

    // The base's dense layers really left memory: emptied in the store, counted in NF4.
    let fields: BTreeMap<&str, i64> = tuning.summary_fields(&vs).into_iter().collect();
    let (dense, nf4) = (
        fields["quant/base_bytes_dense"],
        fields["quant/base_bytes_nf4"],
    );
    eprintln!("NF4 base: {nf4} bytes for {dense} dense");
    assert!(nf4 * 7 < dense, "{nf4} vs {dense}");
    let emptied = vs
        .variables()
        .iter()
        .filter(|(k, t)| k.contains("_proj.weight") && t.numel() == 0)
        .count();
    assert_eq!(emptied, 2 * 7, "every dense layer of both blocks");
    let (_, total) = tuning.counts(&vs);
    let (_, full) = {
        let (vs, _) = load_checkpoint(&dir.join("base"), LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
        peft::Tuning::full().counts(&vs)
    };
    let lora: i64 = adapters.values().map(|t| t.numel() as i64).sum();
    assert_eq!(
        total,
        full + lora,
        "quantised weights still count as parameters"
    );
}
