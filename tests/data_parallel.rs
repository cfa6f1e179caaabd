//! Data-parallel training over c10d's Gloo on this CPU, as real subprocesses: ranks of half
//! the batch train as one process with all of it (pretraining, SFT, reward model, DPO and GRPO,
//! launched by hand and by torchrun), a bad environment is one line, a killed rank stops the others and a rerun
//! resumes, and stages without data parallelism refuse a world above one.

mod common;

use std::path::Path;

use common::*;
use tch::Tensor;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter(|r| r["split"] == "train")
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

/// Every logged loss (train and eval) within 1e-5 step by step, and the final weights too.
fn assert_same_run(one: &Path, two: &Path) {
    let (a, b) = (train_losses(one), train_losses(two));
    assert_eq!(a.len(), b.len(), "logged steps");
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 1e-5,
            "step {step}: loss {x} (one process) vs {y} (two ranks)"
        );
    }
    let evals = |d: &Path| -> Vec<f64> {
        metrics(d)
            .iter()
            .filter(|r| r["split"] == "eval")
            .filter_map(|r| r["loss"].as_f64())
            .collect()
    };
    let (a, b) = (evals(one), evals(two));
    assert_eq!(a.len(), b.len(), "evaluations");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "eval loss {x} vs {y}");
    }
    let d = max_weight_diff(one, two);
    assert!(d < 1e-5, "final weights differ by {d:e}");
}

fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    max_diff_in(a, b, "checkpoint/model.safetensors")
}

/// The largest difference between two runs' weights in `file`, GPT-2's key bias aside.
fn max_diff_in(a: &Path, b: &Path, file: &str) -> f64 {
    let read = |d: &Path| -> std::collections::BTreeMap<String, Tensor> {
        Tensor::read_safetensors(d.join(file))
            .unwrap()
            .into_iter()
            .collect()
    };
    let (a, b) = (read(a), read(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    // The key bias (the middle third of GPT-2's c_attn bias) has an exactly zero gradient —
    // softmax ignores a constant added to every key's score — so its "gradient" is float noise
    // of ~1e-10 that AdamW divides by its own tiny second moment: its updates are noise of
    // ~1e-5 in any two runs whose sums differ in rounding (here: each rank pads its rows to its
    // own length). It carries no signal, so it is left out.
    let comparable = |k: &str, t: &Tensor| {
        if k.ends_with("attn.c_attn.bias") {
            let d = t.size()[0] / 3;
            let t = t.copy();
            let _ = t.narrow(0, d, d).fill_(0.0);
            t
        } else {
            t.shallow_clone()
        }
    };
    let (name, d) = a
        .iter()
        .map(|(k, t)| {
            let diff = comparable(k, t) - comparable(k, &b[k]);
            (k, diff.abs().max().double_value(&[]))
        })
        .fold(
            (None, 0.0),
            |m, (k, d)| if d > m.1 { (Some(k), d) } else { m },
        );
    eprintln!("largest weight difference {d:e} in {name:?}");
    d
}

#[test]
fn two_gloo_ranks_of_half_the_batch_train_as_one_process_with_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let whole = pretrain_config(dir.path(), &tok, 20, "");
    let text = std::fs::read_to_string(&whole).unwrap();
    let half = write(
        &dir.path().join("half.yaml"),
        &text.replace("batch_size: 8", "batch_size: 4"),
    );
    let one = dir.path().join("one");
    assert_ok(
        &run_stage("temper-pretrain", &whole, &one),
        "one process, batch 8",
    );

    // Two ranks of batch 4.
    let two = dir.path().join("two");
    for c in start_ranks("temper-pretrain", &half, &two, free_port(), 120) {
        assert_ok(&c.wait_with_output().unwrap(), "a rank of two");
    }
    assert_same_run(&one, &two);
    // Rank 0 alone wrote: the same files as the single process, and the same token count.
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&one), names(&two));
    assert_eq!(summary(&one)["tokens"], summary(&two)["tokens"]);

    // torchrun itself (from the project's venv) launches the binary unchanged.
    let torchrun = repo().join(".venv/bin/torchrun");
    let three = dir.path().join("three");
    let out = std::process::Command::new(&torchrun)
        .args([
            "--no-python",
            "--nproc-per-node",
            "2",
            "--master-port",
            &free_port().to_string(),
            bin("temper-pretrain").to_str().unwrap(),
            "--config",
            half.to_str().unwrap(),
            "--out",
            three.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out, "torchrun --no-python --nproc-per-node 2");
    let d = max_weight_diff(&two, &three);
    // torchrun sets OMP_NUM_THREADS=1, which changes the order of float sums in the kernels.
    assert!(
        d < 1e-5,
        "torchrun's run differs from the hand-launched one by {d:e}"
    );
}

