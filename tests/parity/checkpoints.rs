//! Checkpoints both ways: temper writes what transformers loads, and a tensor it cannot load is
//! named with its shapes.

use super::*;

#[test]
fn a_renamed_tensor_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("llama");
    for f in ["config.json", WEIGHTS_FILE] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(src.join(WEIGHTS_FILE))
        .unwrap()
        .into_iter()
        .map(|(k, t)| match k.as_str() {
            "model.layers.1.self_attn.k_proj.weight" => {
                ("model.layers.1.self_attn.key.weight".into(), t)
            }
            _ => (k, t),
        })
        .collect();
    Tensor::write_safetensors(&renamed, dir.path().join(WEIGHTS_FILE)).unwrap();
    let err = load_checkpoint(dir.path(), LoadSpec::CAUSAL_LM, Device::Cpu)
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, CoreError::CheckpointMismatch { .. }), "{msg}");
    assert!(
        msg.contains("missing tensor(s) model.layers.1.self_attn.k_proj.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected tensor(s) model.layers.1.self_attn.key.weight"),
        "{msg}"
    );
}

#[test]
fn a_misshapen_tensor_is_named_with_both_shapes() {
    let g = fixture("gpt2");
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let mut config = temper_core::ModelConfig::from_hf_json(&g.join("config.json")).unwrap();
    config.max_position = 32; // the file has 64 positions
    let _model = Transformer::new(
        &vs.root(),
        &config,
        temper_core::model::Heads {
            lm: true,
            score: false,
        },
    )
    .unwrap();
    let msg = load_weights(&vs, &config, &g.join(WEIGHTS_FILE), LoadSpec::CAUSAL_LM)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("transformer.wpe.weight has shape [64, 32], the model expects [32, 32]"),
        "{msg}"
    );
}

/// A checkpoint temper writes (after training steps, so it differs from the fixture) loads in
/// transformers, which then computes the same logits. Runs the project venv's Python.
#[test]
fn saved_checkpoint_loads_in_transformers_with_the_same_logits() {
    for family in FAMILIES {
        let (vs, model) = load(family);
        let g = golden(family);
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
        for _ in 0..2 {
            let (_, logits) = model
                .forward(&g["input_ids"], Some(&g["attention_mask"]))
                .unwrap();
            opt.zero_grad();
            temper_core::causal_lm_loss(
                &logits,
                &g["input_ids"],
                &lm_target_mask(&g["attention_mask"]),
            )
            .backward();
            opt.step(1e-2).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(&model, &vs, dir.path()).unwrap();
        let (_, logits) =
            tch::no_grad(|| model.forward(&g["input_ids"], Some(&g["attention_mask"]))).unwrap();
        Tensor::write_safetensors(
            &[
                ("input_ids", g["input_ids"].shallow_clone()),
                ("attention_mask", g["attention_mask"].shallow_clone()),
                ("logits", logits),
            ],
            dir.path().join("temper_logits.safetensors"),
        )
        .unwrap();
        super::common::python_check("check_hf_load.py", &[dir.path()]);
        // And temper reads its own checkpoint back bit for bit.
        let (_vs2, again) = load_checkpoint(dir.path(), LoadSpec::CAUSAL_LM, device()).unwrap();
        let (_, l2) =
            tch::no_grad(|| again.forward(&g["input_ids"], Some(&g["attention_mask"]))).unwrap();
        let (_, l1) =
            tch::no_grad(|| model.forward(&g["input_ids"], Some(&g["attention_mask"]))).unwrap();
        assert_eq!(l1, l2, "{family}: reload changed the logits");
    }
}

#[test]
fn a_sharded_bf16_checkpoint_loads_with_transformers_logits() {
    // transformers' save_pretrained in bf16 with a 40 KB shard limit: two shards and an index.
    let dir = fixture("llama_sharded_bf16");
    let g = golden("llama_sharded_bf16");
    let (_vs, model) = load_checkpoint(&dir, LoadSpec::CAUSAL_LM, device()).unwrap();
    let mask = &g["attention_mask"];
    let (_, logits) = tch::no_grad(|| model.forward(&g["input_ids"], Some(mask))).unwrap();
    let d = max_diff_on(&logits, &g["logits"], mask);
    eprintln!("sharded bf16 Llama: max |logits - transformers| = {d:.2e}");
    assert!(d < 1e-4, "{d}");

    // A shard the index lists but the folder lacks is named.
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name();
        if name != "model-00002-of-00002.safetensors" {
            std::fs::copy(entry.path(), tmp.path().join(name)).unwrap();
        }
    }
    let err = load_checkpoint(tmp.path(), LoadSpec::CAUSAL_LM, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors.index.json")
            && err.contains("shard `model-00002-of-00002.safetensors` is listed"),
        "{err}"
    );
}
