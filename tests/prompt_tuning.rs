//! Prompt and prefix tuning against the `peft` package (goldens by
//! scripts/make_peft_goldens.py): a prompt or prefix PEFT saved gives the same logits and the
//! same gradient for the virtual tokens, on GPT-2 and Llama (grouped-query attention);
//! generation with the KV cache agrees with full forwards; bypassed, the model is the base.

mod common;

use common::{max_diff_on, peft_golden, repo};

use tch::{Device, Kind, Tensor};
use temper_core::peft;
use temper_core::{generate, load_checkpoint, LoadSpec, SamplingConfig};

/// Next-token loss over real targets, as make_goldens' `lm_loss`.
fn lm_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let targets = ids.narrow(1, 1, t - 1);
    let ok = mask.narrow(1, 1, t - 1) * mask.narrow(1, 0, t - 1);
    let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    let picked = logp
        .gather(2, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1);
    -(picked * &ok).sum(Kind::Float) / ok.sum(Kind::Float)
}

#[test]
fn a_peft_prompt_gives_peft_logits_and_gradients() {
    for (case, base) in [
        ("gpt2_prompt", "gpt2"),
        ("llama_prompt", "llama"),
        ("gpt2_prefix", "gpt2"),
        ("llama_prefix", "llama"),
    ] {
        let g = peft_golden(case);
        let (mut vs, mut model) = load_checkpoint(
            &repo().join("tests/fixtures").join(base),
            LoadSpec::CAUSAL_LM,
            Device::Cpu,
        )
        .unwrap();
        let tuning = peft::load_adapter(
            &mut model,
            &mut vs,
            &repo().join("tests/fixtures").join("peft").join(case),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let (ids, mask) = (&g["input_ids"], &g["attention_mask"]);
        let (_, logits) = model.forward(ids, Some(mask)).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        eprintln!("{case}: max |logits - peft| = {d:.2e}");
        assert!(d < 1e-4, "{case}: logits differ by {d}");

        lm_loss(&logits, ids, mask).backward();
        let prompt = &tuning.adapters.as_ref().unwrap().variables()["prompt_embeddings"];
        let want = &g["grad.prompt_embeddings"];
        let rel = (prompt.grad() - want).abs().max().double_value(&[])
            / want.abs().max().double_value(&[]);
        eprintln!("{case}: gradient of the virtual tokens, relative difference {rel:.2e}");
        assert!(rel < 1e-4, "{case}: gradient differs by {rel}");

        // Bypassed, the prompt is gone: the base model's logits.
        let (_, plain) = load_checkpoint(
            &repo().join("tests/fixtures").join(base),
            LoadSpec::CAUSAL_LM,
            Device::Cpu,
        )
        .map(|(_, m)| tch::no_grad(|| m.forward(ids, Some(mask)).unwrap()))
        .unwrap();
        let bypassed =
            tuning.without_adapters(|| tch::no_grad(|| model.forward(ids, Some(mask)).unwrap().1));
        assert_eq!(
            max_diff_on(&bypassed, &plain, mask),
            0.0,
            "{case}: bypassed"
        );
    }
}

#[test]
fn generation_with_virtual_tokens_matches_full_forwards() {
    for (case, base) in [
        ("llama_prompt", "llama"),
        ("gpt2_prefix", "gpt2"),
        ("llama_prefix", "llama"),
    ] {
        greedy_matches_full_forwards(case, base);
    }
}

fn greedy_matches_full_forwards(case: &str, base: &str) {
    let (mut vs, mut model) = load_checkpoint(
        &repo().join("tests/fixtures").join(base),
        LoadSpec::CAUSAL_LM,
        Device::Cpu,
    )
    .unwrap();
    peft::load_adapter(
        &mut model,
        &mut vs,
        &repo().join("tests/fixtures").join("peft").join(case),
    )
    .unwrap();
    // Ragged prompts (left-padded inside generate), greedy.
    let prompts = vec![vec![5i64, 9, 13, 2, 7], vec![11, 3]];
    let out = generate(&model, &prompts, &SamplingConfig::greedy(6), &[1, 2]).unwrap();
    for (row, prompt) in prompts.iter().enumerate() {
        // Greedy by hand: a full forward over prompt + generated so far, no cache.
        let mut seq = prompt.clone();
        for step in 0..6 {
            let ids = Tensor::from_slice(&seq).unsqueeze(0);
            let (_, logits) = tch::no_grad(|| model.forward(&ids, None)).unwrap();
            let next = logits
                .get(0)
                .get(seq.len() as i64 - 1)
                .argmax(-1, false)
                .int64_value(&[]);
            let cached = out.tokens.int64_value(&[row as i64, step]);
            assert_eq!(cached, next, "{case}: row {row} step {step}");
            seq.push(next);
        }
    }
}

#[test]
fn a_prompt_adapter_loads_as_a_model_but_is_refused_as_an_init_to_train() {
    let dir = repo().join("tests/fixtures").join("peft/gpt2_prompt");
    let (mut vs, mut model) = load_checkpoint(&dir, LoadSpec::CAUSAL_LM, Device::Cpu).unwrap();
    assert_eq!(model.virtual_tokens(), 4);
    assert_eq!(model.token_room(), model.config.max_position - 4);
    let err = peft::apply(&mut model, &mut vs, None).err().unwrap();
    assert_eq!(err.field, "init");
    assert!(err.message.contains("cannot be merged"), "{}", err.message);
    // Settings are checked: no virtual tokens, and prompt tuning on a reward model.
    let (mut vs, mut model) = load_checkpoint(
        &repo().join("tests/fixtures").join("gpt2"),
        LoadSpec::CAUSAL_LM,
        Device::Cpu,
    )
    .unwrap();
    let zero = peft::PeftConfig::Prompt(peft::PromptConfig {
        num_virtual_tokens: 0,
        init_text: None,
    });
    let err = peft::apply(&mut model, &mut vs, Some(&zero)).err().unwrap();
    assert_eq!(err.field, "peft.num_virtual_tokens");
    let rm = LoadSpec {
        lm_head: false,
        score: temper_core::ScoreHead::Fresh,
    };
    let (mut vs, mut model) =
        load_checkpoint(&repo().join("tests/fixtures").join("gpt2"), rm, Device::Cpu).unwrap();
    let four = peft::PeftConfig::Prompt(peft::PromptConfig {
        num_virtual_tokens: 4,
        init_text: None,
    });
    let err = peft::apply(&mut model, &mut vs, Some(&four)).err().unwrap();
    assert!(
        err.message.contains("do not train or save a scalar head"),
        "{}",
        err.message
    );
}

#[test]
fn p_tuning_encoders_and_their_saved_output_give_peft_logits() {
    for (case, base, encoder) in [
        ("gpt2_ptuning", "gpt2", peft::EncoderKind::Mlp),
        ("llama_ptuning_lstm", "llama", peft::EncoderKind::Lstm),
    ] {
        let g = peft_golden(case);
        let (ids, mask) = (&g["input_ids"], &g["attention_mask"]);
        let spec = LoadSpec::CAUSAL_LM;
        // The adapter PEFT saved (the encoder's output) used as a prompt.
        let (mut vs, mut model) =
            load_checkpoint(&repo().join("tests/fixtures").join(base), spec, Device::Cpu).unwrap();
        peft::load_adapter(
            &mut model,
            &mut vs,
            &repo().join("tests/fixtures").join("peft").join(case),
        )
        .unwrap();
        let (_, logits) = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        eprintln!("{case}: saved output, max |logits - peft| = {d:.2e}");
        assert!(d < 1e-4, "{case}: {d}");

        // temper's own encoder with PEFT's weights: the same virtual tokens and gradient.
        let (mut vs, mut model) =
            load_checkpoint(&repo().join("tests/fixtures").join(base), spec, Device::Cpu).unwrap();
        let config = peft::PeftConfig::Ptuning(peft::PtuningConfig {
            num_virtual_tokens: g["encoder.embedding.weight"].size()[0],
            encoder,
            encoder_hidden_size: Some(16),
        });
        let tuning = peft::apply(&mut model, &mut vs, Some(&config)).unwrap();
        let vars = tuning.adapters.as_ref().unwrap().variables();
        let from_peft: Vec<(&String, &Tensor)> = g
            .iter()
            .filter(|(k, _)| k.starts_with("encoder."))
            .collect();
        assert_eq!(vars.len(), from_peft.len(), "{case}: {:?}", vars.keys());
        tch::no_grad(|| {
            for (k, t) in from_peft {
                let name = k.replacen("encoder.", "prompt_encoder.", 1);
                vars[&name].shallow_clone().copy_(t);
            }
        });
        let (_, logits) = model.forward(ids, Some(mask)).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        eprintln!("{case}: {encoder:?} encoder, max |logits - peft| = {d:.2e}");
        assert!(d < 1e-4, "{case}: {d}");
        lm_loss(&logits, ids, mask).backward();
        let grad = vars["prompt_encoder.embedding.weight"].grad();
        let want = &g["grad.prompt_embeddings"];
        let rel = (grad - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        eprintln!("{case}: gradient of the encoder's input, relative difference {rel:.2e}");
        assert!(rel < 1e-4, "{case}: {rel}");
    }
}

#[test]
fn bottleneck_adapters_match_transformers_with_hooks_and_start_as_the_identity() {
    for (case, base, blocks_with_adapters) in [
        ("gpt2_adapter", "gpt2", 2),
        ("llama_adapter_drop", "llama", 1),
    ] {
        let g = peft_golden(case);
        let (ids, mask) = (&g["input_ids"], &g["attention_mask"]);
        let spec = LoadSpec::CAUSAL_LM;
        let (mut vs, mut model) =
            load_checkpoint(&repo().join("tests/fixtures").join(base), spec, Device::Cpu).unwrap();
        let (_, plain) = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        let tuning = peft::load_adapter(
            &mut model,
            &mut vs,
            &repo().join("tests/fixtures").join("peft").join(case),
        )
        .unwrap();
        // Two adapters per block with adapters, four tensors each.
        let n = tuning.adapters.as_ref().unwrap().variables().len();
        assert_eq!(n, blocks_with_adapters * 2 * 4, "{case}");
        let (_, logits) = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        let d = max_diff_on(&logits, &g["logits"], mask);
        let moved = max_diff_on(&plain, &g["logits"], mask);
        eprintln!("{case}: max |logits - transformers with hooks| = {d:.2e} (adapters move them by {moved:.2})");
        assert!(d < 1e-4 && moved > 1e-2, "{case}: {d} / {moved}");
        let bypassed =
            tuning.without_adapters(|| tch::no_grad(|| model.forward(ids, Some(mask))).unwrap().1);
        assert_eq!(
            max_diff_on(&bypassed, &plain, mask),
            0.0,
            "{case}: bypassed"
        );

        // Fresh adapters start as the identity (up = 0).
        let (mut vs, mut model) =
            load_checkpoint(&repo().join("tests/fixtures").join(base), spec, Device::Cpu).unwrap();
        let fresh = peft::PeftConfig::Adapter(peft::BottleneckConfig {
            reduction: 4,
            activation: Default::default(),
            drop_layers: 0,
        });
        peft::apply(&mut model, &mut vs, Some(&fresh)).unwrap();
        let (_, start) = tch::no_grad(|| model.forward(ids, Some(mask))).unwrap();
        assert_eq!(
            max_diff_on(&start, &plain, mask),
            0.0,
            "{case}: identity at start"
        );
    }
}