#[test]
fn a_bad_distributed_environment_exits_2_with_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let cfg = pretrain_config(dir.path(), &tok, 2, "");
    for (env, words) in [
        (
            vec![("RANK", "2"), ("WORLD_SIZE", "2")],
            "RANK 2 is not below WORLD_SIZE 2",
        ),
        (
            vec![("RANK", "0"), ("WORLD_SIZE", "2")],
            "MASTER_ADDR is not set",
        ),
    ] {
        let out = dir.path().join("out");
        let res = std::process::Command::new(bin("temper-pretrain"))
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(words), "{err}");
        assert!(!out.exists(), "nothing written");
    }

    // `--validate` checks the placement but never waits for the other ranks: nobody else is
    // coming here, and it answers at once.
    let out = dir.path().join("validated");
    let started = std::time::Instant::now();
    let res = std::process::Command::new(bin("temper-pretrain"))
        .args(["--config", cfg.to_str().unwrap(), "--out"])
        .arg(&out)
        .arg("--validate")
        .envs([
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ])
        .env("MASTER_PORT", free_port().to_string())
        .env("TEMPER_DIST_TIMEOUT", "60")
        .output()
        .unwrap();
    assert_ok(&res, "--validate under a 2-rank environment");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "--validate waited {:?} for a rendezvous",
        started.elapsed()
    );
}

