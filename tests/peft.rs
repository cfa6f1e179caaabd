//! Parameter-efficient fine-tuning against the `peft` package, on adapters PEFT itself saved
//! (tests/fixtures/peft/<case>/, made by scripts/make_peft_goldens.py): logits with the adapters
//! attached and after merging, gradients of every adapter tensor, and one AdamW step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
        let a = &json["adamw"];
        let mut opt = tuning.optimizer(
            &vs,
            AdamWConfig {
                beta1: a["betas"][0].as_f64().unwrap(),
                beta2: a["betas"][1].as_f64().unwrap(),
                eps: a["eps"].as_f64().unwrap(),
                weight_decay: a["weight_decay"].as_f64().unwrap(),
                ..AdamWConfig::default()
            },
        );
        opt.step(a["lr"].as_f64().unwrap()).unwrap();
        for (key, want) in g.iter().filter(|(k, _)| k.starts_with("step.")) {
            let got = tensor_for(&key["step.".len()..], &vs, &tuning);
            let d = (&got - want).abs().max().double_value(&[]);
            assert!(
                d < 1e-6,
                "{case}: {key} after one AdamW step differs by {d:.2e}"
            );
        }
        eprintln!("{case}: {} gradients and one AdamW step match", grads.len());
    }
}

#[test]
fn a_lora_reward_model_scores_as_peft_sequence_classification() {
    let (g, _) = golden("gpt2_rm_lora");
    let spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let (_vs, model, _t) = with_adapter("gpt2_rm_lora", spec);
    let mask = &g["attention_mask"];
    let hidden = model
        .hidden_states(&g["input_ids"], Some(mask), None)
        .unwrap();
    let scores = model.last_token_scores(&hidden, mask).unwrap();
    let d = (&scores - &g["scores"]).abs().max().double_value(&[]);
    assert!(d < 1e-5, "LoRA reward scores differ by {d}");
    // Loaded as a checkpoint (base + adapter merged), the scores are the same.
    let dir = fixtures().join("peft/gpt2_rm_lora");
    let (_vs, merged) = load_checkpoint(&dir, spec, Device::Cpu).unwrap();
    let hidden = merged
        .hidden_states(&g["input_ids"], Some(mask), None)
        .unwrap();
    let d = (&merged.last_token_scores(&hidden, mask).unwrap() - &g["scores"])
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

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a Python check script of the project venv; panics with its output on failure.
fn python_check(script: &str, args: &[&Path]) {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup.sh",
        python.display()
    );
    let out = std::process::Command::new(&python)
        .arg(repo().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    eprintln!("{}", text.lines().last().unwrap_or(""));
}

fn summary(work: &Path, stage: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(work.join("stages").join(stage).join("summary.json"));
    serde_json::from_str(&text.unwrap()).unwrap()
}

/// configs/tiny_peft.yaml end to end (LoRA continued pretraining, DoRA SFT over that adapter,
/// merge, LoRA and head-only reward models, PPO with LoRA actor and critic, DPO with LoRA),
/// then `peft` itself loads what temper saved and computes the same outputs.
#[test]
fn peft_in_every_stage_and_peft_loads_what_temper_saved() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let out = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/temper"),
    )
    .arg("run")
    .arg(repo().join("configs/tiny_peft.yaml"))
    .arg("--workdir")
    .arg(&work)
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tiny_peft failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Parameter-efficient stages train a small part of the model and save adapters.
    for stage in [
        "adapt",
        "sft",
        "sft_prefix",
        "sft_ptuning",
        "sft_adapter",
        "sft_adalora",
        "reward",
        "reward_adapter",
        "ppo",
        "dpo",
    ] {
        let s = summary(&work, stage);
        let (t, n) = (
            s["params/trainable"].as_i64().unwrap(),
            s["params/total"].as_i64().unwrap(),
        );
        assert!(t > 0 && t * 5 < n, "{stage}: {t} of {n} parameters trained");
        let ckpt = work.join("stages").join(stage).join("checkpoint");
        assert!(
            ckpt.join("adapter_model.safetensors").exists(),
            "{stage}: no adapter"
        );
        assert!(
            !ckpt.join("model.safetensors").exists(),
            "{stage}: a full copy was saved"
        );
    }
    // The QLoRA actor holds its base's dense layers in NF4 (under 1/6 of fp32 with the
    // maxima and the partial blocks of this narrow model).
    let ppo = summary(&work, "ppo");
    let (dense, nf4) = (
        ppo["quant/base_bytes_dense"].as_i64().unwrap(),
        ppo["quant/base_bytes_nf4"].as_i64().unwrap(),
    );
    assert!(nf4 * 6 < dense, "QLoRA base: {nf4} bytes vs {dense} dense");
    // The head-only reward model trains the score head alone.
    let head = summary(&work, "reward_head");
    assert_eq!(head["params/trainable"].as_i64(), Some(64));
    // The LoRA actor is its own reference: no second model is loaded.
    let ppo_log = std::fs::read_to_string(work.join("logs/ppo.log")).unwrap();
    assert!(
        ppo_log.contains("reference: the actor with its adapters bypassed"),
        "{ppo_log}"
    );

    // PEFT loads the PiSSA adapter (saved converted, over the pretrained base), the DoRA SFT adapter (over the base written beside it, since its own start
    // was an adapter), the LoRA reward model (over the merged checkpoint), the QLoRA actor and
    // the prompt-tuned DPO policy and the prefix- and P-tuned SFTs, and computes what temper
    // computes.
    let g = golden("gpt2_lora").0;
    let vocab = 300;
    let ids = g["input_ids"].remainder(vocab);
    let mask = &g["attention_mask"];
    let ids = &ids * mask;
    for (stage, seq_cls) in [
        ("adapt", false),
        ("sft", false),
        ("reward", true),
        ("ppo", false),
        ("dpo", false),
        ("sft_prefix", false),
        ("sft_ptuning", false),
        ("sft_adalora", false),
    ] {
        let ckpt = work.join("stages").join(stage).join("checkpoint");
        let spec = if seq_cls {
            LoadSpec {
                lm_head: false,
                score: ScoreHead::Load,
            }
        } else {
            LoadSpec::CAUSAL_LM
        };
        let (_vs, model) = load_checkpoint(&ckpt, spec, Device::Cpu).unwrap();
        let file = dir.path().join(format!("{stage}_logits.safetensors"));
        let mut tensors = vec![
            ("input_ids", ids.shallow_clone()),
            ("attention_mask", mask.shallow_clone()),
        ];
        if seq_cls {
            // Unpadded rows with no pad or EOS id in them: transformers finds the last token
            // by the pad id, temper by the mask.
            let full = Tensor::ones_like(mask);
            let plain = g["input_ids"].remainder(vocab - 2) + 2;
            let hidden = tch::no_grad(|| model.hidden_states(&plain, Some(&full), None)).unwrap();
            let scores = model.last_token_scores(&hidden, &full).unwrap();
            tensors = vec![
                ("input_ids", plain),
                ("attention_mask", full),
                ("scores", scores),
            ];
        } else {
            let (_, logits) = tch::no_grad(|| model.forward(&ids, Some(mask))).unwrap();
            tensors.push(("logits", logits));
        }
        Tensor::write_safetensors(&tensors, &file).unwrap();
        python_check("check_peft_load.py", &[&ckpt, &file]);
    }

    // The merged checkpoint is a plain Hugging Face model that transformers loads.
    let merged = work.join("stages/merged/checkpoint");
    let copy = dir.path().join("merged_copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(merged.join(f), copy.join(f)).unwrap();
    }
    let (_vs, model) = load_checkpoint(&merged, LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
    let (_, logits) = tch::no_grad(|| model.forward(&ids, Some(mask))).unwrap();
    Tensor::write_safetensors(
        &[
            ("input_ids", ids.shallow_clone()),
            ("attention_mask", mask.shallow_clone()),
            ("logits", logits),
        ],
        copy.join("temper_logits.safetensors"),
    )
    .unwrap();
    python_check("check_hf_load.py", &[&copy]);
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

#[test]
fn a_bottleneck_reward_model_saves_its_head_and_scores_the_same_when_loaded() {
    let base = fixtures().join("gpt2_rm");
    let spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let (mut vs, mut model) = load_checkpoint(&base, spec, Device::Cpu).unwrap();
    let config: PeftConfig =
        serde_json::from_value(serde_json::json!({"method": "adapter", "reduction": 4})).unwrap();
    let tuning = peft::apply(&mut model, &mut vs, Some(&config)).unwrap();
    // Only the adapters and the head train.
    let head: i64 = vs
        .variables()
        .iter()
        .filter(|(n, t)| n.starts_with("score.") && t.requires_grad())
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let adapters: i64 = tuning
        .adapters
        .as_ref()
        .unwrap()
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    assert!(head > 0);
    assert_eq!(tuning.counts(&vs).0, head + adapters);
    // Moved as training would move them.
    tch::manual_seed(5);
    tch::no_grad(|| {
        for store in [&vs, tuning.adapters.as_ref().unwrap()] {
            for (_, mut t) in store.variables() {
                if t.requires_grad() {
                    let noise = t.randn_like() * 0.1;
                    let _ = t.g_add_(&noise);
                }
            }
        }
    });
    let g = golden("gpt2_lora").0;
    let ids = g["input_ids"].remainder(model.config.vocab_size - 2) + 2;
    let mask = Tensor::ones_like(&ids);
    let score = |m: &Transformer| {
        let hidden = tch::no_grad(|| m.hidden_states(&ids, Some(&mask), None)).unwrap();
        m.last_token_scores(&hidden, &mask).unwrap()
    };
    let trained = score(&model);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("rm");
    save_over(&tuning, &model, &vs, &base, &ckpt);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["score"]));
    let (_vs, loaded) = load_checkpoint(&ckpt, spec, Device::Cpu).unwrap();
    let d = (score(&loaded) - &trained).abs().max().double_value(&[]);
    assert!(
        d < 1e-6,
        "the reloaded reward model scores differently by {d:e}"
    );
    // Without its saved head the base's own head scores something else.
    let (_vs, plain) = load_checkpoint(&base, spec, Device::Cpu).unwrap();
    let d = (score(&plain) - &trained).abs().max().double_value(&[]);
    assert!(d > 1e-3, "the adapters and head changed nothing ({d:e})");
}
