//! PPO end to end on the tiny fixtures: the reward rises while the KL to the reference stays
//! bounded, and a run killed midway resumes to exactly the uninterrupted result; then the
//! evaluation stage compares PPO with SFT.

mod common;

use common::*;

/// A KL coefficient of 0.5 holds the tiny policy's KL under 5 nats on every seed tried (7, 1,
/// 2, 3: final KL 2.6–4.3); at 0.05 it ran to 4–15 depending on the seed.
fn ppo_config(
    dir: &std::path::Path,
    sft: &std::path::Path,
    rm: &std::path::Path,
) -> std::path::PathBuf {
    write(&dir.join("ppo.yaml"), &format!(
        "policy: {}\nreward_model: {}\nprompts: {}\niterations: 12\nbatch_size: 16\nminibatch_size: 8\nmax_new_tokens: 16\n\
         kl: {{coef: 0.5, estimator: k3}}\noptim: {{lr: 1.0e-4, min_lr: 1.0e-4, warmup_steps: 0}}\n\
         critic_optim: {{lr: 1.0e-4, min_lr: 1.0e-4, warmup_steps: 0}}\nsave_every: 2\nsample_every: 4\nseed: 7\n",
        sft.display(), rm.display(), tiny("prompts.jsonl").display()))
}

#[test]
fn ppo_raises_the_reward_with_bounded_kl_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, rm) = sft_and_reward(dir.path());
    let cfg = ppo_config(dir.path(), &sft, &rm);

    let whole = dir.path().join("ppo");
    assert_ok(&run_stage("temper-ppo", &cfg, &whole), "ppo");
    let rows = metrics(&whole);
    assert_eq!(rows.len(), 12, "one metrics row per iteration");
    let series = |k: &str| -> Vec<f64> { rows.iter().map(|r| r[k].as_f64().unwrap()).collect() };
    let reward = series("reward/mean");
    let (first, last) = (
        reward[..3].iter().sum::<f64>() / 3.0,
        reward[9..].iter().sum::<f64>() / 3.0,
    );
    assert!(last > first + 0.5, "mean reward did not rise: {reward:?}");
    let kl = series("kl/mean");
    assert!(
        kl.iter().all(|&k| (0.0..5.0).contains(&k)),
        "k3 KL must stay in [0, 5): {kl:?}"
    );
    for k in [
        "policy/clipfrac",
        "policy/approx_kl",
        "policy/entropy",
        "value/loss",
        "value/explained_var",
        "response/eos_rate",
        "kl/coef",
    ] {
        assert!(rows.iter().all(|r| r[k].is_number()), "{k} missing");
    }
    for f in [
        "checkpoint/model.safetensors",
        "checkpoint/tokenizer.json",
        "critic/model.safetensors",
        "samples.jsonl",
    ] {
        assert!(whole.join(f).exists(), "{f} missing");
    }

    let killed = dir.path().join("killed");
    let saved = kill_after_saved_step("temper-ppo", &cfg, &killed, 4);
    assert_ok(&run_stage("temper-ppo", &cfg, &killed), "resumed ppo");
    for f in ["checkpoint/model.safetensors", "critic/model.safetensors"] {
        assert!(
            std::fs::read(whole.join(f)).unwrap() == std::fs::read(killed.join(f)).unwrap(),
            "{f} differs after resuming from iteration {saved}"
        );
    }
    assert_eq!(
        deterministic_metrics(&whole),
        deterministic_metrics(&killed)
    );
    // TensorBoard's own reader finds every logged number in both runs' event files, and the
    // resumed run's holds none of the iterations it lost.
    let python = repo().join(".venv/bin/python");
    let out = std::process::Command::new(&python)
        .arg(repo().join("scripts/check_tensorboard.py"))
        .args([&whole, &killed])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let eval_cfg = write(
        &dir.path().join("eval.yaml"),
        &format!(
            "policies: {{ppo: {}, sft: {}}}\nbaseline: sft\nreward_model: {}\nprompts: {}\nmax_new_tokens: 16\n",
            whole.join("checkpoint").display(),
            sft.display(),
            rm.display(),
            tiny("prompts_eval.jsonl").display()
        ),
    );
    let eval = dir.path().join("eval");
    assert_ok(&run_stage("temper-eval", &eval_cfg, &eval), "eval");
    let s = summary(&eval);
    assert!(
        s["ppo/score"].as_f64().unwrap() > s["sft/score"].as_f64().unwrap(),
        "{s}"
    );
    assert!(s["ppo/win_rate"].as_f64().unwrap() > 0.5, "{s}");
    for k in [
        "ppo/kl",
        "ppo/len",
        "ppo/eos_rate",
        "ppo/distinct_1",
        "ppo/distinct_2",
        "sft/len",
    ] {
        assert!(s[k].is_number(), "{k} missing: {s}");
    }
    assert!(std::fs::read_to_string(eval.join("report.md"))
        .unwrap()
        .contains("| win_rate | - |"));
}

