//! The training stages as real subprocesses on tiny CPU fixtures: they learn, they resume
//! exactly after SIGKILL, they stop on a NaN with a readable state, and they reject bad configs.

mod common;

use std::path::Path;

use common::*;
use tch::{Device, Kind, Tensor};

/// Unigram entropy (nats/token) of the tokenized fixture corpus.
fn unigram_entropy(tokenizer: &Path) -> f64 {
    let tok = temper_data::TextTokenizer::load(tokenizer).unwrap();
    let text = std::fs::read_to_string(tiny("corpus.txt")).unwrap();
    let ids = tok.encode(&text).unwrap();
    let mut counts = std::collections::HashMap::new();
    for id in &ids {
        *counts.entry(id).or_insert(0usize) += 1;
    }
    let n = ids.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

#[test]
fn pretraining_loss_falls_well_below_the_unigram_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, out) = pretrained(dir.path(), 80, "");
    let h = unigram_entropy(&tok);
    let eval = summary(&out)["loss"].as_f64().unwrap();
    assert!(
        eval < 0.6 * h,
        "held-out loss {eval:.3} not well below unigram entropy {h:.3}"
    );
    for f in [
        "checkpoint/model.safetensors",
        "checkpoint/config.json",
        "checkpoint/tokenizer.json",
        "config.yaml",
        "state/progress.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
}

/// The mask effect, directly: gradients reach the logits only at positions whose *target* is
/// trained; prompt positions get exactly zero.
#[test]
fn masked_targets_get_exactly_zero_gradient() {
    let logits = Tensor::randn([2, 6, 11], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]).view([2, 6]);
    // Row 0: prompt = tokens 0..3, reply = 3..6. Row 1: reply = 4..6.
    let mask = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]).view([2, 6]);
    temper_core::causal_lm_loss(&logits, &ids, &mask).backward();
    let grad_norm = logits.grad().abs().sum_dim_intlist(2, false, Kind::Float); // (2, 6)
                                                                                // Position t predicts t+1: trained positions are those whose next token is trained.
    let expected = [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]];
    for (b, row) in expected.iter().enumerate() {
        for (t, &want) in row.iter().enumerate() {
            let g = grad_norm.double_value(&[b as i64, t as i64]);
            assert_eq!(g > 0.0, want == 1, "row {b} position {t}: gradient {g}");
        }
    }
}

#[test]
fn sft_learns_the_replies_and_reward_model_ranks_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = pretrained(dir.path(), 60, "");

    let sft_cfg = write(&dir.path().join("sft.yaml"), &format!(
        "init: {}\ndata: {}\neval_data: {}\nsteps: 60\nbatch_size: 8\noptim: {{lr: 2.0e-3, warmup_steps: 5}}\neval_every: 20\nsave_every: 20\nlog_every: 5\nsamples: 2\n",
        pre.join("checkpoint").display(), tiny("sft.jsonl").display(), tiny("sft_eval.jsonl").display()));
    let sft = dir.path().join("sft");
    assert_ok(&run_stage("temper-sft", &sft_cfg, &sft), "sft");
    let rows = metrics(&sft);
    let evals: Vec<f64> = rows
        .iter()
        .filter(|r| r["split"] == "eval")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(
        rows.iter().find(|r| r["split"] == "eval").unwrap()["step"],
        0,
        "a baseline evaluation before training"
    );
    assert!(
        *evals.last().unwrap() < 0.5 * evals[0],
        "SFT reply loss did not fall: {evals:?}"
    );
    let samples = std::fs::read_to_string(sft.join("samples.jsonl")).unwrap();
    assert_eq!(
        samples.lines().count(),
        2 * 4,
        "2 samples at each of 4 evaluations (steps 0, 20, 40, 60)"
    );

    let rm_cfg = write(&dir.path().join("rm.yaml"), &format!(
        "init: {}\ndata: {}\neval_data: {}\nsteps: 40\nbatch_size: 8\noptim: {{lr: 1.0e-3, warmup_steps: 5}}\neval_every: 20\nsave_every: 20\n",
        sft.join("checkpoint").display(), tiny("pairs.jsonl").display(), tiny("pairs_eval.jsonl").display()));
    let rm = dir.path().join("rm");
    assert_ok(&run_stage("temper-reward", &rm_cfg, &rm), "reward");
    let s = summary(&rm);
    assert!(
        s["accuracy"].as_f64().unwrap() >= 0.85,
        "held-out accuracy {}",
        s["accuracy"]
    );
    assert!(s["reward_chosen"].as_f64().unwrap() > s["reward_rejected"].as_f64().unwrap());
    // The reward checkpoint holds backbone and head, and loads as a scalar model.
    let spec = temper_core::LoadSpec {
        lm_head: false,
        score: temper_core::ScoreHead::Load,
    };
    temper_core::load_checkpoint(&rm.join("checkpoint"), spec, Device::Cpu).unwrap();

    // Reading the score as the mean over the reply learns the same pairs, and the pooling
    // travels in config.json so PPO and eval read the model the same way.
    let text = std::fs::read_to_string(&rm_cfg).unwrap() + "pooling: response_mean\n";
    let pooled_cfg = write(&dir.path().join("rm_pooled.yaml"), &text);
    let pooled = dir.path().join("rm_pooled");
    assert_ok(
        &run_stage("temper-reward", &pooled_cfg, &pooled),
        "pooled reward",
    );
    let s = summary(&pooled);
    assert!(
        s["accuracy"].as_f64().unwrap() >= 0.85,
        "pooled held-out accuracy {}",
        s["accuracy"]
    );
    let (_, model) =
        temper_core::load_checkpoint(&pooled.join("checkpoint"), spec, Device::Cpu).unwrap();
    assert_eq!(
        model.config.score_pooling,
        temper_core::ScorePooling::ResponseMean
    );
}

