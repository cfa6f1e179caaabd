//! What goes wrong across ranks: a bad environment, a rank that dies, a stage that cannot
//! train data-parallel. Each is one line and loses nothing.

use crate::common::*;
use crate::{free_port, max_weight_diff, start_ranks, start_ranks_in};

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
        (
            vec![
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("TEMPER_DIST_BACKEND", "nccl"),
            ],
            // The config trains on the CPU (no `device`), so even a GPU machine refuses.
            "TEMPER_DIST_BACKEND=nccl needs a GPU",
        ),
        (
            vec![("TEMPER_DIST_BACKEND", "mpi")],
            "use gloo, nccl or auto",
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

    // KTO's reference point is a batch estimate: refused on several ranks, at its key.
    let kto = write(
        &dir.path().join("kto.yaml"),
        "policy: no-such-model\ndata: no-such.jsonl\nloss: kto\nsteps: 1\nbatch_size: 2\n",
    );
    let out = dir.path().join("kto-out");
    let res = std::process::Command::new(bin("temper-dpo"))
        .args([
            "--config",
            kto.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .envs([
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert!(
        err.contains("field `loss`: `kto` trains on one process only"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");

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

    // A rank that does not see the stage folder (a node without the shared filesystem) would
    // start afresh while rank 0 resumes: both stop, naming it, and the saved state stays.
    let elsewhere = dir.path().join("elsewhere");
    for c in start_ranks_in("temper-pretrain", &cfg, [&out, &elsewhere], free_port(), 20) {
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a rank trained on: {err}");
        assert!(
            err.contains(&format!(
                "rank(s) 1 resumed a different state than rank 0 (rank 0: step {resumed_from}"
            )),
            "{err}"
        );
    }
    assert_eq!(saved(), Some(resumed_from));

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