/// Starts the two ranks of a data-parallel run of `stage` on `port`, as torchrun would (its
/// environment variables); a rank waits at most `timeout_s` for the other.
fn start_ranks(
    stage: &str,
    cfg: &Path,
    out: &Path,
    port: u16,
    timeout_s: u32,
) -> Vec<std::process::Child> {
    (0..2)
        .map(|rank| {
            std::process::Command::new(bin(stage))
                .args([
                    "--config",
                    cfg.to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                ])
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("TEMPER_DIST_TIMEOUT", timeout_s.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_killed_rank_fails_the_other_and_a_rerun_resumes_to_the_same_weights() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let text = std::fs::read_to_string(pretrain_config(dir.path(), &tok, 40, "")).unwrap();
    // Big batches so that a step takes long enough to kill a rank midway.
    let cfg = write(
        &dir.path().join("dp.yaml"),
        &text.replace("batch_size: 8", "batch_size: 32"),
    );
    let whole = dir.path().join("whole");
    for c in start_ranks("temper-pretrain", &cfg, &whole, free_port(), 20) {
        assert_ok(&c.wait_with_output().unwrap(), "uninterrupted rank");
    }

    let out = dir.path().join("killed");
    let mut ranks = start_ranks("temper-pretrain", &cfg, &out, free_port(), 20);
    let saved = || saved_step(&out);
    let start = Instant::now();
    while saved().is_none_or(|s| s < 10) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no state written"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    ranks[1].kill().unwrap(); // SIGKILL
    ranks.pop().unwrap().wait().unwrap();
    let killed_at = Instant::now();
    let rank0 = ranks.pop().unwrap().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&rank0.stderr);
    assert!(
        !rank0.status.success(),
        "rank 0 carried on without rank 1: {err}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "rank 0 took {:?} to notice",
        killed_at.elapsed()
    );
    assert!(
        !out.join("summary.json").exists(),
        "the run finished before the kill"
    );
    eprintln!(
        "rank 0 stopped {:?} after rank 1 was killed: {}",
        killed_at.elapsed(),
        err.trim().lines().last().unwrap_or("")
    );
    let resumed_from = saved().unwrap();
    assert!(resumed_from < 40, "{resumed_from}");

    for c in start_ranks("temper-pretrain", &cfg, &out, free_port(), 20) {
        assert_ok(&c.wait_with_output().unwrap(), "resumed rank");
    }
    let d = max_weight_diff(&whole, &out);
    assert!(
        d < 1e-6,
        "resumed from step {resumed_from}: weights differ from the uninterrupted run by {d:e}"
    );
}

#[test]
fn sft_reward_and_dpo_on_two_ranks_match_one_process_even_when_a_rank_gets_no_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = pretrained(dir.path(), 20);
    // 239 examples in batches of 14: the last batch of each epoch has one row, so rank 1
    // gets none of it, and rows differ in length, so each rank's mean must count by tokens.
    let lines: Vec<String> = std::fs::read_to_string(tiny("sft.jsonl"))
        .unwrap()
        .lines()
        .take(239)
        .map(str::to_string)
        .collect();
    let data = write(&dir.path().join("sft.jsonl"), &(lines.join("\n") + "\n"));
    let config = |batch: usize, name: &str| {
        write(&dir.path().join(name), &format!(
            "init: {}\ndata: {}\neval_data: {}\nsteps: 20\nbatch_size: {batch}\noptim: {{lr: 2.0e-3, warmup_steps: 5}}\neval_every: 10\nsave_every: 10\nlog_every: 1\nsamples: 2\n",
            pre.join("checkpoint").display(), data.display(), tiny("sft_eval.jsonl").display()))
    };
    let one = dir.path().join("one");
    assert_ok(
        &run_stage("temper-sft", &config(14, "whole.yaml"), &one),
        "one process, batch 14",
    );
    let two = dir.path().join("two");
    for c in start_ranks(
        "temper-sft",
        &config(7, "half.yaml"),
        &two,
        free_port(),
        120,
    ) {
        assert_ok(&c.wait_with_output().unwrap(), "an SFT rank of two");
    }
    assert_same_run(&one, &two);
    assert_eq!(summary(&one)["tokens"], summary(&two)["tokens"]);
    // Rank 0 alone sampled: 2 replies at each of 3 evaluations.
    let samples = std::fs::read_to_string(two.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 6);

    // The reward model likewise, on 239 pairs (a last batch of 15 pairs: 8 and 7), each
    // rank scoring half of the held-out pairs.
    let lines: Vec<String> = std::fs::read_to_string(tiny("pairs.jsonl"))
        .unwrap()
        .lines()
        .take(239)
        .map(str::to_string)
        .collect();
    let pairs = write(&dir.path().join("pairs.jsonl"), &(lines.join("\n") + "\n"));
    let config = |batch: usize, name: &str| {
        write(&dir.path().join(name), &format!(
            "init: {}\ndata: {}\neval_data: {}\nsteps: 20\nbatch_size: {batch}\noptim: {{lr: 1.0e-3, warmup_steps: 5}}\neval_every: 10\nsave_every: 10\nlog_every: 1\n",
            one.join("checkpoint").display(), pairs.display(), tiny("pairs_eval.jsonl").display()))
    };
    let rm_one = dir.path().join("rm_one");
    assert_ok(
        &run_stage("temper-reward", &config(16, "rm_whole.yaml"), &rm_one),
        "one process, batch 16",
    );
    let rm_two = dir.path().join("rm_two");
    for c in start_ranks(
        "temper-reward",
        &config(8, "rm_half.yaml"),
        &rm_two,
        free_port(),
        120,
    ) {
        assert_ok(&c.wait_with_output().unwrap(), "a reward rank of two");
    }
    assert_same_run(&rm_one, &rm_two);
    let (a, b) = (summary(&rm_one), summary(&rm_two));
    assert_eq!(a["accuracy"], b["accuracy"], "held-out accuracy");

    // DPO from the SFT model on the same 239 pairs, the reference's log-probs precomputed by
    // rank 0 and read by rank 1.
    let config = |batch: usize, name: &str| {
        write(&dir.path().join(name), &format!(
            "policy: {}\ndata: {}\neval_data: {}\nsteps: 16\nbatch_size: {batch}\nbeta: 0.1\nprecompute_reference: true\noptim: {{lr: 1.0e-3, warmup_steps: 2}}\neval_every: 8\nsave_every: 8\nlog_every: 1\nmax_new_tokens: 4\n",
            one.join("checkpoint").display(), pairs.display(), tiny("pairs_eval.jsonl").display()))
    };
    let dpo_one = dir.path().join("dpo_one");
    assert_ok(
        &run_stage("temper-dpo", &config(16, "dpo_whole.yaml"), &dpo_one),
        "DPO, one process, batch 16",
    );
    let dpo_two = dir.path().join("dpo_two");
    for c in start_ranks(
        "temper-dpo",
        &config(8, "dpo_half.yaml"),
        &dpo_two,
        free_port(),
        120,
    ) {
        assert_ok(&c.wait_with_output().unwrap(), "a DPO rank of two");
    }
    assert_same_run(&dpo_one, &dpo_two);
    let accuracy = |d: &Path| summary(d)["rewards/accuracies"].as_f64().unwrap();
    assert_eq!(
        accuracy(&dpo_one),
        accuracy(&dpo_two),
        "held-out reward accuracy"
    );
}

/// Every iteration's `keys` equal within `tolerance` (relative above 1) in the one-process run
/// and the two-rank run, which both logged `rows` iterations.
fn assert_same_metrics(
    one: &Path,
    two: &Path,
    rows: usize,
    keys: &[&str],
    tolerance: f64,
    name: &str,
) {
    let (a, b) = (metrics(one), metrics(two));
    assert_eq!(a.len(), rows, "{name}: one row per iteration");
    assert_eq!(a.len(), b.len(), "{name}: rows");
    for (x, y) in a.iter().zip(&b) {
        for k in keys {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(
                (u - v).abs() < tolerance * u.abs().max(1.0),
                "{name} step {}: {k} {u} (one process) vs {v} (two ranks)",
                x["step"]
            );
        }
    }
}

const GRPO_KEYS: &[&str] = &[
    "reward/mean",
    "reward/std",
    "reward/length",
    "frac_zero_std_groups",
    "response/len_mean",
    "response/eos_rate",
    "loss",
    "kl",
    "clipfrac",
    "entropy",
    "grad_norm",
    "tokens",
];

const PPO_KEYS: &[&str] = &[
    "reward/mean",
    "reward/std",
    "score/mean",
    "kl/mean",
    "kl/coef",
    "policy/loss",
    "policy/clipfrac",
    "policy/approx_kl",
    "policy/entropy",
    "value/loss",
    "value/explained_var",
    "response/len_mean",
    "response/eos_rate",
    "grad_norm",
    "tokens",
];

/// GRPO's ranks each sample and score half of the prompts (whole groups) with the seeds one
/// process gives those rows; batch-scaled advantages, REINFORCE++'s whitening and the loss
/// denominators are the whole rollout's; minibatches of 6 replies straddle the ranks. So two
/// ranks of 2 prompts × 4 replies train as one process of 4 prompts: the same replies and
/// rewards, the same losses, the same weights.
#[test]
fn grpo_on_two_ranks_matches_one_process_with_the_whole_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, _) = sft_and_reward(dir.path());
    let config = |prompts: usize, name: &str, extra: &str| {
        write(
            &dir.path().join(name),
            &format!(
                "policy: {}\nprompts: {}\nrewards: [{{kind: length, min: 1, max: 4, penalty: 0.1}}]\n\
                 num_generations: 4\nprompts_per_iteration: {prompts}\niterations: 6\nmax_new_tokens: 12\n\
                 minibatch_size: 6\noptim: {{lr: 1.0e-3, min_lr: 1.0e-3, warmup_steps: 0}}\n\
                 save_every: 3\nsample_every: 3\nseed: 7\n{extra}",
                sft.display(),
                tiny("prompts.jsonl").display()
            ),
        )
    };
    // REINFORCE++ whitens every token's return over both ranks' sums (f64) where one process
    // reduces one f32 tensor: the advantages differ by ~1e-7 and twelve Adam updates carry that
    // to ~1e-5 in weights whose gradients are tiny, so its bounds are looser.
    for (name, extra, tolerance, weights) in [
        ("grpo", "scale: batch\nloss_aggregation: bnpo\nbeta: 0.05\n", 1e-5, 1e-5),
        (
            "reinforce_pp",
            "algorithm: reinforce_pp\nbeta: 0.05\nloss_aggregation: dapo\nupdates_per_iteration: 2\n",
            1e-4,
            5e-5,
        ),
    ] {
        let one = dir.path().join(format!("{name}_one"));
        let cfg = config(4, &format!("{name}_whole.yaml"), extra);
        assert_ok(&run_stage("temper-grpo", &cfg, &one), name);
        let two = dir.path().join(format!("{name}_two"));
        let cfg = config(2, &format!("{name}_half.yaml"), extra);
        for c in start_ranks("temper-grpo", &cfg, &two, free_port(), 120) {
            assert_ok(&c.wait_with_output().unwrap(), "a GRPO rank of two");
        }
        assert_same_metrics(&one, &two, 6, GRPO_KEYS, tolerance, name);
        let d = max_weight_diff(&one, &two);
        assert!(d < weights, "{name}: final weights differ by {d:e}");
        // Rank 0 alone wrote: its samples (the first groups), the state, the summary.
        assert!(two.join("samples.jsonl").exists() && two.join("summary.json").exists());
    }
}

