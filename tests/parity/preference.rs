//! The preference losses against trl, and the sentiment judges against their reference
//! packages (vaderSentiment, the npm `sentiment` package for AFINN-165).

use super::*;

#[test]
fn the_sentiment_judge_matches_the_vader_package() {
    let dir = repo().join("tests/fixtures/vader");
    let judge = temper_rewards::SentimentJudge::load(&dir.join("lexicon.txt")).unwrap();
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

#[test]
fn the_afinn_judge_matches_the_sentiment_package() {
    // Integer valences summed: the score must match exactly, the comparative to f64 rounding.
    let dir = repo().join("tests/fixtures/afinn");
    let afinn = temper_rewards::Afinn::load(&dir.join("lexicon.txt")).unwrap();
    let golden = std::fs::read_to_string(dir.join("golden.jsonl")).unwrap();
    let (mut n, mut nonzero) = (0, 0);
    for line in golden.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = row["text"].as_str().unwrap();
        let got = afinn.score(text);
        assert_eq!(
            got.score,
            row["score"].as_f64().unwrap(),
            "score of {text:?}"
        );
        let want = row["comparative"].as_f64().unwrap();
        assert!(
            (got.comparative - want).abs() <= 1e-15,
            "comparative of {text:?}: {} against {want}",
            got.comparative
        );
        n += 1;
        nonzero += usize::from(got.score != 0.0);
    }
    assert!(n > 400 && nonzero > 200, "{n} texts, {nonzero} scored");
}

fn preference_golden() -> BTreeMap<String, Tensor> {
    read_golden(&repo().join("tests/fixtures/preference/golden.safetensors"))
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
                    Tensor::from_slice(&[true, true, true, true, false, false, false, false])
                        .to_device(device());
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
        device(),
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
        chosen_len: Tensor::ones([2], (Kind::Float, device())),
        rejected_len: Tensor::ones([2], (Kind::Float, device())),
    };
    let loss =
        temper_core::preference::dpo_sigmoid(&pair(&lp), &pair(&rlp), 0.2, 0.0).mean(Kind::Float);
    let d = (loss - &g["forward.sigmoid_loss"]).abs().double_value(&[]);
    eprintln!("DPO on a real forward: |loss − reference| = {d:.1e}");
    assert!(d < 1e-5, "DPO loss differs by {d}");
}
