//! The parity ladder: temper-core against transformers on checked-in goldens
//! (tests/fixtures/<family>/, made by scripts/make_goldens.py). CPU, fp32, tight tolerances.
//! Every test runs over every family: GPT-2, Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms,
//! head_dim apart from the width), Mistral (sliding window) and Llama 3.1 (rope scaling,
//! attention and MLP biases, tied embeddings).

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

#[test]
fn logits_logprobs_and_loss_match_transformers() {
    for family in FAMILIES {
        let (_vs, model) = load(family);
        let g = golden(family);
        let mask = &g["attention_mask"];
        let (_, logits) = model.forward(&g["input_ids"], Some(mask)).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        eprintln!("{family}: max |logits - transformers| on real tokens = {d:.2e}");
        assert!(d < 1e-4, "{family}: logits differ by {d}");

        let ids = &g["input_ids"];
        let t = ids.size()[1];
        let lp = temper_core::token_logprobs(&logits.narrow(1, 0, t - 1), &ids.narrow(1, 1, t - 1));
        let targets = lm_target_mask(mask).narrow(1, 1, t - 1);
        let d = max_diff_on(&lp, &g["logprobs"], &targets);
        assert!(d < 1e-4, "{family}: log-probs differ by {d}");

        let loss =
            temper_core::causal_lm_loss(&logits, ids, &lm_target_mask(mask)).double_value(&[]);
        let want = g["loss"].double_value(&[]);
        assert!(
            (loss - want).abs() < 1e-4,
            "{family}: loss {loss} vs {want}"
        );
    }
}

#[test]
fn padded_rows_match_their_unpadded_selves() {
    for family in FAMILIES {
        let (_vs, model) = load(family);
        let g = golden(family);
        let (_, padded) = model
            .forward(&g["input_ids"], Some(&g["attention_mask"]))
            .unwrap();
        for row in [1, 2] {
            let real = g["attention_mask"].get(row).to_kind(Kind::Bool);
            let ids = g["input_ids"].get(row).masked_select(&real).unsqueeze(0);
            let (_, alone) = model.forward(&ids, None).unwrap();
            let n = real.sum(Kind::Int64).int64_value(&[]);
            let idx = real.nonzero().squeeze_dim(1);
            let ours = padded.get(row).index_select(0, &idx).view([1, n, -1]);
            let d = (ours - alone).abs().max().double_value(&[]);
            assert!(
                d < 1e-4,
                "{family} row {row}: padded vs unpadded differ by {d}"
            );
        }
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward_and_transformers_greedy() {
    for family in FAMILIES {
        let (_vs, model) = load(family);
        let g = golden(family);
        let (prompt, mask) = (&g["greedy_prompt_ids"], &g["greedy_prompt_mask"]);
        let (b, p) = prompt.size2().unwrap();
        let mut cache = KvCache::new(&model.config, b, p + 16, Kind::Float, Device::Cpu);
        let mut seq = prompt.shallow_clone();
        let mut seq_mask = mask.shallow_clone();
        let mut step_ids = prompt.shallow_clone();
        let mut step_mask = mask.shallow_clone();
        let mut worst: f64 = 0.0;
        for _ in 0..16 {
            let h = model
                .hidden_states(&step_ids, Some(&step_mask), Some(&mut cache))
                .unwrap();
            let cached = model.logits(&h).unwrap().select(1, -1); // (B, V)
            let (_, full) = model.forward(&seq, Some(&seq_mask)).unwrap();
            let full = full.select(1, -1);
            worst = worst.max((&cached - &full).abs().max().double_value(&[]));
            let next = full.argmax(-1, true); // (B, 1)
            seq = Tensor::cat(&[&seq, &next], 1);
            seq_mask = Tensor::cat(&[&seq_mask, &next.ones_like()], 1);
            step_ids = next.shallow_clone();
            step_mask = next.ones_like();
        }
        eprintln!("{family}: max |KV-cache logits - full forward| over 16 steps = {worst:.2e}");
        assert!(
            worst < 1e-4,
            "{family}: cached logits drift {worst} from full forwards"
        );
        let ours_full = seq.narrow(1, p, 16);
        assert_eq!(
            ours_full, g["greedy_tokens"],
            "{family}: greedy tokens differ from transformers"
        );

        let prompts: Vec<Vec<i64>> = (0..b)
            .map(|i| {
                let m = mask.get(i).to_kind(Kind::Bool);
                Vec::<i64>::try_from(prompt.get(i).masked_select(&m)).unwrap()
            })
            .collect();
        let gen = generate(&model, &prompts, &SamplingConfig::greedy(16), &[0, 0]).unwrap();
        assert_eq!(
            gen.tokens, g["greedy_tokens"],
            "{family}: sampler's greedy tokens differ"
        );
        assert!(bool::try_from(gen.mask.all()).unwrap());
    }
}

#[test]
fn three_adamw_steps_reproduce_reference_losses() {
    for family in FAMILIES {
        let (vs, model) = load(family);
        let g = golden(family);
        let want = Vec::<f64>::try_from(&g["adamw_losses"].to_kind(Kind::Double)).unwrap();
        // The settings torch.optim.AdamW ran with, as the golden script recorded them.
        let settings = &golden_json(family)["adamw"];
        let number = |k: &str| settings[k].as_f64().unwrap();
        let config = AdamWConfig {
            beta1: settings["betas"][0].as_f64().unwrap(),
            beta2: settings["betas"][1].as_f64().unwrap(),
            eps: number("eps"),
            weight_decay: number("weight_decay"),
            ..AdamWConfig::default()
        };
        let lr = number("lr");
        let mut opt = AdamW::new(&vs, config);
        for (step, want) in want.iter().enumerate() {
            let (_, logits) = model
                .forward(&g["input_ids"], Some(&g["attention_mask"]))
                .unwrap();
            let loss = temper_core::causal_lm_loss(
                &logits,
                &g["input_ids"],
                &lm_target_mask(&g["attention_mask"]),
            );
            let got = loss.double_value(&[]);
            eprintln!("{family} AdamW step {step}: loss {got:.6}, torch.optim.AdamW {want:.6}");
            assert!(
                (got - want).abs() < 1e-4,
                "{family} step {step}: loss {got} vs reference {want}"
            );
            opt.zero_grad();
            loss.backward();
            opt.step(lr).unwrap();
        }
    }
}

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
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup.sh",
        python.display()
    );
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
        let out = std::process::Command::new(&python)
            .arg(repo().join("scripts/check_hf_load.py"))
            .arg(dir.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{family}: transformers check failed:\n{text}"
        );
        // And temper reads its own checkpoint back bit for bit.
        let (_vs2, again) = load_checkpoint(dir.path(), LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
        let (_, l2) =
            tch::no_grad(|| again.forward(&g["input_ids"], Some(&g["attention_mask"]))).unwrap();
        let (_, l1) =
            tch::no_grad(|| model.forward(&g["input_ids"], Some(&g["attention_mask"]))).unwrap();
        assert_eq!(l1, l2, "{family}: reload changed the logits");
    }
}

