//! Critic-free RL: the advantages and clipped loss against TRL's GRPOTrainer on fixed log-probs
//! (tests/fixtures/grpo, made by scripts/make_goldens.py); temper-grpo on the tiny fixtures
//! raising a program reward and resuming to exactly the uninterrupted result; its bad inputs.

mod common;

use std::collections::BTreeMap;

use common::*;
use tch::{Kind, Tensor};
use temper_core::critic_free::{self, Aggregation, ClipSettings, RatioLevel, Scale};

fn golden() -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(repo().join("tests/fixtures/grpo/golden.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn advantages_and_clipped_losses_match_trl() {
    let g = golden();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/grpo/golden.json")).unwrap(),
    )
    .unwrap();
    let n_gen = json["num_generations"].as_i64().unwrap();
    let rewards = &g["rewards"];
    for (scale, key) in [
        (Scale::Group, "group"),
        (Scale::Batch, "batch"),
        (Scale::None, "none"),
    ] {
        let a = critic_free::group_advantages(rewards, n_gen, scale);
        let d = max_diff(&a, &g[&format!("advantages.{key}")]);
        assert!(d < 1e-5, "scale {key}: advantages differ by {d}");
    }
    let d = max_diff(
        &critic_free::rloo_advantages(rewards, n_gen),
        &g["advantages.rloo"],
    );
    assert!(d < 1e-6, "RLOO baseline differs by {d}");

    let mask = &g["mask"];
    let adv = critic_free::group_advantages(rewards, n_gen, Scale::Group);
    for (level, lname) in [
        (RatioLevel::Token, "token"),
        (RatioLevel::Sequence, "sequence"),
    ] {
        for (aggregation, aname) in [
            (Aggregation::Grpo, "grpo"),
            (Aggregation::Bnpo, "bnpo"),
            (Aggregation::DrGrpo, "dr_grpo"),
            (Aggregation::Dapo, "dapo"),
        ] {
            let logp = g["logp"].copy().set_requires_grad(true);
            let settings = ClipSettings {
                epsilon: json["epsilon_low"].as_f64().unwrap(),
                epsilon_high: json["epsilon_high"].as_f64().unwrap(),
                level,
                aggregation,
                beta: json["beta"].as_f64().unwrap(),
                max_len: json["max_completion_length"].as_i64().unwrap(),
                batch_tokens: mask.sum(Kind::Float).double_value(&[]),
                whole: None,
            };
            let (loss, _) = critic_free::clipped_loss(
                &logp,
                &g["old_logp"],
                Some(&g["ref_logp"]),
                &adv,
                mask,
                &settings,
            );
            loss.backward();
            let key = format!("{lname}.{aname}");
            let dl = max_diff(&loss, &g[&format!("{key}.loss")]);
            let dg = max_diff(&logp.grad(), &g[&format!("{key}.grad")]);
            eprintln!("{key}: |loss − TRL| {dl:.1e}, |grad − TRL| {dg:.1e}");
            assert!(dl < 1e-6 && dg < 1e-6, "{key}: loss {dl}, gradient {dg}");
        }
    }
}

/// GRPO on the tiny SFT model with a length reward (0 within 1–4 reply tokens, −0.1 per token
/// outside), which the tiny policy can move within a few iterations.
fn grpo_config(dir: &std::path::Path, sft: &std::path::Path, extra: &str) -> std::path::PathBuf {
    write(
        &dir.join("grpo.yaml"),
        &format!(
            "policy: {}\nprompts: {}\nrewards:\n  - {{kind: length, min: 1, max: 4, penalty: 0.1}}\n\
             num_generations: 4\nprompts_per_iteration: 4\niterations: 12\nmax_new_tokens: 16\n\
             optim: {{lr: 1.0e-3, min_lr: 1.0e-3, warmup_steps: 0}}\nsave_every: 2\nsample_every: 4\nseed: 7\n{extra}",
            sft.display(),
            tiny("prompts.jsonl").display()
        ),
    )
}

