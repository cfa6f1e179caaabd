//! Sampling: seeded per sequence, stopping at EOS, keeping what transformers' top-k/top-p keep.

use super::*;

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
    let (ids, mask) = left_pad(&prompts, 0, device());
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
