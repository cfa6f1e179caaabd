//! Helpers shared by the workspace-level tests: paths, the built stage binaries, a tokenizer
//! trained on the tiny fixture corpus, and reading metrics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn tiny(name: &str) -> PathBuf {
    repo().join("tests/fixtures/tiny").join(name)
}

/// A workspace binary, built by `cargo build --workspace` (scripts/test.sh does this first).
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env("TEMPER_LOG", "warn")
        .output()
        .expect("stage binary runs")
}

pub fn run_stage(name: &str, config: &Path, out: &Path) -> Output {
    run(
        name,
        &[
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    )
}

/// `<stage> --validate --config <config> --out <out>`: the checks, nothing written.
pub fn validate_stage(name: &str, config: &Path, out: &Path) -> Output {
    run(
        name,
        &[
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--validate",
        ],
    )
}

/// A reward model's score at each row's last real token, for the golden's inputs.
pub fn golden_scores(
    model: &temper_core::Transformer,
    g: &std::collections::BTreeMap<String, tch::Tensor>,
) -> tch::Tensor {
    let mask = &g["attention_mask"];
    let hidden = model
        .hidden_states(&g["input_ids"], Some(mask), None)
        .unwrap();
    model.last_token_scores(&hidden, mask).unwrap()
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stage refused `config` as the brief asks of bad input: exit 2, one line containing
/// `words`, and nothing written to `out`.
pub fn assert_refused(stage: &str, config: &Path, out: &Path, words: &str) {
    let res = run_stage(stage, config, out);
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(words), "{err}");
    assert!(!out.exists(), "nothing written");
}

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Trains the tiny fixture tokenizer into `dir/tok/tokenizer.json`.
pub fn tokenizer(dir: &Path) -> PathBuf {
    let cfg = write(
        &dir.join("tok.yaml"),
        &format!(
            "corpus: [{}]\nvocab_size: 300\ntext_split: blank_line\n",
            tiny("corpus.txt").display()
        ),
    );
    let out = dir.join("tok");
    assert_ok(
        &run_stage("temper-tokenizer", &cfg, &out),
        "temper-tokenizer",
    );
    out.join("tokenizer.json")
}

/// A tiny GPT-2 pretraining config on the fixture corpus.
pub fn pretrain_config(dir: &Path, tokenizer: &Path, steps: u64, extra: &str) -> PathBuf {
    write(
        &dir.join("pretrain.yaml"),
        &format!(
            "tokenizer: {}\ndata: [{}]\nmodel: {{arch: gpt2, n_layer: 2, n_head: 2, d_model: 64, max_position: 64}}\n\
             block_size: 64\nsteps: {steps}\nbatch_size: 8\noptim: {{lr: 3.0e-3, warmup_steps: 10}}\n\
             eval_every: 20\nsave_every: 10\nlog_every: 5\ncache_dir: {}\n{extra}",
            tokenizer.display(),
            tiny("corpus.txt").display(),
            dir.join("cache").display()
        ),
    )
}

/// A config line for tests that compare two differently shaped computations (a whole batch
/// and two half batches, a chunked loss and a whole one): they agree to ~1e-6 only in fp32;
/// under bf16 autocast, the default on a CPU with AVX512-BF16, the shapes round apart (3e-5 to
/// 6e-4 in the logged losses).
pub const FP32: &str = "precision: fp32\n";

/// The fixture tokenizer and a model pretrained `steps` steps on it in `dir/pretrain`, with
/// `extra` config lines.
pub fn pretrained(dir: &Path, steps: u64, extra: &str) -> (PathBuf, PathBuf) {
    let tok = tokenizer(dir);
    let pre = dir.join("pretrain");
    assert_ok(
        &run_stage(
            "temper-pretrain",
            &pretrain_config(dir, &tok, steps, extra),
            &pre,
        ),
        "pretrain",
    );
    (tok, pre)
}

/// metrics.jsonl rows as JSON values.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// metrics.jsonl rows without the wall-clock fields, which differ between any two runs.
pub fn deterministic_metrics(out: &Path) -> Vec<serde_json::Value> {
    metrics(out)
        .into_iter()
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            o.retain(|k, _| {
                !matches!(k.as_str(), "time_s" | "tokens_per_s" | "train_tokens_per_s")
                    && !k.starts_with("time/")
            });
            r
        })
        .collect()
}