/// PPO's ranks each sample, score and evaluate (critic, reference) half of the prompts;
/// reward normalisation, advantage whitening, the adaptive KL controller and every logged
/// number see the whole batch; minibatches of 6 straddle the ranks, with separate actor and
/// critic optimizers and with one shared. Two ranks of 8 prompts train as one process of 16.
#[test]
fn ppo_on_two_ranks_matches_one_process_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, rm) = sft_and_reward(dir.path());
    let config =
        |batch: usize, name: &str, extra: &str| {
            write(
                &dir.path().join(name),
                &format!(
            "policy: {}\nreward_model: {}\nprompts: {}\niterations: 5\nbatch_size: {batch}\n\
             minibatch_size: 6\nmax_new_tokens: 12\nreward_normalize: true\n\
             kl: {{coef: 0.2, target: 1.0, horizon: 100, estimator: k3}}\n\
             optim: {{lr: 1.0e-4, min_lr: 1.0e-4, warmup_steps: 0}}\n\
             critic_optim: {{lr: 1.0e-4, min_lr: 1.0e-4, warmup_steps: 0}}\n\
             save_every: 5\nsample_every: 5\nseed: 7\n{extra}",
            sft.display(), rm.display(), tiny("prompts.jsonl").display()),
            )
        };
    for (name, extra) in [("separate", ""), ("shared", "optimizer: shared\n")] {
        let one = dir.path().join(format!("ppo_{name}_one"));
        let cfg = config(16, &format!("ppo_{name}_whole.yaml"), extra);
        assert_ok(&run_stage("temper-ppo", &cfg, &one), name);
        let two = dir.path().join(format!("ppo_{name}_two"));
        let cfg = config(8, &format!("ppo_{name}_half.yaml"), extra);
        for c in start_ranks("temper-ppo", &cfg, &two, free_port(), 120) {
            assert_ok(&c.wait_with_output().unwrap(), "a PPO rank of two");
        }
        assert_same_metrics(&one, &two, 5, PPO_KEYS, 1e-5, name);
        let d = max_weight_diff(&one, &two);
        assert!(d < 1e-5, "{name}: final actor weights differ by {d:e}");
        let d = max_diff_in(&one, &two, "critic/model.safetensors");
        assert!(d < 1e-5, "{name}: final critic weights differ by {d:e}");
        let state = |d: &Path| summary(d)["reward/mean"].as_f64().unwrap();
        assert!((state(&one) - state(&two)).abs() < 1e-5);
    }
}