/// Program rewards beside the reward model: a `length` range PPO must climb (the replies grow
/// towards it and the term's mean rises), logged as `reward/length`; and in place of one (the
/// critic from the policy). A `model` entry, a reward reading a field the prompts lack, no
/// reward at all, or a critic to start from a missing reward model are refused with one line
/// before anything is written.
#[test]
fn ppo_adds_program_rewards_to_the_reward_model() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, rm) = sft_and_reward(dir.path());
    let base = std::fs::read_to_string(ppo_config(dir.path(), &sft, &rm)).unwrap();
    let with = |rewards: &str| {
        let yaml =
            format!("{base}rewards: {rewards}\n").replace("iterations: 12", "iterations: 10");
        write(&dir.path().join("ppo-rewards.yaml"), &yaml)
    };
    let cfg = with("[{kind: length, min: 16, max: 16, penalty: 0.5, weight: 2.0}]");
    let out = dir.path().join("ppo-length");
    assert_ok(
        &run_stage("temper-ppo", &cfg, &out),
        "ppo with a length reward",
    );
    let rows = metrics(&out);
    let series = |k: &str| -> Vec<f64> { rows.iter().map(|r| r[k].as_f64().unwrap()).collect() };
    let (length, len) = (series("reward/length"), series("response/len_mean"));
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        avg(&length[7..]) > avg(&length[..3]),
        "length term did not rise: {length:?}"
    );
    assert!(
        avg(&len[7..]) > avg(&len[..3]),
        "replies did not grow: {len:?}"
    );
    // The term is in the shaped reward: −0.5 × 2 per token short of 16 on top of the score.
    let shaped = series("reward/mean");
    let score = series("score/mean");
    for i in 0..rows.len() {
        let expected = score[i] + 2.0 * length[i];
        assert!(
            (shaped[i] - expected).abs() < 1e-4,
            "row {i}: {shaped:?} vs {score:?} + 2×{length:?}"
        );
    }

    // Without a reward model: the program rewards alone, the critic from the policy.
    let no_rm: String = base
        .lines()
        .filter(|l| !l.starts_with("reward_model:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let only = |name: &str, extra: &str| {
        let yaml = format!("{no_rm}{extra}").replace("iterations: 12", "iterations: 10");
        write(&dir.path().join(name), &yaml)
    };
    let cfg = only(
        "ppo-only.yaml",
        "critic_init: policy\nrewards: [{kind: length, min: 16, max: 16, penalty: 0.5}]\n",
    );
    let out = dir.path().join("ppo-no-rm");
    assert_ok(
        &run_stage("temper-ppo", &cfg, &out),
        "ppo with program rewards only",
    );
    let rows = metrics(&out);
    let length: Vec<f64> = rows
        .iter()
        .map(|r| r["reward/length"].as_f64().unwrap())
        .collect();
    assert!(
        avg(&length[7..]) > avg(&length[..3]),
        "length term did not rise: {length:?}"
    );
    assert!(
        rows.iter().all(|r| r.get("score/mean").is_none()),
        "no reward model, no score"
    );
    assert!(out.join("critic/model.safetensors").exists());
    for (cfg, words) in [
        (
            only("none.yaml", ""),
            "give `reward_model`, program `rewards`, or both",
        ),
        (
            only("critic.yaml", "rewards: [{kind: length, min: 1, max: 4}]\n"),
            "field `critic_init`: `reward` (the default) starts the critic from the reward model",
        ),
    ] {
        assert_refused("temper-ppo", &cfg, &dir.path().join("ppo-bad"), words);
    }

    for (rewards, words) in [
        (
            "[{kind: model, path: somewhere}]".to_string(),
            "field `rewards.0.kind`: PPO's reward model is `reward_model`",
        ),
        (
            "[{kind: exact_match}]".to_string(),
            "reward `exact_match`: exact_match reads `answer`, which the example lacks",
        ),
    ] {
        let cfg = with(&rewards);
        assert_refused("temper-ppo", &cfg, &dir.path().join("ppo-bad"), words);
    }
}

/// With a signed reward model (`temper_score_sign`), the critic is read with the same sign: it
/// predicts the unsigned value, as the reward model scores the unsigned reply. So the same
/// replies under "negative" prompts give exactly the negated returns and values of "positive"
/// ones, and the critic explains them equally well; a critic read unsigned would start
/// backwards on every negative prompt.
#[test]
fn a_signed_reward_model_signs_the_critic_too() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, rm) = sft_and_reward(dir.path());
    let signed = dir.path().join("signed_rm");
    std::fs::create_dir_all(&signed).unwrap();
    for entry in std::fs::read_dir(&rm).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, signed.join(path.file_name().unwrap())).unwrap();
    }
    let config = signed.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["temper_score_sign"] =
        serde_json::json!({"field": "sentiment", "map": {"positive": 1.0, "negative": -1.0}});
    std::fs::write(&config, json.to_string()).unwrap();
    let prompts = std::fs::read_to_string(tiny("prompts.jsonl")).unwrap();
    let mut explained = Vec::new();
    let mut scores = Vec::new();
    for sentiment in ["positive", "negative"] {
        let rows: String = prompts
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["sentiment"] = sentiment.into();
                format!("{v}\n")
            })
            .collect();
        let file = write(&dir.path().join(format!("{sentiment}.jsonl")), &rows);
        // No KL term and γ = λ = 1: each return is the reply's signed score.
        let cfg = write(
            &dir.path().join(format!("ppo_{sentiment}.yaml")),
            &format!(
                "policy: {}\nreward_model: {}\nprompts: {}\niterations: 1\nbatch_size: 16\n\
             minibatch_size: 8\nmax_new_tokens: 12\nkl: {{coef: 0.0}}\ngamma: 1.0\nlam: 1.0\n\
             save_every: 1\nseed: 7\n",
                sft.display(),
                signed.display(),
                file.display()
            ),
        );
        let out = dir.path().join(format!("ppo_{sentiment}"));
        assert_ok(&run_stage("temper-ppo", &cfg, &out), sentiment);
        let row = &metrics(&out)[0];
        explained.push(row["value/explained_var"].as_f64().unwrap());
        scores.push(row["score/mean"].as_f64().unwrap());
    }
    assert!(scores[0].abs() > 1e-3, "a score to sign: {scores:?}");
    assert!((scores[0] + scores[1]).abs() < 1e-6, "{scores:?}");
    assert!(
        (explained[0] - explained[1]).abs() < 1e-6,
        "the critic explains negative prompts as well as positive ones: {explained:?}"
    );
}
