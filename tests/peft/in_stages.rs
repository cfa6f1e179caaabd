//! Adapters in the stages: every stage of configs/tiny_peft.yaml trains with one and `peft`
//! loads what it saved; a bottleneck reward model keeps its head.

use super::*;

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