#[test]
fn a_killed_run_resumes_to_exactly_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    // Bigger batches make each step take long enough to kill the run midway reliably.
    let cfg = pretrain_config(dir.path(), &tok, 40, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("batch_size: 8", "batch_size: 48");
    std::fs::write(&cfg, text).unwrap();

    let whole = dir.path().join("whole");
    assert_ok(
        &run_stage("temper-pretrain", &cfg, &whole),
        "uninterrupted run",
    );

    let killed = dir.path().join("killed");
    let resumed_from = kill_after_saved_step("temper-pretrain", &cfg, &killed, 10);
    assert!(resumed_from < 40);

    assert_ok(&run_stage("temper-pretrain", &cfg, &killed), "resumed run");
    let a = std::fs::read(whole.join("checkpoint/model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("checkpoint/model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run's (resumed from step {resumed_from})"
    );
    assert_eq!(
        deterministic_metrics(&whole),
        deterministic_metrics(&killed)
    );
}

/// A stage stopped after its final evaluation and save but before its summary (a signal at the
/// last step, as `temper run` sends on Ctrl-C) leaves a state at the last step: the rerun writes
/// the checkpoint and the same summary, final evaluation included.
#[test]
fn a_stage_stopped_after_its_last_save_resumes_to_the_same_summary() {
    let dir = tempfile::tempdir().unwrap();
    sft_and_reward(dir.path());
    let varying = ["wall_time_s", "peak_rss_mb", "tokens_per_s"];
    // The stages as sft_and_reward ran them, SFT and reward with held-out data (pretraining
    // holds its own out), so that each has a final evaluation.
    for (stage, config, eval_data, eval_key) in [
        ("temper-pretrain", "pretrain.yaml", None, "ppl"),
        ("temper-sft", "sft.yaml", Some("sft.jsonl"), "loss"),
        ("temper-reward", "rm.yaml", Some("pairs.jsonl"), "accuracy"),
    ] {
        let mut text = std::fs::read_to_string(dir.path().join(config)).unwrap();
        if let Some(file) = eval_data {
            text += &format!("eval_data: {}\n", tiny(file).display());
        }
        let cfg = write(&dir.path().join(format!("eval-{config}")), &text);
        let whole = dir.path().join(format!("{stage}-whole"));
        assert_ok(&run_stage(stage, &cfg, &whole), stage);
        let stopped = dir.path().join(format!("{stage}-stopped"));
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&whole)
            .arg(&stopped)
            .status()
            .unwrap();
        assert!(copied.success());
        // What the stop leaves: the state of the last step, no checkpoint, no summary.
        std::fs::remove_file(stopped.join("summary.json")).unwrap();
        std::fs::remove_dir_all(stopped.join("checkpoint")).unwrap();
        let last = summary(&whole)["steps"].as_u64();
        assert_eq!(
            saved_step(&stopped),
            last,
            "{stage}: no state at the last step"
        );

        assert_ok(
            &run_stage(stage, &cfg, &stopped),
            &format!("{stage} resumed"),
        );
        let fixed = |d: &Path| {
            let mut v = summary(d);
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !varying.contains(&k.as_str()));
            v
        };
        assert!(
            fixed(&stopped).get(eval_key).is_some(),
            "{stage}: the resumed summary lost the final evaluation: {}",
            fixed(&stopped)
        );
        assert_eq!(fixed(&whole), fixed(&stopped), "{stage}: summaries differ");
        assert_eq!(
            deterministic_metrics(&whole),
            deterministic_metrics(&stopped)
        );
        let weights = |d: &Path| std::fs::read(d.join("checkpoint/model.safetensors")).unwrap();
        assert!(
            weights(&whole) == weights(&stopped),
            "{stage}: weights differ"
        );
    }
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_a_readable_state() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let cfg = pretrain_config(dir.path(), &tok, 60, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "lr: 3.0e-3, warmup_steps: 10",
        "lr: 1.0e+6, min_lr: 0.0, warmup_steps: 1, grad_clip: 0.0",
    );
    std::fs::write(&cfg, text).unwrap();
    let out = dir.path().join("pretrain");
    let res = run_stage("temper-pretrain", &cfg, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(3), "{stderr}");
    let line = stderr.lines().last().unwrap();
    assert!(
        line.starts_with("temper-pretrain: error: loss is")
            && line.contains("state/ holds the last good weights")
            && line.contains("optim.lr"),
        "{line}"
    );
    assert!(
        !out.join("checkpoint").exists(),
        "no final checkpoint after a failure"
    );
    let progress: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state/progress.json")).unwrap())
            .unwrap();
    let weights = Tensor::read_safetensors(out.join("state/model0.safetensors")).unwrap();
    assert!(!weights.is_empty());
    for (name, t) in weights {
        assert!(
            t.isfinite().all().int64_value(&[]) == 1,
            "{name} is not finite in the kept state (step {})",
            progress["step"]
        );
    }
}

