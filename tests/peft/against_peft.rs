//! On adapters PEFT itself saved: logits attached and merged, every adapter gradient, one
//! AdamW step; and settings or adapters temper cannot use are named.

use super::*;

#[test]
fn adapted_and_merged_logits_match_peft() {
    for case in CASES {
        let (g, _) = golden(case);
        let (_vs, mut model, _t) = with_adapter(case, LoadSpec::CAUSAL_LM);
        let mask = &g["attention_mask"];
        let (_, logits) = tch::no_grad(|| model.forward(&g["input_ids"], Some(mask))).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        eprintln!("{case}: max |logits - peft| = {d:.2e}");
        assert!(d < 1e-4, "{case}: adapted logits differ by {d}");

        peft::merge_adapters(&mut model);
        let (_, merged) = tch::no_grad(|| model.forward(&g["input_ids"], Some(mask))).unwrap();
        let d = max_diff_on(&merged, &g["merged_logits"], mask);
        eprintln!("{case}: max |merged logits - peft merge_and_unload| = {d:.2e}");
        assert!(d < 1e-4, "{case}: merged logits differ by {d}");
    }
}

/// The adapter tensor (or trained base bias) behind a PEFT key.
fn tensor_for(key: &str, vs: &VarStore, tuning: &peft::Tuning) -> Tensor {
    let adapters = tuning.adapters.as_ref().unwrap().variables();
    if let Some(t) = adapters.get(key) {
        return t.shallow_clone();
    }
    let base = key
        .strip_prefix("base_model.model.")
        .unwrap()
        .replace(".base_layer.", ".");
    vs.variables()
        .get(&base)
        .unwrap_or_else(|| panic!("no tensor for {key}"))
        .shallow_clone()
}

#[test]
fn adapter_gradients_and_one_adamw_step_match_peft() {
    for case in CASES {
        let (g, json) = golden(case);
        let (vs, model, tuning) = with_adapter(case, LoadSpec::CAUSAL_LM);
        let mask = &g["attention_mask"];
        let (_, logits) = model.forward(&g["input_ids"], Some(mask)).unwrap();
        temper_core::causal_lm_loss(&logits, &g["input_ids"], &lm_target_mask(mask)).backward();
        let grads: Vec<(&String, &Tensor)> =
            g.iter().filter(|(k, _)| k.starts_with("grad.")).collect();
        let (trainable, _) = tuning.counts(&vs);
        let golden_count: i64 = grads.iter().map(|(_, t)| t.numel() as i64).sum();
        assert_eq!(
            trainable, golden_count,
            "{case}: temper trains exactly the tensors PEFT trains"
        );
        for (key, want) in &grads {
            let got = tensor_for(&key["grad.".len()..], &vs, &tuning).grad();
            let scale = want.abs().max().double_value(&[]).max(1e-6);
            let d = (&got - *want).abs().max().double_value(&[]) / scale;
            assert!(
                d < 1e-4,
                "{case}: gradient of {key} differs by {d:.2e} (relative)"
            );
        }
        // Each tensor's gradient as temper computed it, before the step.
        let own_grads: Vec<Tensor> = grads
            .iter()
            .map(|(key, _)| {
                tensor_for(&key["grad.".len()..], &vs, &tuning)
                    .grad()
                    .copy()
            })
            .collect();
        let a = &json["adamw"];
        let (lr, eps) = (a["lr"].as_f64().unwrap(), a["eps"].as_f64().unwrap());
        let mut opt = tuning.optimizer(
            &vs,
            AdamWConfig {
                beta1: a["betas"][0].as_f64().unwrap(),
                beta2: a["betas"][1].as_f64().unwrap(),
                eps,
                weight_decay: a["weight_decay"].as_f64().unwrap(),
                ..AdamWConfig::default()
            },
        );
        opt.step(lr).unwrap();
        let stepped = g.keys().filter(|k| k.starts_with("step.")).count();
        assert_eq!(stepped, grads.len(), "{case}: one golden step per gradient");
        for ((key, want_grad), own_grad) in grads.iter().zip(&own_grads) {
            let name = &key["grad.".len()..];
            let want = &g[&format!("step.{name}")];
            let got = tensor_for(name, &vs, &tuning);
            let bound = adamw_first_step_bound(own_grad, want_grad, want, lr, eps);
            let diff = (&got - want).abs().to_kind(Kind::Double);
            let excess = (&diff - &bound).max().double_value(&[]);
            assert!(
                excess <= 0.0,
                "{case}: {name} after one AdamW step differs by {:.2e}, {excess:.2e} beyond what the gradients' own difference explains",
                diff.max().double_value(&[])
            );
        }
        eprintln!("{case}: {} gradients and one AdamW step match", grads.len());
    }
}

