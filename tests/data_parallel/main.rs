//! Data-parallel training over c10d's Gloo on this CPU, as real subprocesses: ranks of half
//! the batch train as one process with all of it (pretraining, SFT, reward model, DPO, GRPO and
//! PPO, launched by hand and by torchrun: `same_as_one_process`), a bad environment is one
//! line, a killed rank stops the others and a rerun resumes, and stages without data
//! parallelism refuse a world above one (`failures`), and `temper run` launches the ranks
//! itself or exports them to Slurm (`launching`). The helpers below compare two runs.

#[path = "../common.rs"]
mod common;
mod failures;
mod launching;
mod same_as_one_process;

use std::path::Path;

use common::*;
use tch::Tensor;

pub(crate) fn free_port() -> u16 {
    temper_core::dist::port_for_tests()
}

pub(crate) fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter(|r| r["split"] == "train")
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

/// Every logged loss (train and eval) within 1e-5 step by step, and the final weights too.
pub(crate) fn assert_same_run(one: &Path, two: &Path) {
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
    assert_weights_agree(one, two, "checkpoint/model.safetensors", "final weights");
}

/// How two runs' weights in a file differ: the largest difference (and where) and the
/// root-mean-square difference over every weight.
pub(crate) struct WeightDiff {
    pub max: f64,
    pub at: String,
    pub rms: f64,
}

/// Two runs that differ only in the order their float sums are taken (a batch whole or split
/// over ranks, another thread count) agree to rounding overall, but not every weight does:
/// Adam divides each step by the root of the gradient's running square, so where a gradient is
/// about zero its rounding becomes a step of up to lr (seen at PyTorch's portable kernels: 3
/// of 123k SFT weights off by ~1e-5, RMS 5e-8). So the bound is on the RMS: a relative
/// gradient rounding of ~1e-6 moves each step by ~lr·1e-6, which over these runs (≤ 20 updates
/// of lr ≤ 2e-3) is ~4e-8; 1e-6 leaves a 25× margin, while a real disagreement — a rank's rows
/// lost, a bucket not reduced — moves weights by about lr per update, ≥ 1e-4 RMS.
pub(crate) fn assert_weights_agree(a: &Path, b: &Path, file: &str, what: &str) {
    let d = weight_diff(a, b, file);
    eprintln!(
        "{what}: RMS difference {:.2e}, largest {:.2e} in {}",
        d.rms, d.max, d.at
    );
    assert!(
        d.rms < 1e-6,
        "{what} differ beyond rounding: RMS {:.2e} (largest {:.2e} in {})",
        d.rms,
        d.max,
        d.at
    );
}

pub(crate) fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    weight_diff(a, b, "checkpoint/model.safetensors").max
}

/// How two runs' weights in `file` differ, GPT-2's key bias aside.
pub(crate) fn weight_diff(a: &Path, b: &Path, file: &str) -> WeightDiff {
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
    let (mut max, mut at, mut squares, mut count) = (0.0, String::new(), 0.0, 0);
    for (k, t) in &a {
        let diff = (comparable(k, t) - comparable(k, &b[k]))
            .abs()
            .to_kind(tch::Kind::Double);
        let m = diff.max().double_value(&[]);
        if m > max {
            (max, at) = (m, k.clone());
        }
        squares += diff.square().sum(tch::Kind::Double).double_value(&[]);
        count += diff.numel();
    }
    WeightDiff {
        max,
        at,
        rms: (squares / count.max(1) as f64).sqrt(),
    }
}

/// Starts the two ranks of a data-parallel run of `stage` on `port`, as torchrun would (its
/// environment variables); a rank waits at most `timeout_s` for the other.
pub(crate) fn start_ranks(
    stage: &str,
    cfg: &Path,
    out: &Path,
    port: u16,
    timeout_s: u32,
) -> Vec<std::process::Child> {
    start_ranks_in(stage, cfg, [out, out], port, timeout_s)
}

/// `start_ranks` with each rank given its own `--out` (as on nodes that do not share one
/// filesystem).
pub(crate) fn start_ranks_in(
    stage: &str,
    cfg: &Path,
    outs: [&Path; 2],
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
                    outs[rank].to_str().unwrap(),
                ])
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("TEMPER_DIST_TIMEOUT", timeout_s.to_string())
                // 10 KiB gradient buckets: several even for the tiny models, so the reduction
                // during backward (buckets launched in order as they fill) is exercised.
                .env("TEMPER_DIST_BUCKET_MB", "0.01")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// That a rank reduced some of its gradient buckets while backward ran: the stage's closing
/// line "gradient averaging: N bucket(s) per step; E of T bucket reductions started while
/// backward ran" with N > 1 and E > 0.
pub(crate) fn assert_overlapped(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("bucket reductions started while backward ran"))
        .unwrap_or_else(|| panic!("{what}: no gradient-averaging line in its log:\n{err}"));
    let number_after = |key: &str| -> u64 {
        line.split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{what}: cannot read {key:?} in {line}"))
    };
    let (buckets, early) = (number_after("averaging: "), number_after("per step; "));
    assert!(buckets > 1 && early > 0, "{what}: {line}");
}

/// Every iteration's `keys` equal within `tolerance` (relative above 1) in the one-process run
/// and the two-rank run, which both logged `rows` iterations.
pub(crate) fn assert_same_metrics(
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