#[test]
fn bf16_autocast_stays_close_to_fp32() {
    for family in FAMILIES {
        let (_vs, model) = load(family);
        let g = golden(family);
        let mask = &g["attention_mask"];
        let (_, fp32) = model.forward(&g["input_ids"], Some(mask)).unwrap();
        let (_, bf16) = with_autocast(Device::Cpu, Precision::Bf16, || {
            model.forward(&g["input_ids"], Some(mask))
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            bf16.kind(),
            Kind::BFloat16,
            "{family}: autocast did not engage"
        );
        let d = max_diff_on(&bf16.to_kind(Kind::Float), &fp32, mask);
        eprintln!("{family}: max |bf16 autocast logits - fp32| = {d:.3e}");
        // bf16 keeps 8 bits of mantissa: logits of magnitude ~1 differ by a few 1e-2 at most.
        assert!(d < 5e-2, "{family}: bf16 logits differ from fp32 by {d}");
        assert!(
            d > 0.0,
            "{family}: bf16 identical to fp32 means it did not run in bf16"
        );
    }
}

#[test]
fn sampling_is_seeded_per_sequence_and_stops_at_eos() {
    let (_vs, model) = load("gpt2");
    let prompts = vec![vec![5, 17, 42], vec![3, 14, 15, 92, 65], vec![8, 8]];
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: Some(20),
        top_p: Some(0.9),
        eos_token_id: None,
        also_stop: Vec::new(),
        pad_token_id: 0,
    };
    let all = generate(&model, &prompts, &cfg, &[1, 2, 3]).unwrap();
    let again = generate(&model, &prompts, &cfg, &[1, 2, 3]).unwrap();
    assert_eq!(all.tokens, again.tokens, "same seeds, different samples");
    // A sequence's sample depends on its seed only, not on the rest of the batch.
    let alone = generate(&model, &prompts[1..2], &cfg, &[2]).unwrap();
    assert_eq!(all.tokens.get(1), alone.tokens.get(0));
    let other = generate(&model, &prompts, &cfg, &[1, 99, 3]).unwrap();
    assert_ne!(all.tokens.get(1), other.tokens.get(1), "seed had no effect");

    // top-k 1 is greedy.
    let k1 = SamplingConfig {
        top_k: Some(1),
        top_p: None,
        ..cfg.clone()
    };
    let greedy = generate(&model, &prompts, &SamplingConfig::greedy(12), &[0, 0, 0]).unwrap();
    assert_eq!(
        generate(&model, &prompts, &k1, &[4, 5, 6]).unwrap().tokens,
        greedy.tokens
    );

    // Returned log-probs are the model's at temperature 1 for the chosen tokens.
    let (ids, mask) = left_pad(&prompts, 0, Device::Cpu);
    let full = Tensor::cat(&[&ids, &all.tokens], 1);
    let full_mask = Tensor::cat(&[&mask, &all.mask.to_kind(Kind::Int64)], 1);
    let (_, logits) = model.forward(&full, Some(&full_mask)).unwrap();
    let p = ids.size()[1];
    let n = all.tokens.size()[1];
    let lp = temper_core::token_logprobs(&logits.narrow(1, p - 1, n), &all.tokens);
    let d = (lp - &all.logprobs).abs().max().double_value(&[]);
    assert!(
        d < 1e-4,
        "sampler log-probs differ from a forward pass by {d}"
    );

    // EOS: make the first greedy token of sequence 0 the EOS; it stops there, others go on.
    let eos = greedy.tokens.int64_value(&[0, 0]);
    let with_eos = SamplingConfig {
        eos_token_id: Some(eos),
        also_stop: Vec::new(),
        ..SamplingConfig::greedy(12)
    };
    let stopped = generate(&model, &prompts, &with_eos, &[0, 0, 0]).unwrap();
    let row0 = Vec::<bool>::try_from(stopped.mask.get(0)).unwrap();
    assert!(
        row0[0] && row0[1..].iter().all(|m| !m),
        "sequence 0 mask after EOS: {row0:?}"
    );
    assert!(
        stopped
            .tokens
            .get(0)
            .narrow(0, 1, stopped.tokens.size()[1] - 1)
            .eq(0)
            .all()
            .int64_value(&[])
            == 1
    );
    // The same id as one of several stop ids (a generation_config list) stops the same way.
    let listed = SamplingConfig {
        eos_token_id: None,
        also_stop: vec![eos + 1, eos],
        ..SamplingConfig::greedy(12)
    };
    let by_list = generate(&model, &prompts, &listed, &[0, 0, 0]).unwrap();
    assert_eq!(by_list.mask, stopped.mask);
    assert_eq!(by_list.tokens, stopped.tokens);
}