#[test]
fn validate_rejects_a_bad_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let cfg = pretrain_config(dir.path(), &tok, 10, "lerning_rate: 0.1\n");
    let out = dir.path().join("pretrain");
    let res = validate_stage("temper-pretrain", &cfg, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(":12: field `lerning_rate`: unknown field `lerning_rate`"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!out.exists(), "--validate must not create outputs");

    // A key given twice is named where it is given the second time.
    let cfg = pretrain_config(dir.path(), &tok, 10, "steps: 20\n");
    let last = std::fs::read_to_string(&cfg).unwrap().lines().count();
    let res = validate_stage("temper-pretrain", &cfg, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            ":{last}: field `steps`: given twice in one mapping: keep one"
        )),
        "{stderr}"
    );

    let good = pretrain_config(dir.path(), &tok, 10, "");
    let res = validate_stage("temper-pretrain", &good, &out);
    assert_ok(&res, "--validate of a good config");
    assert!(!out.exists());
}

#[test]
fn an_adalora_stage_killed_mid_schedule_resumes_to_the_same_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, pre) = pretrained(dir.path(), 20, "");
    // Continued pretraining with AdaLoRA: pruning between updates 4 and 30, every 3rd; big
    // batches so that the run can be killed midway.
    let cfg = write(
        &dir.path().join("adalora.yaml"),
        &format!(
            "init: {}\ntokenizer: {}\ndata: [{}]\nblock_size: 64\nsteps: 40\nbatch_size: 48\n\
             optim: {{lr: 3.0e-3, warmup_steps: 5, weight_decay: 0.0}}\neval_every: 20\n\
             save_every: 5\nlog_every: 5\ncache_dir: {}\n\
             peft: {{method: adalora, init_r: 6, target_r: 2, tinit: 4, tfinal: 10, delta_t: 3}}\n",
            pre.join("checkpoint").display(),
            tok.display(),
            tiny("corpus.txt").display(),
            dir.path().join("cache").display()
        ),
    );
    let whole = dir.path().join("whole");
    assert_ok(
        &run_stage("temper-pretrain", &cfg, &whole),
        "uninterrupted run",
    );
    let killed = dir.path().join("killed");
    let resumed_from = kill_after_saved_step("temper-pretrain", &cfg, &killed, 10);
    assert!(
        resumed_from < 30,
        "killed after the schedule ({resumed_from})"
    );
    assert_ok(&run_stage("temper-pretrain", &cfg, &killed), "resumed run");
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        let read = |d: &Path| std::fs::read(d.join("checkpoint").join(file)).unwrap();
        let (a, b) = (read(&whole), read(&killed));
        // The config names its base by absolute path: the same file for both runs.
        assert!(
            a == b,
            "{file} differs after resuming from step {resumed_from}"
        );
    }
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(whole.join("checkpoint/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "ADALORA");
    let alive: usize = config["rank_pattern"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .filter(|b| b.as_bool().unwrap())
                .count()
        })
        .sum();
    // 2 blocks × 4 dense layers × target 2.
    assert_eq!(alive, 16, "{config}");
    assert_eq!(summary(&whole)["adalora/rank"].as_i64(), Some(16));
}

