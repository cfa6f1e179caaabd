//! PiSSA (initialised from the principal singular vectors) and AdaLoRA (rank pruned while
//! training), each checked against what PEFT does and saves.

use super::*;

#[test]
fn pissa_starts_as_peft_and_saves_the_conversion_peft_makes() {
    for case in ["gpt2_pissa", "llama_pissa"] {
        let (g, json) = golden(case);
        let s = &json["settings"];
        let base = fixtures().join(json["base"].as_str().unwrap());
        let (mut vs, mut model) = load_checkpoint(&base, LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
        let (ids, mask) = (&g["input_ids"], &g["attention_mask"]);
        let (_, original) = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        let lora: LoraConfig = serde_json::from_value(serde_json::json!({
            "r": s["r"], "alpha": s["lora_alpha"], "init": "pissa",
            "rslora": s["use_rslora"].as_bool().unwrap_or(false),
            "target_modules": s["target_modules"],
        }))
        .unwrap();
        let tuning =
            peft::apply(&mut model, &mut vs, Some(&PeftConfig::Lora(lora.clone()))).unwrap();
        let adapters = tuning.adapters.as_ref().unwrap();

        // The start: the same residual weights and rank-r part as PEFT's SVD.
        let start: BTreeMap<String, Tensor> = adapters.variables().into_iter().collect();
        let deltas = lora_products(&start, lora.scale());
        assert_eq!(deltas.len(), 4, "{case}: adapted layers");
        for (module, delta) in &deltas {
            let want = &g[&format!("init_delta.{module}")];
            let d = (delta - want).abs().max().double_value(&[]);
            assert!(
                d < 1e-5,
                "{case} {module}: scale·B₀A₀ differs from PEFT's by {d:e}"
            );
            let residual = &vs.variables()[&format!("{module}.weight")];
            let d = (residual - &g[&format!("residual.{module}")])
                .abs()
                .max()
                .double_value(&[]);
            assert!(
                d < 1e-5,
                "{case} {module}: residual weight differs from PEFT's by {d:e}"
            );
        }
        // With the adapters off the layers add B₀A₀ back: the model the stage started from.
        let (_, off) =
            tch::no_grad(|| tuning.without_adapters(|| model.forward(ids, Some(mask)))).unwrap();
        let d = max_diff_on(&off, &original, mask);
        assert!(
            d < 1e-4,
            "{case}: adapters off differs from the base by {d:e}"
        );

        // Moved as PEFT's golden moved it: the same function.
        tch::no_grad(|| {
            for (name, mut var) in adapters.variables() {
                var.copy_(&g[&format!("trained.{name}")]);
            }
        });
        let (_, logits) = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        assert!(
            d < 1e-4,
            "{case}: trained PiSSA logits differ from PEFT's by {d:e}"
        );

        // Saved over the original base: PEFT's conversion (rank 2r, same scale, the same
        // BA − B₀A₀), and PEFT computes from it what temper computes.
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("adapter");
        save_over(&tuning, &model, &vs, &base, &ckpt);
        let read = |d: &Path| -> (serde_json::Value, BTreeMap<String, Tensor>) {
            let c = serde_json::from_str(
                &std::fs::read_to_string(d.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            let t = Tensor::read_safetensors(d.join("adapter_model.safetensors")).unwrap();
            (c, t.into_iter().collect())
        };
        let (ours, ours_t) = read(&ckpt);
        let (peft_c, peft_t) = read(&fixtures().join("peft").join(case).join("converted"));
        for key in ["use_rslora", "init_lora_weights"] {
            assert_eq!(ours[key], peft_c[key], "{case}: {key}");
        }
        for key in ["r", "lora_alpha"] {
            let (a, b) = (ours[key].as_f64().unwrap(), peft_c[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-9, "{case}: {key} {a} vs PEFT's {b}");
        }
        let scale = lora.scale();
        let (ours_d, peft_d) = (lora_products(&ours_t, scale), lora_products(&peft_t, scale));
        assert_eq!(
            ours_d.keys().collect::<Vec<_>>(),
            peft_d.keys().collect::<Vec<_>>()
        );
        for (module, d_ours) in &ours_d {
            let d = (d_ours - &peft_d[module]).abs().max().double_value(&[]);
            assert!(
                d < 1e-5,
                "{case} {module}: converted ΔW differs from PEFT's by {d:e}"
            );
        }
        let file = dir.path().join("logits.safetensors");
        Tensor::write_safetensors(
            &[
                ("input_ids", ids.shallow_clone()),
                ("attention_mask", mask.shallow_clone()),
                ("logits", logits),
            ],
            &file,
        )
        .unwrap();
        python_check("check_peft_load.py", &[&ckpt, &file]);
    }
}

#[test]
fn adalora_trains_prunes_and_saves_as_peft() {
    for case in ["gpt2_adalora", "llama_adalora"] {
        let (g, json) = golden(case);
        let s = &json["settings"];
        let steps = json["steps"].as_u64().unwrap() as usize;
        let base = fixtures().join(json["base"].as_str().unwrap());
        let (mut vs, mut model) = load_checkpoint(&base, LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
        let config: peft::AdaloraConfig = serde_json::from_value(serde_json::json!({
            "init_r": s["init_r"], "target_r": s["target_r"], "alpha": s["lora_alpha"],
            "dropout": 0.0, "target_modules": s["target_modules"], "layers": null,
            "tinit": s["tinit"], "tfinal": s["tfinal"], "delta_t": s["deltaT"],
            "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": s.get("orth_reg_weight").cloned().unwrap_or(0.5.into()),
        }))
        .unwrap();
        let mut tuning =
            peft::apply(&mut model, &mut vs, Some(&PeftConfig::Adalora(config))).unwrap();
        tuning.plan_updates(steps).unwrap();
        let adapters = tuning.adapters.as_ref().unwrap();
        tch::no_grad(|| {
            for (name, mut var) in adapters.variables() {
                var.copy_(&g[&format!("init.{name}")]);
            }
        });
        let a = &json["adamw"];
        let mut opt = tuning.optimizer(
            &vs,
            AdamWConfig {
                beta1: a["betas"][0].as_f64().unwrap(),
                beta2: a["betas"][1].as_f64().unwrap(),
                eps: a["eps"].as_f64().unwrap(),
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
        );
        let (ids, mask) = (&g["input_ids"], &g["attention_mask"]);
        let want_losses = Vec::<f64>::try_from(g["loss"].to_kind(Kind::Double)).unwrap();
        for (step, want) in want_losses.iter().enumerate() {
            let (_, logits) = model.forward(ids, Some(mask)).unwrap();
            let loss = temper_core::causal_lm_loss(&logits, ids, &lm_target_mask(mask));
            let loss = tuning.regularised(loss);
            let got = loss.double_value(&[]);
            assert!(
                (got - want).abs() < 1e-5,
                "{case} step {step}: loss with the regulariser {got} vs PEFT's {want}"
            );
            loss.backward();
            opt.update_then(0.0, a["lr"].as_f64().unwrap(), || tuning.after_update())
                .unwrap();
        }
        // The same factors (pruned singular values zero) and the same allocation.
        for (name, var) in adapters.variables() {
            let d = (&var - &g[&format!("final.{name}")])
                .abs()
                .max()
                .double_value(&[]);
            assert!(
                d < 1e-4,
                "{case}: {name} after training differs from PEFT's by {d:e}"
            );
        }
        let pattern = tuning.adalora.as_ref().unwrap().rank_pattern().unwrap();
        let want: BTreeMap<String, Vec<bool>> =
            serde_json::from_value(json["rank_pattern"].clone()).unwrap();
        assert_eq!(pattern, want, "{case}: rank pattern");
        let (_, logits) = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        assert!(
            d < 1e-4,
            "{case}: trained logits differ from PEFT's by {d:e}"
        );

        // Saved as PEFT saves it (pruned triplets dropped), and each side loads the other's.
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("adapter");
        save_over(&tuning, &model, &vs, &base, &ckpt);
        let ours = Tensor::read_safetensors(ckpt.join("adapter_model.safetensors")).unwrap();
        let theirs: BTreeMap<String, Tensor> = Tensor::read_safetensors(
            fixtures()
                .join("peft")
                .join(case)
                .join("adapter_model.safetensors"),
        )
        .unwrap()
        .into_iter()
        .collect();
        assert_eq!(ours.len(), theirs.len(), "{case}: saved tensors");
        for (key, t) in &ours {
            let want = &theirs[key];
            assert_eq!(t.size(), want.size(), "{case}: {key} shape");
            if t.numel() == 0 {
                continue; // a layer the allocation left no rank
            }
            let d = (t - want).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{case}: saved {key} differs from PEFT's by {d:e}");
        }
        let file = dir.path().join("logits.safetensors");
        Tensor::write_safetensors(
            &[
                ("input_ids", ids.shallow_clone()),
                ("attention_mask", mask.shallow_clone()),
                ("logits", logits),
            ],
            &file,
        )
        .unwrap();
        python_check("check_peft_load.py", &[&ckpt, &file]);
        let (_vs, mut loaded, _t) = with_adapter(case, LoadSpec::CAUSAL_LM);
        let (_, logits) = tch::no_grad(|| loaded.forward(ids, Some(mask))).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        assert!(
            d < 1e-4,
            "{case}: PEFT's saved adapter in temper differs by {d:e}"
        );
        temper_core::peft::merge_adapters(&mut loaded);
        let (_, merged) = tch::no_grad(|| loaded.forward(ids, Some(mask))).unwrap();
        let d = max_diff_on(&merged, &g["logits"], mask);
        assert!(d < 1e-4, "{case}: merged AdaLoRA differs by {d:e}");
        eprintln!(
            "{case}: {steps} updates, losses, factors, rank pattern and saved files match PEFT"
        );
    }
}
