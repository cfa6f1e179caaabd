//! Issue 11's promises, each tried the way a user breaks them: a typo after a finished run, a
//! workdir on top of the project, signals and kill -9, a never-run pipeline with a typo at its
//! end, zero cadences, a mismatched tokenizer, a moved project, a dry run, a closed pipe, and
//! values that merely look like paths. Every test uses its own copy of the tiny project.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A copy of the tiny project (pipeline file and fixtures) under `dir`; returns the pipeline
/// file. Its workdir is `<dir>/runs/tiny`.
fn project(dir: &Path) -> PathBuf {
    let fixtures = dir.join("tests/fixtures/tiny");
    std::fs::create_dir_all(&fixtures).unwrap();
    for entry in std::fs::read_dir(tiny("")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, fixtures.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    let file = dir.join("configs/tiny.yaml");
    std::fs::copy(repo().join("configs/tiny.yaml"), &file).unwrap();
    file
}

fn temper(file: &Path, args: &[&str]) -> Output {
    Command::new(bin("temper"))
        .args(args)
        .arg(file)
        .output()
        .expect("temper runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Arguments that make pretraining slow enough to interrupt while it saves often.
const SLOW: [&str; 6] = [
    "-o",
    "pretrain.steps=400",
    "-o",
    "pretrain.batch_size=32",
    "-o",
    "pretrain.save_every=10",
];

/// Starts `temper run` with SLOW pretraining and waits until pretraining has saved a state.
fn start_slow_run(file: &Path) -> std::process::Child {
    let child = Command::new(bin("temper"))
        .arg("run")
        .arg(file)
        .args(SLOW)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let progress = file
        .parent()
        .unwrap()
        .join("../runs/tiny/stages/.pretrain.next/state/progress.json");
    let start = Instant::now();
    while !progress.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "pretrain never saved a state"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn a_typo_after_a_finished_run_keeps_the_checkpoint_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let file = project(dir.path());
    let first = temper(&file, &["run", "--stage", "sft", "--with-parents"]);
    assert_ok(&first, "first run");
    let ckpt = dir
        .path()
        .join("runs/tiny/stages/sft/checkpoint/model.safetensors");
    let before = std::fs::read(&ckpt).unwrap();

    for (override_, expect) in [
        ("sft.bogus=1", "unknown field `bogus`"),
        ("sft.eval_every=0", "with.eval_every: must be at least 1"),
        (
            "sft.optim.lr=-1",
            "with.optim.lr: must be a positive number",
        ),
    ] {
        let out = temper(&file, &["run", "-o", override_]);
        assert_eq!(out.status.code(), Some(2), "{override_}: {}", text(&out));
        assert!(text(&out).contains(expect), "{override_}: {}", text(&out));
        assert_eq!(
            std::fs::read(&ckpt).unwrap(),
            before,
            "{override_} touched the checkpoint"
        );
    }
    // An input briefly missing.
    let eval_data = dir.path().join("tests/fixtures/tiny/sft_eval.jsonl");
    let aside = dir.path().join("sft_eval.aside");
    std::fs::rename(&eval_data, &aside).unwrap();
    let out = temper(&file, &["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("sft_eval.jsonl not found"),
        "{}",
        text(&out)
    );
    std::fs::rename(&aside, &eval_data).unwrap();
    assert_eq!(std::fs::read(&ckpt).unwrap(), before);

    // A valid change whose run fails while training (the NaN guard): the old outputs stay,
    // status says so, and the failed attempt keeps its log.
    let nan = [
        "-o",
        "sft.optim={lr: 1.0e+6, min_lr: 0.0, warmup_steps: 1, grad_clip: 0.0}",
    ];
    let out = temper(&file, &[&["run", "--stage", "sft"][..], &nan].concat());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("previous outputs"), "{}", text(&out));
    assert_eq!(std::fs::read(&ckpt).unwrap(), before);
    // Under that config the failed run is the one to resume; the previous outputs' numbers
    // stay readable.
    let status = temper(&file, &[&["status"][..], &nan].concat());
    assert!(
        text(&status).contains("failed (exit 3); resumes") && text(&status).contains("loss 0.8"),
        "{}",
        text(&status)
    );
    let log = std::fs::read_to_string(dir.path().join("runs/tiny/logs/sft.log")).unwrap();
    assert!(
        log.contains("loss is"),
        "the failed attempt's log is kept:\n{log}"
    );
    let status = temper(&file, &["status"]);
    assert!(
        text(&status).contains("sft        sft        up to date"),
        "{}",
        text(&status)
    );
}

#[test]
fn a_workdir_on_top_of_the_project_is_refused_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let file = project(dir.path());
    let users = dir.path().join("configs/stages/sft");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("notes.txt"), "mine").unwrap();
    for workdir in [".", "", ".."] {
        let yaml = std::fs::read_to_string(repo().join("configs/tiny.yaml"))
            .unwrap()
            .replace("workdir: ../runs/tiny", &format!("workdir: \"{workdir}\""));
        std::fs::write(&file, yaml).unwrap();
        let out = temper(&file, &["run"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "workdir `{workdir}`: {}",
            text(&out)
        );
        assert!(
            text(&out).contains("is the pipeline file's folder or contains it"),
            "{}",
            text(&out)
        );
    }
    assert_eq!(
        std::fs::read_to_string(users.join("notes.txt")).unwrap(),
        "mine"
    );

    // A workdir of someone else's files, and a stage folder temper did not make.
    std::fs::copy(repo().join("configs/tiny.yaml"), &file).unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("data.csv"), "1,2").unwrap();
    let out = temper(&file, &["run", "--workdir", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("holds files temper did not write"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(other.join("data.csv")).unwrap(),
        "1,2"
    );
    let foreign = dir.path().join("runs/tiny/stages/tokenizer");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "k").unwrap();
    let out = temper(&file, &["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("temper did not make it"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("keep.txt")).unwrap(),
        "k"
    );

    // A stage binary run by hand on a folder of other files refuses too.
    let cfg = write(
        &dir.path().join("tok.yaml"),
        &format!(
            "corpus: [{}]\nvocab_size: 300\n",
            tiny("corpus.txt").display()
        ),
    );
    let out = run_stage("temper-tokenizer", &cfg, &foreign);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!foreign.join("tokenizer.json").exists());
}

#[test]
fn sigterm_and_kill_9_of_temper_run_leave_no_stage_alive_and_a_rerun_resumes() {
    for signal in ["-TERM", "-KILL"] {
        let dir = tempfile::tempdir().unwrap();
        let file = project(dir.path());
        let mut child = start_slow_run(&file);
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        if signal == "-TERM" {
            assert_eq!(status.code(), Some(130), "temper exits 130 on SIGTERM");
        }
        wait_until_gone(&dir.path().to_string_lossy());
        let st = temper(&file, &[&["status"][..], &SLOW].concat());
        assert!(
            text(&st).contains("interrupted; resumes"),
            "{signal}: {}",
            text(&st)
        );
        let resumed = temper(
            &file,
            &[&["run", "--stage", "pretrain", "--with-parents"][..], &SLOW].concat(),
        );
        assert_ok(&resumed, "resumed run");
        assert!(
            text(&resumed).contains("last run was interrupted; resuming from its state"),
            "{signal}: {}",
            text(&resumed)
        );
        let log = std::fs::read_to_string(dir.path().join("runs/tiny/logs/pretrain.log")).unwrap();
        assert!(
            log.contains("resuming from step"),
            "{signal}: the stage started over:\n{log}"
        );
        assert!(dir
            .path()
            .join("runs/tiny/stages/pretrain/checkpoint/model.safetensors")
            .exists());
        assert!(!dir.path().join("runs/tiny/stages/.pretrain.next").exists());
    }
}

#[test]
fn validate_finds_a_typo_in_the_last_stage_of_a_never_run_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let file = project(dir.path());
    let yaml = std::fs::read_to_string(&file).unwrap();
    let at = yaml
        .rfind("      max_new_tokens: 16\n")
        .expect("the eval stage's last key");
    let yaml = format!(
        "{}      max_new_tokns: 16\n{}",
        &yaml[..at],
        &yaml[at + 25..]
    );
    std::fs::write(&file, &yaml).unwrap();
    // The eval stage's typo is its last key: find its line in the file.
    let line = yaml
        .lines()
        .position(|l| l.contains("max_new_tokns"))
        .unwrap()
        + 1;
    let started = Instant::now();
    let out = temper(&file, &["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let expect = format!(
        "tiny.yaml:{line}: stage `eval`: with.max_new_tokns: unknown field `max_new_tokns`"
    );
    assert!(
        text(&out).contains(&expect),
        "expected `{expect}` in:\n{}",
        text(&out)
    );
    // `temper run` finds it before running anything.
    let out = temper(&file, &["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains(&expect), "{}", text(&out));
    assert!(
        !dir.path().join("runs").exists(),
        "nothing ran or was written"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn zero_cadences_and_a_mismatched_tokenizer_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let pre = dir.path().join("pretrain");
    assert_ok(
        &run_stage(
            "temper-pretrain",
            &pretrain_config(dir.path(), &tok, 10, ""),
            &pre,
        ),
        "pretrain",
    );
    let init = pre.join("checkpoint");
    let sft = format!(
        "init: {}\ndata: {}\nsteps: 5\nbatch_size: 4\n",
        init.display(),
        tiny("sft.jsonl").display()
    );
    let rm = format!(
        "init: {}\ndata: {}\nsteps: 5\nbatch_size: 4\n",
        init.display(),
        tiny("pairs.jsonl").display()
    );
    let ppo = format!(
        "policy: {}\nreward_model: {}\nprompts: {}\niterations: 2\nbatch_size: 4\n",
        init.display(),
        init.display(),
        tiny("prompts.jsonl").display()
    );
    let pretrain = std::fs::read_to_string(pretrain_config(dir.path(), &tok, 10, "")).unwrap();
    let pretrain: String = pretrain
        .lines()
        .filter(|l| !l.contains("_every"))
        .map(|l| format!("{l}\n"))
        .collect();
    let cases: Vec<(&str, &str, &[&str])> = vec![
        (
            "temper-pretrain",
            &pretrain,
            &["eval_every", "save_every", "log_every"],
        ),
        (
            "temper-sft",
            &sft,
            &["eval_every", "save_every", "log_every"],
        ),
        (
            "temper-reward",
            &rm,
            &["eval_every", "save_every", "log_every"],
        ),
        ("temper-ppo", &ppo, &["save_every", "sample_every"]),
    ];
    for (stage, base, keys) in cases {
        for key in keys {
            let cfg = write(&dir.path().join("zero.yaml"), &format!("{base}{key}: 0\n"));
            let out = dir.path().join("zero-out");
            let res = run_stage(stage, &cfg, &out);
            let err = String::from_utf8_lossy(&res.stderr);
            assert_eq!(res.status.code(), Some(2), "{stage} {key}: {err}");
            assert_eq!(
                err.trim().lines().count(),
                1,
                "{stage} {key}: one line: {err}"
            );
            assert!(
                err.contains(&format!("field `{key}`: must be at least 1")),
                "{stage}: {err}"
            );
            assert!(!out.exists(), "{stage} {key}: nothing written");
        }
    }
    // A checkpoint whose tokenizer has more tokens than the model has embedding rows (this
    // corpus yields at most 357 BPE entries).
    let big = dir.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let cfg = write(
        &dir.path().join("big.yaml"),
        &format!(
            "corpus: [{}]\nvocab_size: 400\ntext_split: blank_line\n",
            tiny("corpus.txt").display()
        ),
    );
    assert_ok(
        &run_stage("temper-tokenizer", &cfg, &big.join("tok")),
        "tokenizer",
    );
    std::fs::copy(big.join("tok/tokenizer.json"), init.join("tokenizer.json")).unwrap();
    for (stage, base) in [("temper-sft", sft.clone()), ("temper-reward", rm.clone())] {
        let cfg = write(&dir.path().join("vocab.yaml"), &base);
        let res = run_stage(stage, &cfg, &dir.path().join("vocab-out"));
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{stage}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("the model has 300 embedding rows but its tokenizer has 357 tokens"),
            "{stage}: {err}"
        );
    }
    let eval = write(
        &dir.path().join("eval.yaml"),
        &format!(
            "policies: {{base: {0}}}\nbaseline: base\nreward_model: {0}\nprompts: {1}\n",
            init.display(),
            tiny("prompts_eval.jsonl").display()
        ),
    );
    let res = run_stage("temper-eval", &eval, &dir.path().join("eval-out"));
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert!(err.contains("but its tokenizer has 357 tokens"), "{err}");
}

#[test]
fn a_moved_interrupted_project_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let file = project(&first);
    let mut child = start_slow_run(&file);
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    wait_until_gone(&first.to_string_lossy());
    let moved = dir.path().join("moved");
    std::fs::rename(&first, &moved).unwrap();
    let file = moved.join("configs/tiny.yaml");
    let out = temper(
        &file,
        &[&["run", "--stage", "pretrain", "--with-parents"][..], &SLOW].concat(),
    );
    assert_ok(&out, "run after the move");
    assert!(
        text(&out).contains("✓ tokenizer: up to date"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("resuming from its state"),
        "{}",
        text(&out)
    );
    let log = std::fs::read_to_string(moved.join("runs/tiny/logs/pretrain.log")).unwrap();
    assert!(log.contains("resuming from step"), "{log}");
}

#[test]
fn a_dry_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = project(dir.path());
    let out = temper(&file, &["run", "--dry-run"]);
    assert_ok(&out, "dry run");
    assert!(
        text(&out).contains("tokenizer: would run (never run)"),
        "{}",
        text(&out)
    );
    assert!(
        !dir.path().join("runs").exists(),
        "a dry run created the workdir"
    );
    assert_ok(
        &temper(&file, &["run", "--stage", "tokenizer"]),
        "tokenizer",
    );
    let lock = dir.path().join("runs/tiny/temper.lock");
    let before = (
        std::fs::read(&lock).unwrap(),
        std::fs::metadata(&lock).unwrap().modified().unwrap(),
    );
    let out = temper(
        &file,
        &["run", "--dry-run", "-o", "tokenizer.vocab_size=301"],
    );
    assert!(
        text(&out).contains("tokenizer: would run (params changed: vocab_size)"),
        "{}",
        text(&out)
    );
    let after = (
        std::fs::read(&lock).unwrap(),
        std::fs::metadata(&lock).unwrap().modified().unwrap(),
    );
    assert_eq!(before, after, "a dry run rewrote the lock");
}

#[test]
fn read_only_commands_into_a_closed_pipe_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let file = project(dir.path());
    assert_ok(
        &temper(&file, &["run", "--stage", "pretrain", "--with-parents"]),
        "run",
    );
    for cmd in [&["status"][..], &["metrics", "--split", "all"], &["dag"]] {
        let mut child = Command::new(bin("temper"))
            .args(cmd)
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader goes away at once, as `| head -0` would
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn only_declared_keys_are_inputs_wherever_the_files_are() {
    let dir = tempfile::tempdir().unwrap();
    let file = project(dir.path());
    // Values that happen to name files next to the pipeline file stay values.
    std::fs::create_dir_all(dir.path().join("configs/gpt2")).unwrap();
    std::fs::write(dir.path().join("configs/cpu"), "not a device").unwrap();
    let cache = ["-o", "pretrain.cache_dir=../token-cache"];
    let first = temper(
        &file,
        &[
            &["run", "--stage", "pretrain", "--with-parents"][..],
            &cache,
        ]
        .concat(),
    );
    assert_ok(&first, "first run");
    let config =
        std::fs::read_to_string(dir.path().join("runs/tiny/configs/pretrain.yaml")).unwrap();
    assert!(
        config.contains("arch: gpt2") && config.contains("device: cpu"),
        "{config}"
    );
    assert!(
        config.contains("tokenizer: ../stages/tokenizer/tokenizer.json"),
        "paths are relative: {config}"
    );
    // A cache location is not an input: the next run finds pretraining up to date.
    let second = temper(&file, &[&["run", "--dry-run"][..], &cache].concat());
    assert!(
        text(&second).contains("pretrain: up to date"),
        "{}",
        text(&second)
    );
    // Data inside the workdir is hashed like any other input.
    let inside = dir.path().join("runs/tiny/corpus-copy.txt");
    std::fs::copy(tiny("corpus.txt"), &inside).unwrap();
    let data = ["-o", "pretrain.data=[../runs/tiny/corpus-copy.txt]"];
    assert_ok(
        &temper(
            &file,
            &[&["run", "--stage", "pretrain", "--with-parents"][..], &data].concat(),
        ),
        "run",
    );
    std::fs::write(
        &inside,
        std::fs::read_to_string(tiny("corpus.txt")).unwrap() + "\n\nA new line of text.\n",
    )
    .unwrap();
    let out = temper(&file, &[&["run", "--dry-run"][..], &data].concat());
    assert!(
        text(&out).contains("pretrain: would run (input changed: ../runs/tiny/corpus-copy.txt)"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_damaged_token_cache_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let cfg = pretrain_config(dir.path(), &tok, 4, "");
    assert_ok(
        &run_stage("temper-pretrain", &cfg, &dir.path().join("a")),
        "first",
    );
    let entry = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let train = entry.join("train.u32");
    let mut bytes = std::fs::read(&train).unwrap();
    bytes.truncate(bytes.len() - 6); // cut mid-token
    std::fs::write(&train, bytes).unwrap();
    let out = run_stage("temper-pretrain", &cfg, &dir.path().join("b"));
    assert_ok(&out, "with a damaged cache");
    let a = std::fs::read(dir.path().join("a/checkpoint/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("b/checkpoint/model.safetensors")).unwrap();
    assert!(a == b, "the rebuilt stream trains the same model");
}

#[test]
fn bad_peft_blocks_exit_2_with_one_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let pre = dir.path().join("pretrain");
    assert_ok(
        &run_stage(
            "temper-pretrain",
            &pretrain_config(dir.path(), &tok, 4, ""),
            &pre,
        ),
        "pretrain",
    );
    let sft = format!(
        "init: {}\ndata: {}\nsteps: 2\nbatch_size: 4\n",
        pre.join("checkpoint").display(),
        tiny("sft.jsonl").display()
    );
    let cases = [
        ("peft: {method: lorax, r: 4}", "unknown variant `lorax`"),
        (
            "peft: {method: lora, r: 0}",
            "field `peft.r`: must be a positive rank",
        ),
        (
            "peft: {method: lora, r: 4, target_modules: [q_proj]}",
            "`q_proj` matches no layer of this gpt2 model; available: c_attn, c_fc, c_proj",
        ),
        (
            "peft: {method: lora, r: 4, rank: 3}",
            "unknown field `rank`",
        ),
        (
            "peft: {method: freeze, trainable: [\"*.nothing\"]}",
            "`*.nothing` matches no parameter",
        ),
        (
            "peft: {method: adalora, init_r: 4, target_r: 4}",
            "field `peft.target_r`: must be in 1..4 (below init_r)",
        ),
        (
            "peft: {method: adalora, tinit: 1, tfinal: 1}",
            "leaves no updates for pruning out of 2",
        ),
        (
            "peft: {method: lora, r: 4, init: pissa, dora: true}",
            "pissa cannot be combined with dora",
        ),
    ];
    for (block, words) in cases {
        let cfg = write(&dir.path().join("peft.yaml"), &format!("{sft}{block}\n"));
        let out = dir.path().join("peft-out");
        let res = run_stage("temper-sft", &cfg, &out);
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{block}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{block}: one line: {err}");
        assert!(
            err.contains("peft.yaml:5"),
            "{block}: names the line: {err}"
        );
        assert!(err.contains(words), "{block}: {err}");
        assert!(!out.exists(), "{block}: nothing written");
    }
}
