//! The model core computes what transformers computes: forward, cache, gradients, steps.

use super::*;

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
        let mut cache = KvCache::new(&model.config, b, p + 16, Kind::Float, device());
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
fn bf16_autocast_stays_close_to_fp32() {
    for family in FAMILIES {
        let (_vs, model) = load(family);
        let g = golden(family);
        let mask = &g["attention_mask"];
        let (_, fp32) = model.forward(&g["input_ids"], Some(mask)).unwrap();
        let (_, bf16) = with_autocast(device(), Precision::Bf16, || {
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
        let (_vs, model) = load_checkpoint(&dir, spec, device()).expect("reward fixture loads");
        let g = read_golden(&dir.join("golden.safetensors"));
        let scores = super::common::golden_scores(&model, &g);
        let d = (&scores - &g["scores"]).abs().max().double_value(&[]);
        eprintln!("{family}: max |score - {family}ForSequenceClassification| = {d:.2e}");
        assert!(d < 1e-5, "{family}: reward scores differ by {d}");
    }
}