#[test]
fn a_stage_without_data_parallelism_refuses_a_world_above_one() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, rm) = sft_and_reward(dir.path());
    let cfg = write(
        &dir.path().join("eval.yaml"),
        &format!(
            "policies: {{sft: {0}, again: {0}}}\nbaseline: sft\nreward_model: {1}\nprompts: {2}\nmax_new_tokens: 4\n",
            sft.display(),
            rm.display(),
            tiny("prompts_eval.jsonl").display()
        ),
    );
    let out = dir.path().join("eval");
    let res = std::process::Command::new(bin("temper-eval"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("does not train data-parallel"), "{err}");
    assert!(!out.exists(), "nothing written");
}

/// A one-stage pipeline: data-parallel pretraining with `resources`, in `dir/<name>/`.
fn dp_pipeline(dir: &Path, name: &str, resources: &str, steps: u64) -> std::path::PathBuf {
    let tok = tokenizer(dir);
    write(
        &dir.join(format!("{name}.yaml")),
        &format!(
            "name: dp\nworkdir: {name}\nstages:\n  lm:\n    uses: pretrain\n    resources: {resources}\n    with:\n      tokenizer: {}\n      data: [{}]\n      model: {{arch: gpt2, n_layer: 2, n_head: 2, d_model: 64, max_position: 64}}\n      block_size: 64\n      steps: {steps}\n      batch_size: 16\n      optim: {{lr: 3.0e-3, warmup_steps: 10}}\n      eval_every: 20\n      save_every: 5\n      log_every: 5\n      cache_dir: {}\n",
            tok.display(),
            tiny("corpus.txt").display(),
            dir.join("cache").display()
        ),
    )
}

