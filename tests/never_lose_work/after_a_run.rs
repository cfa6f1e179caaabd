//! A finished run keeps its work byte for byte: through a typo, a workdir over the project,
//! values that only look like paths, and a damaged token cache.

use super::*;

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