/// How far one AdamW step from temper's gradient may land from PEFT's step from its own.
/// Adam's first step moves each element by lr·g/(|g| + eps) (m̂ = g, v̂ = g²), so two
/// gradients that differ in float rounding move it by lr·|u(g_temper) − u(g_peft)|: about
/// nothing where |g| ≫ eps, up to 2·lr where |g| is near eps (the step is then the sign of
/// noise) — which is why a fixed bound passes on one CPU's kernels and fails on another's.
/// Added: the step's own rounding, a few fp32 ulps of the parameter and of lr.
fn adamw_first_step_bound(
    own_grad: &Tensor,
    peft_grad: &Tensor,
    peft_step: &Tensor,
    lr: f64,
    eps: f64,
) -> Tensor {
    let unit = |g: &Tensor| {
        let g = g.to_kind(Kind::Double);
        &g / (g.abs() + eps)
    };
    let from_gradients = (unit(own_grad) - unit(peft_grad)).abs() * lr;
    let rounding =
        peft_step.to_kind(Kind::Double).abs().clamp_min(lr) * (4.0 * f32::EPSILON as f64);
    from_gradients + rounding
}

#[test]
fn a_lora_reward_model_scores_as_peft_sequence_classification() {
    let (g, _) = golden("gpt2_rm_lora");
    let spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let (_vs, model, _t) = with_adapter("gpt2_rm_lora", spec);
    let d = (common::golden_scores(&model, &g) - &g["scores"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-5, "LoRA reward scores differ by {d}");
    // Loaded as a checkpoint (base + adapter merged), the scores are the same.
    let dir = fixtures().join("peft/gpt2_rm_lora");
    let (_vs, merged) = load_checkpoint(&dir, spec, Device::Cpu).unwrap();
    let d = (common::golden_scores(&merged, &g) - &g["scores"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-5, "merged LoRA reward scores differ by {d}");
}

#[test]
fn bad_peft_settings_are_named() {
    let lora = |f: &dyn Fn(&mut LoraConfig)| {
        let mut c = LoraConfig {
            r: 4,
            alpha: None,
            dropout: 0.0,
            target_modules: None,
            layers: None,
            bias: Default::default(),
            rslora: false,
            dora: false,
            init: Default::default(),
            double_quant: None,
        };
        f(&mut c);
        PeftConfig::Lora(c)
    };
    let cases: Vec<(PeftConfig, &str, &str)> = vec![
        (lora(&|c| c.r = 0), "peft.r", "positive"),
        (
            lora(&|c| c.target_modules = Some(vec!["q_proj".into()])),
            "peft.target_modules",
            "available: c_attn, c_fc, c_proj",
        ),
        (
            lora(&|c| c.layers = Some(vec![5])),
            "peft.layers",
            "block 5",
        ),
        (
            lora(&|c| {
                c.init = peft::LoraInit::Pissa;
                c.dora = true
            }),
            "peft.init",
            "pissa cannot be combined with dora",
        ),
        (
            lora(&|c| {
                c.init = peft::LoraInit::Pissa;
                c.r = 33
            }),
            "peft.r",
            "at most 32",
        ),
    ];
    for (config, field, words) in cases {
        let (mut vs, mut model) =
            load_checkpoint(&fixtures().join("gpt2"), LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
        let err = peft::apply(&mut model, &mut vs, Some(&config))
            .err()
            .unwrap();
        assert_eq!(err.field, field);
        assert!(err.message.contains(words), "{field}: {}", err.message);
    }
}

#[test]
fn an_adapter_for_another_base_names_the_tensor_and_shapes() {
    // The Llama adapter's q_proj factors do not exist on GPT-2; a GPT-2 adapter on a wider
    // GPT-2 would name the shapes. Here: the GPT-2 LoRA on the Llama fixture.
    let (mut vs, mut model) =
        load_checkpoint(&fixtures().join("llama"), LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
    let err = peft::load_adapter(&mut model, &mut vs, &fixtures().join("peft/gpt2_lora"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("target_modules"), "{err}");
    assert!(err.contains("available:"), "{err}");
}