#[test]
fn grpo_rloo_and_reinforce_pp_raise_a_program_reward_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, _) = sft_and_reward(dir.path());
    for (name, extra) in [
        ("grpo", "beta: 0.04\n"),
        ("rloo", "algorithm: rloo\nupdates_per_iteration: 2\nminibatch_size: 8\n"),
        ("reinforce_pp", "algorithm: reinforce_pp\nbeta: 0.01\n"),
        (
            "dr_grpo",
            "scale: none\nloss_aggregation: dr_grpo\nepsilon_high: 0.28\nimportance: sequence\ndynamic_sampling: true\n",
        ),
    ] {
        let cfg = grpo_config(dir.path(), &sft, extra);
        let out = dir.path().join(name);
        assert_ok(&run_stage("temper-grpo", &cfg, &out), name);
        let rows = metrics(&out);
        assert_eq!(rows.len(), 12, "{name}: one row per iteration");
        let reward: Vec<f64> = rows.iter().map(|r| r["reward/mean"].as_f64().unwrap()).collect();
        let (first, last) = (reward[..3].iter().sum::<f64>(), reward[9..].iter().sum::<f64>());
        assert!(last > first, "{name}: the reward did not rise: {reward:?}");
        for k in [
            "reward/length",
            "reward/std_within_group",
            "frac_zero_std_groups",
            "kl",
            "clipfrac",
            "entropy",
            "response/len_mean",
            "tokens_per_s",
        ] {
            assert!(rows.iter().all(|r| r[k].is_number()), "{name}: {k} missing");
        }
        if name == "grpo" {
            // beta > 0: a reference is held and the KL is measured.
            assert!(rows.iter().skip(1).any(|r| r["kl"].as_f64().unwrap() > 0.0));
            let killed = dir.path().join("killed");
            let saved = kill_after_saved_step("temper-grpo", &cfg, &killed, 4);
            assert_ok(&run_stage("temper-grpo", &cfg, &killed), "resumed grpo");
            assert!(
                std::fs::read(out.join("checkpoint/model.safetensors")).unwrap()
                    == std::fs::read(killed.join("checkpoint/model.safetensors")).unwrap(),
                "weights differ after resuming from iteration {saved}"
            );
            assert_eq!(deterministic_metrics(&out), deterministic_metrics(&killed));
        }
    }
}

#[test]
fn bad_rewards_and_settings_exit_cleanly_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, _) = sft_and_reward(dir.path());
    // Invalid settings: exit 2, one line, nothing written.
    let missing_answer = format!(
        "policy: {}\nprompts: {}\nrewards: [{{kind: exact_match}}]\nprompts_per_iteration: 2\niterations: 2\n",
        sft.display(),
        tiny("prompts.jsonl").display()
    );
    let one_generation = grpo_config(dir.path(), &sft, "num_generations: 1\n");
    let one_generation = std::fs::read_to_string(one_generation)
        .unwrap()
        .replace("num_generations: 4\n", "");
    // Reward settings that need no model are refused by `--validate` too, at their key.
    let rewards = |list: &str| {
        format!(
            "policy: {}\nprompts: {}\nrewards: {list}\nprompts_per_iteration: 2\niterations: 2\n",
            sft.display(),
            tiny("prompts.jsonl").display()
        )
    };
    for (list, words) in [
        (
            "[{kind: regex, pattern: \"(\"}]",
            "field `rewards.0.pattern`: pattern `(`",
        ),
        (
            "[{kind: length, min: 5, max: 2}]",
            "field `rewards.0.min`: 5 is above max 2",
        ),
        (
            "[{kind: command, command: [surely-no-such-program-here]}]",
            "program `surely-no-such-program-here` is not on PATH",
        ),
        (
            "[{kind: command, command: [sh], inputs: [no-such-file.txt]}]",
            "no-such-file.txt not found",
        ),
        (
            "[{kind: length, min: 1, max: 4}, {kind: length, min: 2, max: 3}]",
            "a second reward named `length`",
        ),
    ] {
        let cfg = write(&dir.path().join("bad.yaml"), &rewards(list));
        assert_refused("temper-grpo", &cfg, &dir.path().join("bad-out"), words);
        let out = run(
            "temper-grpo",
            &[
                "--validate",
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                "unused",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code() == Some(2) && err.contains(words), "{err}");
    }
    for (yaml, words) in [
        (
            missing_answer,
            "exact_match reads `answer`, which the example lacks",
        ),
        (
            one_generation,
            "field `num_generations`: must be at least 2 for Grpo",
        ),
    ] {
        let cfg = write(&dir.path().join("bad.yaml"), &yaml);
        assert_refused("temper-grpo", &cfg, &dir.path().join("bad-out"), words);
    }
    // Reward commands that fail at run time: the stage fails (exit 1) with one line naming the
    // command and what it printed, and keeps its last saved state.
    let script = |body: &str| {
        let path = write(&dir.path().join("reward.sh"), body);
        format!("[bash, {}]", path.display())
    };
    for (body, words) in [
        (
            "read line; echo 1.0; read line; echo banana\n",
            "answered `banana`, not a number",
        ),
        ("read line; exit 3\n", "exited"),
        ("read line; sleep 30\n", "no answer within 1.0s"),
    ] {
        let cmd = script(body);
        let cfg = grpo_config(dir.path(), &sft, "");
        let yaml = std::fs::read_to_string(&cfg).unwrap().replace(
            "  - {kind: length, min: 1, max: 4, penalty: 0.1}\n",
            &format!("  - {{kind: command, command: {cmd}, timeout_s: 1}}\n"),
        );
        let cfg = write(&dir.path().join("cmd.yaml"), &yaml);
        let out = dir.path().join("cmd-out");
        let _ = std::fs::remove_dir_all(&out);
        let res = run_stage("temper-grpo", &cfg, &out);
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{body}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{body}: one line: {err}");
        assert!(
            err.contains("reward.sh"),
            "{body}: names the command: {err}"
        );
        assert!(err.contains(words), "{body}: {err}");
    }
}