#[test]
fn activation_checkpointing_and_a_chunked_loss_train_as_the_plain_step() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    // In fp32: the chunked loss's smaller products round apart from the whole batch's in bf16.
    let plain_cfg = pretrain_config(dir.path(), &tok, 10, FP32);
    let text = std::fs::read_to_string(&plain_cfg).unwrap();
    let saving_cfg = write(
        &dir.path().join("saving.yaml"),
        &format!("{text}activation_checkpointing: true\nloss_chunk: 24\n"),
    );
    let (plain, saving) = (dir.path().join("plain"), dir.path().join("saving"));
    assert_ok(&run_stage("temper-pretrain", &plain_cfg, &plain), "plain");
    assert_ok(
        &run_stage("temper-pretrain", &saving_cfg, &saving),
        "saving",
    );
    let losses = |d: &Path| -> Vec<f64> {
        metrics(d)
            .iter()
            .filter_map(|r| r["loss"].as_f64())
            .collect()
    };
    let (a, b) = (losses(&plain), losses(&saving));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "loss {x} (plain) vs {y} (saving)");
    }

    // Prompt tuning's virtual tokens cannot be recomputed block by block: refused by name.
    let sft = write(
        &dir.path().join("sft.yaml"),
        &format!(
            "init: {}\ndata: {}\nsteps: 1\nbatch_size: 2\npeft: {{method: prompt, num_virtual_tokens: 4}}\nactivation_checkpointing: true\n",
            plain.join("checkpoint").display(),
            tiny("sft.jsonl").display()
        ),
    );
    let scratch = dir.path().join("sft_out");
    let out = validate_stage("temper-sft", &sft, &scratch);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("activation_checkpointing") && err.contains("virtual tokens"),
        "{err}"
    );
}

#[test]
fn without_a_precision_key_auto_decides_and_says_what_it_chose_for_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let cfg = pretrain_config(dir.path(), &tok, 2, "");
    let run = |name: &str, forced: Option<&str>| {
        let mut cmd = std::process::Command::new(bin("temper-pretrain"));
        cmd.args(["--config", cfg.to_str().unwrap(), "--out"])
            .arg(dir.path().join(name))
            .env("TEMPER_LOG", "info")
            .env_remove(temper_stage::AUTO_PRECISION_VAR);
        if let Some(f) = forced {
            cmd.env(temper_stage::AUTO_PRECISION_VAR, f);
        }
        let out = cmd.output().unwrap();
        assert_ok(&out, "precision: auto");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The test script's second pass forces the other precision; each says it was forced.
    for (forced, words) in [
        ("fp32", "precision auto: fp32 (TEMPER_AUTO_PRECISION=fp32)"),
        (
            "bf16",
            "precision auto: bf16 autocast (TEMPER_AUTO_PRECISION=bf16)",
        ),
    ] {
        let said = run(forced, Some(forced));
        assert!(said.contains(words), "expected `{words}` in:\n{said}");
    }
    let said = run("odd", Some("fp16"));
    assert!(
        said.contains("TEMPER_AUTO_PRECISION=`fp16` ignored"),
        "{said}"
    );
    let said = run("out", None);
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let native = flags
        .split_whitespace()
        .any(|f| f == "avx512_bf16" || f == "amx_bf16");
    let expected = if native {
        "precision auto: bf16 autocast"
    } else {
        "precision auto: fp32"
    };
    assert!(said.contains(expected), "expected `{expected}` in:\n{said}");
}