fn temper_run(file: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("temper"));
    cmd.args(["run", file.to_str().unwrap()])
        .env("TEMPER_TORCHRUN", repo().join(".venv/bin/torchrun"))
        .env("TEMPER_DIST_TIMEOUT", "60");
    cmd
}

#[test]
fn temper_run_launches_the_ranks_itself_or_through_torchrun_and_a_signal_stops_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let lm = |name: &str| dir.path().join(name).join("stages/lm");

    let file = dp_pipeline(dir.path(), "own", "{nproc: 2}", 30);
    let out = temper_run(&file).output().unwrap();
    assert_ok(&out, "temper run with nproc: 2");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("on 2 ranks"), "{said}");
    let rank1 = std::fs::read_to_string(dir.path().join("own/logs/lm.rank1.log")).unwrap();
    assert!(rank1.contains("rank 1 of 2"), "{rank1}");

    let file = dp_pipeline(dir.path(), "torchrun", "{nproc: 2, launcher: torchrun}", 30);
    assert_ok(&temper_run(&file).output().unwrap(), "launcher: torchrun");
    let d = max_weight_diff(&lm("own"), &lm("torchrun"));
    assert!(d < 1e-5, "temper's ranks and torchrun's differ by {d:e}");

    // SIGTERM to `temper run` mid-stage: both ranks stop, and the rerun resumes to the
    // uninterrupted run's weights.
    let file = dp_pipeline(dir.path(), "stopped", "{nproc: 2}", 30);
    let mut child = temper_run(&file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let attempt = dir.path().join("stopped/stages/.lm.next");
    let start = std::time::Instant::now();
    while saved_step(&attempt).is_none_or(|s| s < 5) {
        assert!(start.elapsed().as_secs() < 300, "no state written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(130), "interrupted");
    wait_until_gone(&attempt.to_string_lossy());
    let stopped_at = saved_step(&attempt).unwrap();
    let out = temper_run(&file).output().unwrap();
    assert_ok(&out, "resumed");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("resuming"), "{said}");
    let d = max_weight_diff(&lm("own"), &lm("stopped"));
    assert!(
        d < 1e-6,
        "stopped at step {stopped_at} and resumed: differs by {d:e}"
    );

    // A stage without data parallelism asking for ranks is refused before anything runs.
    let bad = write(
        &dir.path().join("bad.yaml"),
        "name: bad\nworkdir: badwork\nstages:\n  e:\n    uses: eval\n    resources: {nproc: 2}\n    with: {}\n",
    );
    let out = std::process::Command::new(bin("temper"))
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("temper-eval does not train data-parallel"),
        "{err}"
    );
}