#[test]
fn step_zero_gradients_match_transformers() {
    for family in FAMILIES {
        let (vs, model) = load(family);
        let g = golden(family);
        let mask = &g["attention_mask"];
        let (_, logits) = model.forward(&g["input_ids"], Some(mask)).unwrap();
        temper_core::causal_lm_loss(&logits, &g["input_ids"], &lm_target_mask(mask)).backward();
        let vars = vs.variables();
        let mut worst = (0.0, String::new());
        for (key, want) in g.iter().filter(|(k, _)| k.starts_with("grad.")) {
            let name = &key["grad.".len()..];
            // transformers ties GPT-2's lm_head to wte; only the embedding is a parameter.
            let var = vars
                .get(name)
                .unwrap_or_else(|| panic!("{family}: no variable {name}"));
            let got = var.grad();
            let scale = want.abs().max().double_value(&[]).max(1e-6);
            let d = (&got - want).abs().max().double_value(&[]) / scale;
            if d > worst.0 {
                worst = (d, name.to_string());
            }
        }
        let count = g.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            count,
            vars.len(),
            "{family}: a gradient for every parameter"
        );
        eprintln!(
            "{family}: worst gradient relative difference {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(
            worst.0 < 1e-4,
            "{family}: gradient of {} differs by {:.2e} (relative)",
            worst.1,
            worst.0
        );
    }
}

