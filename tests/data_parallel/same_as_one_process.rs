//! Two ranks of half the batch train as one process with all of it, stage by stage.

use std::path::Path;

use crate::common::*;
use crate::{
    assert_overlapped, assert_same_metrics, assert_same_run, assert_weights_agree, free_port,
    start_ranks,
};

// Data parallelism's arithmetic matches one process only in fp32 (`FP32`); bf16 data-parallel
// runs are exercised by the launching and failure tests.

#[test]
fn two_gloo_ranks_of_half_the_batch_train_as_one_process_with_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let whole = pretrain_config(dir.path(), &tok, 20, FP32);
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
        let out = c.wait_with_output().unwrap();
        assert_ok(&out, "a rank of two");
        assert_overlapped(&out, "a rank of two");
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
    // torchrun sets OMP_NUM_THREADS=1, which changes the order of float sums in the kernels.
    assert_weights_agree(
        &two,
        &three,
        "checkpoint/model.safetensors",
        "torchrun's run and the hand-launched one",
    );
}

/// A named backend with an address runs one process through the collectives (all-reduce,
/// broadcast, barrier) in a group of one: how `scripts/gpu_check.sh` tries NCCL on one GPU.
/// Here, with Gloo, it trains as the process without a group.
#[test]
fn a_group_of_one_trains_as_the_process_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let cfg = pretrain_config(dir.path(), &tok, 20, "");
    let plain = dir.path().join("plain");
    assert_ok(&run_stage("temper-pretrain", &cfg, &plain), "no group");
    let grouped = dir.path().join("grouped");
    let out = std::process::Command::new(bin("temper-pretrain"))
        .args(["--config", cfg.to_str().unwrap(), "--out"])
        .arg(&grouped)
        .env("TEMPER_DIST_BACKEND", "gloo")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .env("TEMPER_DIST_TIMEOUT", "60")
        .output()
        .unwrap();
    assert_ok(&out, "a Gloo group of one");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("gloo rendezvous at 127.0.0.1"), "{log}");
    assert_same_run(&plain, &grouped);
}

#[test]
fn sft_reward_and_dpo_on_two_ranks_match_one_process_even_when_a_rank_gets_no_rows() {
    let dir = tempfile::tempdir().unwrap();
    // The model they start from in fp32 too: the comparison's margin depends on where it starts.
    let (_, pre) = pretrained(dir.path(), 20, FP32);
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
            "init: {}\ndata: {}\neval_data: {}\nsteps: 20\nbatch_size: {batch}\noptim: {{lr: 2.0e-3, warmup_steps: 5}}\neval_every: 10\nsave_every: 10\nlog_every: 1\nsamples: 2\n{FP32}",
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
        let out = c.wait_with_output().unwrap();
        assert_ok(&out, "an SFT rank of two");
        assert_overlapped(&out, "an SFT rank of two");
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
            "init: {}\ndata: {}\neval_data: {}\nsteps: 20\nbatch_size: {batch}\noptim: {{lr: 1.0e-3, warmup_steps: 5}}\neval_every: 10\nsave_every: 10\nlog_every: 1\n{FP32}",
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
        let out = c.wait_with_output().unwrap();
        assert_ok(&out, "a reward rank of two");
        assert_overlapped(&out, "a reward rank of two");
    }
    assert_same_run(&rm_one, &rm_two);
    let (a, b) = (summary(&rm_one), summary(&rm_two));
    assert_eq!(a["accuracy"], b["accuracy"], "held-out accuracy");

    // DPO from the SFT model on the same 239 pairs, the reference's log-probs precomputed by
    // rank 0 and read by rank 1.
    let config = |batch: usize, name: &str| {
        write(&dir.path().join(name), &format!(
            "policy: {}\ndata: {}\neval_data: {}\nsteps: 16\nbatch_size: {batch}\nbeta: 0.1\nprecompute_reference: true\noptim: {{lr: 1.0e-3, warmup_steps: 2}}\neval_every: 8\nsave_every: 8\nlog_every: 1\nmax_new_tokens: 4\n{FP32}",
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
        let out = c.wait_with_output().unwrap();
        assert_ok(&out, "a DPO rank of two");
        assert_overlapped(&out, "a DPO rank of two");
    }
    assert_same_run(&dpo_one, &dpo_two);
    let accuracy = |d: &Path| summary(d)["rewards/accuracies"].as_f64().unwrap();
    assert_eq!(
        accuracy(&dpo_one),
        accuracy(&dpo_two),
        "held-out reward accuracy"
    );
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
                 save_every: 3\nsample_every: 3\nseed: 7\n{FP32}{extra}",
                sft.display(),
                tiny("prompts.jsonl").display()
            ),
        )
    };
    // REINFORCE++ whitens every token's return over both ranks' sums (f64) where one process
    // reduces one f32 tensor: the advantages differ by ~1e-7, so its logged numbers are
    // compared more loosely.
    for (name, extra, tolerance) in [
        ("grpo", "scale: batch\nloss_aggregation: bnpo\nbeta: 0.05\n", 1e-5),
        (
            "reinforce_pp",
            "algorithm: reinforce_pp\nbeta: 0.05\nloss_aggregation: dapo\nupdates_per_iteration: 2\n",
            1e-4,
        ),
    ] {
        let one = dir.path().join(format!("{name}_one"));
        let cfg = config(4, &format!("{name}_whole.yaml"), extra);
        assert_ok(&run_stage("temper-grpo", &cfg, &one), name);
        let two = dir.path().join(format!("{name}_two"));
        let cfg = config(2, &format!("{name}_half.yaml"), extra);
        for c in start_ranks("temper-grpo", &cfg, &two, free_port(), 120) {
            let out = c.wait_with_output().unwrap();
            assert_ok(&out, "a GRPO rank of two");
            assert_overlapped(&out, "a GRPO rank of two");
        }
        assert_same_metrics(&one, &two, 6, GRPO_KEYS, tolerance, name);
        assert_weights_agree(&one, &two, "checkpoint/model.safetensors", name);
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
             save_every: 5\nsample_every: 5\nseed: 7\n{FP32}{extra}",
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
            let out = c.wait_with_output().unwrap();
            assert_ok(&out, "a PPO rank of two");
            assert_overlapped(&out, "a PPO rank of two");
        }
        assert_same_metrics(&one, &two, 5, PPO_KEYS, 1e-5, name);
        assert_weights_agree(&one, &two, "checkpoint/model.safetensors", name);
        assert_weights_agree(&one, &two, "critic/model.safetensors", name);
        let state = |d: &Path| summary(d)["reward/mean"].as_f64().unwrap();
        assert!((state(&one) - state(&two)).abs() < 1e-5);
    }
}