#[test]
fn temper_export_slurm_writes_a_chain_of_jobs_that_run_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let file = write(
        &dir.path().join("p.yaml"),
        &format!(
            "name: chain\nworkdir: work\nstages:\n  lm:\n    uses: pretrain\n    with:\n      tokenizer: {}\n      data: [{}]\n      model: {{arch: gpt2, n_layer: 1, n_head: 2, d_model: 32, max_position: 32}}\n      block_size: 32\n      steps: 3\n      batch_size: 4\n      cache_dir: {}\n  sft:\n    uses: sft\n    resources: {{nproc: 2, nnodes: 2}}\n    matrix: {{seed: [1, 2]}}\n    with: {{init: \"${{lm.checkpoint}}\", data: {}, steps: 2, batch_size: 4}}\n",
            tok.display(),
            tiny("corpus.txt").display(),
            dir.path().join("cache").display(),
            tiny("sft.jsonl").display()
        ),
    );
    let slurm = dir.path().join("slurm");
    let out = std::process::Command::new(bin("temper"))
        .args(["export", "slurm", file.to_str().unwrap(), "--out"])
        .arg(&slurm)
        .arg("--sbatch=--partition=gpu")
        .output()
        .unwrap();
    assert_ok(&out, "temper export slurm");
    let names: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&slurm)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names,
        [
            "1-lm.sbatch",
            "2-sft-seed-1.sbatch",
            "3-sft-seed-2.sbatch",
            "submit.sh"
        ]
    );
    for n in &names {
        let check = std::process::Command::new("bash")
            .arg("-n")
            .arg(slurm.join(n))
            .output()
            .unwrap();
        assert_ok(&check, &format!("bash -n {n}"));
    }
    let sft = std::fs::read_to_string(slurm.join("2-sft-seed-1.sbatch")).unwrap();
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --partition=gpu",
        "export MASTER_ADDR",
        "--only 'sft@seed=1'",
    ] {
        assert!(sft.contains(line), "{line} missing from:\n{sft}");
    }

    // Slurm is not installed here, so the chain is checked with a stand-in for `sbatch` that
    // records its arguments and runs the one-rank job at once, in a batch environment that
    // speaks of 4 tasks (which the one-process stage must not inherit); the two-node SFT jobs
    // are only checked above (they need srun).
    let calls = dir.path().join("calls");
    let fake = dir.path().join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    write(
        &fake.join("sbatch"),
        &format!(
            "#!/usr/bin/env bash\necho \"$*\" >> {calls}\nn=$(wc -l < {calls})\ncase \"${{@: -1}}\" in *lm.sbatch) SLURM_NTASKS=4 SLURM_PROCID=0 bash \"${{@: -1}}\" > {log} 2>&1 || exit 1;; esac\necho \"$((100 + n));cluster\"\n",
            calls = calls.display(),
            log = dir.path().join("job.log").display()
        ),
    );
    let status = std::process::Command::new("chmod")
        .args(["+x"])
        .arg(fake.join("sbatch"))
        .status()
        .unwrap();
    assert!(status.success());
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let out = std::process::Command::new("bash")
        .arg(slurm.join("submit.sh"))
        .env("PATH", path)
        .output()
        .unwrap();
    let job_log = std::fs::read_to_string(dir.path().join("job.log")).unwrap_or_default();
    assert_ok(
        &out,
        &format!("submit.sh (the first job printed: {job_log})"),
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 3, "{calls}");
    assert!(lines[0].starts_with("--parsable 1-lm.sbatch"), "{calls}");
    assert!(
        lines[1].contains("--dependency=afterok:101 2-sft"),
        "{calls}"
    );
    assert!(
        lines[2].contains("--dependency=afterok:102 3-sft"),
        "{calls}"
    );
    assert!(
        dir.path()
            .join("work/stages/lm/checkpoint/model.safetensors")
            .exists(),
        "the first job ran the stage: {job_log}"
    );
}
