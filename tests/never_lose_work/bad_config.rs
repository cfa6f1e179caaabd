//! Mistakes found before anything runs: a typo in the last stage, zero cadences, a mismatched
//! tokenizer, bad PEFT blocks; and a dry run that writes nothing.

use super::*;

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
    let (tok, pre) = pretrained(dir.path(), 10, "");
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
fn bad_peft_blocks_exit_2_with_one_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = pretrained(dir.path(), 4, "");
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