/// The step a stage's `state/` records, if it has saved one.
pub fn saved_step(out: &Path) -> Option<u64> {
    std::fs::read_to_string(out.join("state/progress.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["step"].as_u64())
}

/// Starts a stage, SIGKILLs it as soon as its state/ records at least `min_step`, and returns
/// the step it had saved. Fails if the stage finished first.
pub fn kill_after_saved_step(stage: &str, config: &Path, out: &Path, min_step: u64) -> u64 {
    use std::time::{Duration, Instant};
    let mut child = Command::new(bin(stage))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let saved = || saved_step(out);
    let start = Instant::now();
    while saved().is_none_or(|s| s < min_step) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{stage} wrote no state"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("summary.json").exists(),
        "{stage} finished before it could be killed"
    );
    saved().unwrap()
}

/// Tokenizer → pretrain → SFT → reward on the tiny fixtures; returns (sft, reward) checkpoints.
pub fn sft_and_reward(dir: &Path) -> (PathBuf, PathBuf) {
    let tok = tokenizer(dir);
    let pre = dir.join("pretrain");
    assert_ok(
        &run_stage("temper-pretrain", &pretrain_config(dir, &tok, 60, ""), &pre),
        "pretrain",
    );
    let sft_cfg = write(&dir.join("sft.yaml"), &format!(
        "init: {}\ndata: {}\nsteps: 60\nbatch_size: 8\noptim: {{lr: 2.0e-3, warmup_steps: 5}}\nsave_every: 60\n",
        pre.join("checkpoint").display(), tiny("sft.jsonl").display()));
    let sft = dir.join("sft");
    assert_ok(&run_stage("temper-sft", &sft_cfg, &sft), "sft");
    let rm_cfg = write(&dir.join("rm.yaml"), &format!(
        "init: {}\ndata: {}\nsteps: 40\nbatch_size: 8\noptim: {{lr: 1.0e-3, warmup_steps: 5}}\nsave_every: 40\n",
        sft.join("checkpoint").display(), tiny("pairs.jsonl").display()));
    let rm = dir.join("rm");
    assert_ok(&run_stage("temper-reward", &rm_cfg, &rm), "reward");
    (sft.join("checkpoint"), rm.join("checkpoint"))
}

/// configs/tiny.yaml edited by `edit`, written into `dir` with its work folder there.
pub fn tiny_variant(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("configs/tiny.yaml"))
        .unwrap()
        .replace(
            "../tests/fixtures",
            &repo().join("tests/fixtures").to_string_lossy(),
        )
        .replace("workdir: ../runs/tiny", "workdir: work");
    let file = dir.join("tiny.yaml");
    std::fs::write(&file, edit(text)).unwrap();
    file
}

/// tests/fixtures/peft/<case>/golden.safetensors, by name.
pub fn peft_golden(case: &str) -> std::collections::BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(
        repo()
            .join("tests/fixtures/peft")
            .join(case)
            .join("golden.safetensors"),
    )
    .unwrap()
    .into_iter()
    .collect()
}

/// The largest difference over the last axis at the positions `mask` marks real.
pub fn max_diff_on(a: &tch::Tensor, b: &tch::Tensor, mask: &tch::Tensor) -> f64 {
    let diff = (a - b).abs().amax([-1], false);
    diff.masked_select(&mask.to_kind(tch::Kind::Bool))
        .max()
        .double_value(&[])
}

/// configs/tiny.yaml with its reward model (and so PPO and eval) swept over seeds 1 and 2.
pub fn tiny_reward_sweep(dir: &Path) -> PathBuf {
    tiny_variant(dir, |t| {
        t.replace(
            "  reward:\n    uses: reward\n",
            "  reward:\n    uses: reward\n    matrix: {seed: [1, 2]}\n",
        )
    })
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(cmd);
            }
        }
    }
    found
}

pub fn wait_until_gone(needle: &str) {
    let start = std::time::Instant::now();
    while !processes_mentioning(needle).is_empty() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "stage processes outlived temper: {:?}",
            processes_mentioning(needle)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs `scripts/<script>` with the project venv's Python (a reference package's check);
/// panics with its output unless it succeeds, and returns that output.
pub fn python_check(script: &str, args: &[&Path]) -> String {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup.sh",
        python.display()
    );
    let out = Command::new(&python)
        .arg(repo().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// Waits until `path` exists (a stage's first saved state, say), at most two minutes.
pub fn wait_for(path: &Path, what: &str) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "{what}: {} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
