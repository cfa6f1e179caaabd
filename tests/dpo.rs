//! The DPO stage on the tiny fixtures: every loss of the family learns the held-out pairs,
//! precomputed reference log-probs train exactly as computed ones, a killed run resumes to the
//! same weights, and bad input is refused with one line.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn dpo_config(dir: &Path, sft: &Path, name: &str, extra: &str) -> PathBuf {
    write(
        &dir.join(format!("{name}.yaml")),
        &format!(
            "policy: {}\ndata: {}\neval_data: {}\nsteps: 30\nbatch_size: 8\n\
             optim: {{lr: 1.0e-3, warmup_steps: 3}}\neval_every: 15\nsave_every: 5\nkl_samples: 4\nseed: 3\n{extra}",
            sft.display(),
            tiny("pairs.jsonl").display(),
            tiny("pairs_eval.jsonl").display()
        ),
    )
}

#[test]
fn every_loss_learns_the_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, _) = sft_and_reward(dir.path());
    for loss in ["sigmoid", "ipo", "hinge", "orpo", "simpo", "kto"] {
        let out = dir.path().join(loss);
        let cfg = dpo_config(dir.path(), &sft, loss, &format!("loss: {loss}\n"));
        assert_ok(&run_stage("temper-dpo", &cfg, &out), loss);
        let s = summary(&out);
        let margin = s["rewards/margins"].as_f64().unwrap();
        assert!(margin > 0.0, "{loss}: held-out reward margin {margin}: {s}");
        if loss != "kto" {
            let acc = s["rewards/accuracies"].as_f64().unwrap();
            assert!(acc >= 0.9, "{loss}: held-out accuracy {acc}");
        }
        assert!(s["kl_to_reference"].as_f64().unwrap() > 0.0, "{loss}: {s}");
        let rows = metrics(&out);
        assert_eq!(
            rows.iter().filter(|r| r["split"] == "eval").count(),
            3,
            "{loss}: steps 0, 15, 30"
        );
        let train = rows.iter().rfind(|r| r["split"] == "train").unwrap();
        for k in [
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "logps/chosen",
            "logps/rejected",
            "grad_norm",
        ] {
            assert!(train[k].is_number(), "{loss}: {k}");
        }
        assert!(out.join("checkpoint/model.safetensors").exists());
    }
}

#[test]
fn precomputed_reference_trains_exactly_as_computed_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, _) = sft_and_reward(dir.path());
    // The cache is computed in batches of other pairs (other padding, other GEMM shapes) than
    // the training batches, so the two runs agree to float rounding, not bit for bit: in fp32.
    let on_the_fly = dir.path().join("fly");
    assert_ok(
        &run_stage(
            "temper-dpo",
            &dpo_config(dir.path(), &sft, "fly", FP32),
            &on_the_fly,
        ),
        "fly",
    );
    let extra = format!("precompute_reference: true\n{FP32}");
    let cfg = dpo_config(dir.path(), &sft, "pre", &extra);
    let pre = dir.path().join("pre");
    assert_ok(&run_stage("temper-dpo", &cfg, &pre), "precomputed");
    assert!(pre.join("reference_logps.safetensors").exists());
    let (a, b) = (
        deterministic_metrics(&on_the_fly),
        deterministic_metrics(&pre),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x.as_object().unwrap() {
            let (v, w) = (v.as_f64().unwrap_or(0.0), y[k].as_f64().unwrap_or(0.0));
            assert!(
                (v - w).abs() <= 1e-4 * (1.0 + v.abs()),
                "{k} at step {}: {v} vs {w}",
                x["step"]
            );
        }
    }
    let max_weight_diff = {
        let load = |d: &Path| -> std::collections::BTreeMap<String, tch::Tensor> {
            tch::Tensor::read_safetensors(d.join("checkpoint/model.safetensors"))
                .unwrap()
                .into_iter()
                .collect()
        };
        load(&on_the_fly)
            .iter()
            .zip(load(&pre))
            .map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    };
    assert!(
        max_weight_diff < 1e-3,
        "weights differ by {max_weight_diff}"
    );
    let weights = |d: &Path| std::fs::read(d.join("checkpoint/model.safetensors")).unwrap();

    let killed = dir.path().join("killed");
    let slow = dpo_config(dir.path(), &sft, "slow", "precompute_reference: true\n");
    let text = std::fs::read_to_string(&slow)
        .unwrap()
        .replace("steps: 30", "steps: 60");
    std::fs::write(&slow, text).unwrap();
    let whole = dir.path().join("whole");
    assert_ok(&run_stage("temper-dpo", &slow, &whole), "uninterrupted");
    let saved = kill_after_saved_step("temper-dpo", &slow, &killed, 10);
    assert_ok(&run_stage("temper-dpo", &slow, &killed), "resumed");
    assert!(
        weights(&whole) == weights(&killed),
        "resumed from step {saved}: weights differ"
    );
    assert_eq!(
        deterministic_metrics(&whole),
        deterministic_metrics(&killed)
    );
}

#[test]
fn bad_preference_input_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, _) = sft_and_reward(dir.path());
    let unlabelled = write(
        &dir.path().join("u.jsonl"),
        "{\"prompt\": \"Hi\", \"completion\": \"Hello there.\"}\n",
    );
    let same = write(
        &dir.path().join("same.jsonl"),
        "{\"prompt\": \"Hi\", \"chosen\": \"Hello.\", \"rejected\": \"Hello.\"}\n",
    );
    let cases: Vec<(String, &str)> = vec![
        ("beta: 0\n".into(), "field `beta`: must be positive"),
        (
            "loss: ipo\nlabel_smoothing: 0.1\n".into(),
            "applies to `loss: sigmoid` only",
        ),
        (
            "loss: kto\nprecompute_reference: true\n".into(),
            "not available with kto",
        ),
        (
            format!("loss: kto\ndata: {}\n", unlabelled.display()),
            "line 1: field `label`: missing",
        ),
        (
            format!("data: {}\n", same.display()),
            "line 1: field `chosen`: identical to `rejected`",
        ),
    ];
    for (extra, expect) in cases {
        let base = std::fs::read_to_string(dpo_config(dir.path(), &sft, "bad", "")).unwrap();
        // Later keys replace earlier ones in the test config: drop the ones being set.
        let keys: Vec<&str> = extra.lines().filter_map(|l| l.split(':').next()).collect();
        let kept: String = base
            .lines()
            .filter(|l| !keys.iter().any(|k| l.starts_with(&format!("{k}:"))))
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = write(&dir.path().join("bad.yaml"), &format!("{kept}{extra}"));
        let out = dir.path().join("bad-out");
        let res = run_stage("temper-dpo", &cfg, &out);
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{extra}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra}: one line: {err}");
        assert!(
            err.contains(expect),
            "{extra}: expected `{expect}` in {err}"
        );
        assert!(!out.exists(), "{extra}: nothing written");
    }
}