#[test]
fn reward_model_scores_match_sequence_classification() {
    // The Llama-layout families share one scalar-head layout: Qwen2 stands for the rest.
    for family in ["gpt2", "llama", "qwen2"] {
        let dir = repo().join("tests/fixtures").join(format!("{family}_rm"));
        let spec = LoadSpec {
            lm_head: false,
            score: temper_core::ScoreHead::Load,
        };
        let (_vs, model) = load_checkpoint(&dir, spec, Device::Cpu).expect("reward fixture loads");
        let g: BTreeMap<String, Tensor> = Tensor::read_safetensors(dir.join("golden.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        let mask = &g["attention_mask"];
        let hidden = model
            .hidden_states(&g["input_ids"], Some(mask), None)
            .unwrap();
        let scores = model.last_token_scores(&hidden, mask).unwrap();
        let d = (&scores - &g["scores"]).abs().max().double_value(&[]);
        eprintln!("{family}: max |score - {family}ForSequenceClassification| = {d:.2e}");
        assert!(d < 1e-5, "{family}: reward scores differ by {d}");
    }
}

#[test]
fn top_k_and_top_p_keep_what_transformers_keeps() {
    let dir = repo().join("tests/fixtures/sampling");
    let g: BTreeMap<String, Tensor> = Tensor::read_safetensors(dir.join("golden.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let scaled = &g["logits"] / json["temperature"].as_f64().unwrap();
    for (key, top_k, top_p) in [
        ("top_k_5", Some(5), None),
        ("top_p_0.8", None, Some(0.8)),
        ("top_k_10_top_p_0.8", Some(10), Some(0.8)),
    ] {
        let ours = temper_core::sample::truncate(&scaled, top_k, top_p);
        let want = &g[key];
        let kept = |t: &Tensor| t.isfinite();
        assert!(
            kept(&ours).equal(&kept(want)),
            "{key}: different tokens kept"
        );
        let d = (ours.masked_select(&kept(want)) - want.masked_select(&kept(want)))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-6, "{key}: kept logits differ by {d}");
    }
}

#[test]
fn the_sentiment_judge_matches_the_vader_package() {
    let dir = repo().join("tests/fixtures/vader");
    let judge = temper_core::rewards::SentimentJudge::load(&dir.join("lexicon.txt")).unwrap();
    let golden = std::fs::read_to_string(dir.join("golden.jsonl")).unwrap();
    let mut worst = (0.0, String::new());
    let mut n = 0;
    for line in golden.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = row["text"].as_str().unwrap();
        let got = judge.judge(text).compound;
        // The package rounds to 4 decimals.
        let d = (got - row["compound"].as_f64().unwrap()).abs();
        if d > worst.0 {
            worst = (d, text.to_string());
        }
        n += 1;
    }
    eprintln!(
        "VADER: {n} texts, worst |compound - vaderSentiment| = {:.1e}",
        worst.0
    );
    assert!(n > 300);
    assert!(
        worst.0 <= 5.1e-5,
        "compound differs by {} on {:?}",
        worst.0,
        worst.1
    );
}

fn preference_golden() -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(repo().join("tests/fixtures/preference/golden.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn preference_losses_and_gradients_match_trl() {
    use temper_core::preference::{self as pref, PairLogps};
    let g = preference_golden();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/preference/golden.json")).unwrap(),
    )
    .unwrap();
    let num = |k: &str| json[k].as_f64().unwrap();
    let (beta, eps, gamma) = (num("beta"), num("label_smoothing"), num("simpo_gamma"));
    let reference = PairLogps {
        chosen: g["reference_chosen"].shallow_clone(),
        rejected: g["reference_rejected"].shallow_clone(),
        chosen_len: g["chosen_len"].shallow_clone(),
        rejected_len: g["rejected_len"].shallow_clone(),
    };
    type LossFn<'a> = Box<dyn Fn(&PairLogps) -> Tensor + 'a>;
    let r = &reference;
    let cases: Vec<(&str, LossFn)> = vec![
        (
            "sigmoid",
            Box::new(|p| pref::dpo_sigmoid(p, r, beta, 0.0).mean(Kind::Float)),
        ),
        (
            "cdpo",
            Box::new(|p| pref::dpo_sigmoid(p, r, beta, eps).mean(Kind::Float)),
        ),
        (
            "hinge",
            Box::new(|p| pref::hinge(p, r, beta).mean(Kind::Float)),
        ),
        ("ipo", Box::new(|p| pref::ipo(p, r, beta).mean(Kind::Float))),
        (
            "simpo",
            Box::new(|p| pref::simpo(p, beta, gamma).mean(Kind::Float)),
        ),
        (
            "orpo",
            Box::new(|p| {
                let nll = -p.chosen.sum(Kind::Float) / p.chosen_len.sum(Kind::Float);
                nll - pref::orpo_odds_ratio(p, beta).mean(Kind::Float)
            }),
        ),
        (
            "kto",
            Box::new(|p| {
                // The pairs as unpaired examples: chosen desirable, rejected not.
                let logratios = Tensor::cat(&[&p.chosen - &r.chosen, &p.rejected - &r.rejected], 0);
                let desirable =
                    Tensor::from_slice(&[true, true, true, true, false, false, false, false]);
                let mismatched = &g["kto_mismatched_logratios"];
                let kl = pref::kto_kl(mismatched, &mismatched.zeros_like());
                pref::kto(
                    &logratios,
                    &desirable,
                    &kl,
                    beta,
                    num("desirable_weight"),
                    num("undesirable_weight"),
                )
                .mean(Kind::Float)
            }),
        ),
    ];
    for (name, loss_fn) in cases {
        let policy = PairLogps {
            chosen: g["policy_chosen"].copy().set_requires_grad(true),
            rejected: g["policy_rejected"].copy().set_requires_grad(true),
            chosen_len: g["chosen_len"].shallow_clone(),
            rejected_len: g["rejected_len"].shallow_clone(),
        };
        let loss = loss_fn(&policy);
        loss.backward();
        let d = (&loss - &g[&format!("{name}.loss")])
            .abs()
            .double_value(&[]);
        let dc = (policy.chosen.grad() - &g[&format!("{name}.grad_chosen")])
            .abs()
            .max()
            .double_value(&[]);
        let dr = (policy.rejected.grad() - &g[&format!("{name}.grad_rejected")])
            .abs()
            .max()
            .double_value(&[]);
        eprintln!("{name}: |loss − TRL| {d:.1e}, |∂chosen| {dc:.1e}, |∂rejected| {dr:.1e}");
        assert!(
            d < 1e-5 && dc < 1e-6 && dr < 1e-6,
            "{name}: loss {d}, gradients {dc} {dr}"
        );
    }
}

#[test]
fn dpo_on_a_real_forward_matches_the_reference_computation() {
    let g = preference_golden();
    let (_p, policy) = load("gpt2");
    let (_r, reference) = load_checkpoint(
        &repo().join("tests/fixtures/preference/reference"),
        LoadSpec::CAUSAL_LM,
        Device::Cpu,
    )
    .unwrap();
    let ids = &g["forward.ids"];
    let mask = &g["forward.completion_mask"];
    let attention = ids.ones_like();
    let logps = |m: &Transformer| {
        temper_core::scoring::completion_logps(m, ids, &attention, mask, Precision::Fp32)
            .unwrap()
            .0
    };
    let (lp, rlp) = (logps(&policy), logps(&reference));
    let d = (&lp - &g["forward.policy_logps"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-4, "policy completion log-probs differ by {d}");
    let d = (&rlp - &g["forward.reference_logps"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-4, "reference completion log-probs differ by {d}");
    let pair = |x: &Tensor| temper_core::preference::PairLogps {
        chosen: x.narrow(0, 0, 2),
        rejected: x.narrow(0, 2, 2),
        chosen_len: Tensor::ones([2], (Kind::Float, Device::Cpu)),
        rejected_len: Tensor::ones([2], (Kind::Float, Device::Cpu)),
    };
    let loss =
        temper_core::preference::dpo_sigmoid(&pair(&lp), &pair(&rlp), 0.2, 0.0).mean(Kind::Float);
    let d = (loss - &g["forward.sigmoid_loss"]).abs().double_value(&[]);
    eprintln!("DPO on a real forward: |loss − reference| = {d:.1e}");
    assert!(d < 1e-5, "DPO loss differs by {d}");
}

#[test]
fn a_sharded_bf16_checkpoint_loads_with_transformers_logits() {
    // transformers' save_pretrained in bf16 with a 40 KB shard limit: two shards and an index.
    let dir = fixture("llama_sharded_bf16");
    let g = golden("llama_sharded_bf16");
    let (_vs, model) = load_checkpoint(&dir, LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
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
