//! The orchestrator driving the real stage binaries on configs/tiny.yaml: caching, targeted
//! reruns, staleness from deleted outputs, resume after an interrupted run, and validation
//! that stops a bad file before anything runs.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn temper(workdir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("temper"));
    cmd.args(args).arg("--workdir").arg(workdir);
    cmd.output().expect("temper runs")
}

fn tiny_yaml() -> String {
    repo()
        .join("configs/tiny.yaml")
        .to_string_lossy()
        .into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ran(o: &Output) -> Vec<String> {
    stdout(o)
        .lines()
        .filter_map(|l| l.strip_prefix("▶ "))
        .map(|l| l.split(':').next().unwrap().to_string())
        .collect()
}

#[test]
fn runs_caches_and_reruns_exactly_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let first = temper(w, &["run", &tiny_yaml()]);
    assert_ok(&first, "first run");
    assert_eq!(
        ran(&first),
        ["tokenizer", "pretrain", "sft", "reward", "ppo", "eval"],
        "{}",
        stdout(&first)
    );

    let start = Instant::now();
    let second = temper(w, &["run", &tiny_yaml()]);
    let took = start.elapsed();
    assert_ok(&second, "second run");
    assert!(
        ran(&second).is_empty(),
        "second run ran stages:\n{}",
        stdout(&second)
    );
    assert!(took < Duration::from_secs(1), "second run took {took:?}");
    assert!(stdout(&second).contains("✓ sft: up to date"));

    // One SFT parameter changed: SFT and its descendants rerun, nothing upstream.
    let changed = temper(w, &["run", &tiny_yaml(), "-o", "sft.optim.lr=1.5e-3"]);
    assert_ok(&changed, "run with a changed SFT parameter");
    assert_eq!(
        ran(&changed),
        ["sft", "reward", "ppo", "eval"],
        "{}",
        stdout(&changed)
    );
    assert!(
        stdout(&changed).contains("▶ sft: running (params changed: optim.lr)"),
        "{}",
        stdout(&changed)
    );
    assert!(
        stdout(&changed).contains("▶ reward: running (parent sft changed)"),
        "{}",
        stdout(&changed)
    );
    // `temper diff`: what changed since the previous result of each stage, and what it did.
    let d = temper(w, &["diff", &tiny_yaml(), "--json"]);
    assert_ok(&d, "diff");
    let d: serde_json::Value = serde_json::from_str(&stdout(&d)).unwrap();
    assert_eq!(
        d["sft"]["params"]["optim.lr"],
        serde_json::json!([0.002, 0.0015])
    );
    assert!(d["sft"]["metrics"]["loss"]["delta"].is_number(), "{d}");
    assert!(d.get("pretrain").is_none(), "pretrain did not change: {d}");
    assert!(d["reward"]["params"].as_object().unwrap().is_empty(), "{d}");
    // A manifest of another pipeline is refused, naming both.
    let manifest = std::fs::read_dir(w.join("manifests"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .next()
        .unwrap();
    let mut other: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    other["pipeline"] = "other".into();
    let other_file = dir.path().join("other.json");
    std::fs::write(&other_file, other.to_string()).unwrap();
    let refused = temper(
        w,
        &[
            "diff",
            &tiny_yaml(),
            "--against",
            other_file.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("pipeline `other`, not `tiny`"),
        "{err}"
    );

    // A manifest cut off mid-write (a full disk, say) is skipped and named, not fatal.
    let damaged = w.join("manifests/99999999999-1.json");
    std::fs::write(&damaged, "{\"pipeline\": \"tiny\", \"stag").unwrap();
    let d = temper(w, &["diff", &tiny_yaml(), "--json"]);
    assert_ok(&d, "diff beside a damaged manifest");
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(
        err.contains("skipping manifest") && err.contains("99999999999-1.json"),
        "{err}"
    );
    let d: serde_json::Value = serde_json::from_str(&stdout(&d)).unwrap();
    assert!(d["sft"]["params"]["optim.lr"].is_array(), "{d}");
    std::fs::remove_file(&damaged).unwrap();

    // Back to the file's parameters; then --stage reward reruns only the reward model.
    assert_ok(&temper(w, &["run", &tiny_yaml()]), "restore");
    let only = temper(w, &["run", &tiny_yaml(), "--stage", "reward"]);
    assert_ok(&only, "--stage reward");
    assert_eq!(ran(&only), ["reward"], "{}", stdout(&only));

    // A deleted checkpoint makes its stage stale; the rebuilt one is identical on CPU, so the
    // stages downstream stay up to date.
    std::fs::remove_file(w.join("stages/sft/checkpoint/model.safetensors")).unwrap();
    let status = temper(w, &["status", &tiny_yaml()]);
    assert!(
        stdout(&status).contains("stale: output missing: checkpoint/model.safetensors"),
        "{}",
        stdout(&status)
    );
    let rebuilt = temper(w, &["run", &tiny_yaml()]);
    assert_ok(&rebuilt, "rebuild");
    assert_eq!(ran(&rebuilt), ["sft"], "{}", stdout(&rebuilt));

    // The dry run and the read-only views.
    let dry = temper(w, &["run", &tiny_yaml(), "--from", "sft", "--dry-run"]);
    assert!(
        stdout(&dry).contains("sft: would run (requested; up to date)")
            && stdout(&dry).contains("reward: would run"),
        "{}",
        stdout(&dry)
    );
    let metrics = temper(w, &["metrics", &tiny_yaml(), "reward", "--last", "1"]);
    assert!(
        stdout(&metrics).contains("accuracy"),
        "{}",
        stdout(&metrics)
    );
    let dag = temper(w, &["dag", &tiny_yaml()]);
    assert!(stdout(&dag).contains("sft --> reward"), "{}", stdout(&dag));
    let report = temper(w, &["report", &tiny_yaml()]);
    assert_ok(&report, "report");
    let html = std::fs::read_to_string(w.join("report.html")).unwrap();
    for needle in [
        "<h2 id=\"stage-pretrain\">pretrain",
        ">loss</text>",        // a pretraining curve
        ">accuracy</text>",    // the reward model's held-out accuracy
        ">reward/mean</text>", // PPO's reward per iteration
        "<td>win_rate</td>",   // the evaluation's single row, as a metric × policy table
        "<th>ppo</th>",
        ">reward/mean vs kl/mean</text>", // PPO's reward against its KL
        "stages/eval/report.md",
    ] {
        assert!(html.contains(needle), "report.html lacks {needle}");
    }
    assert!(
        w.join("manifests").read_dir().unwrap().count() >= 6,
        "one manifest per run"
    );

    // The README's quick start runs as written, in order; the line it says finds every stage
    // up to date does.
    let commands = readme_tiny_commands();
    assert!(commands.len() >= 3, "{commands:?}");
    for (args, comment) in commands {
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.as_str() {
                "configs/tiny.yaml" => tiny_yaml(),
                _ => a.clone(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = temper(w, &args);
        assert_ok(&out, &format!("README: temper {}", args.join(" ")));
        if comment.contains("up to date") {
            assert!(ran(&out).is_empty(), "{}", stdout(&out));
        }
    }
}

/// The fenced shell lines of the README that run `temper` on configs/tiny.yaml: each line's
/// arguments after the program, and its comment.
fn readme_tiny_commands() -> Vec<(Vec<String>, String)> {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let (command, comment) = line.split_once(" #").unwrap_or((line, ""));
        let mut words = command.split_whitespace();
        let program = words.next().unwrap_or_default();
        if fenced && program.ends_with("temper") && command.contains("configs/tiny.yaml") {
            out.push((words.map(str::to_owned).collect(), comment.to_owned()));
        }
    }
    out
}

#[test]
fn an_interrupted_stage_resumes_on_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let slow = [
        "-o",
        "pretrain.steps=100",
        "-o",
        "pretrain.batch_size=32",
        "-o",
        "pretrain.save_every=10",
    ];
    let mut child = Command::new(bin("temper"))
        .args(["run", &tiny_yaml(), "--workdir", w.to_str().unwrap()])
        .args(slow)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = tiny_yaml();
    let progress = w.join("stages/.pretrain.next/state/progress.json");
    wait_for(&progress, "pretrain's first state");
    let start = Instant::now();
    // While it runs, status says so, with its step, rate and ETA.
    let mut status_args = vec!["status", t.as_str()];
    status_args.extend(slow);
    let running = loop {
        let st = stdout(&temper(w, &status_args));
        let row = st
            .lines()
            .find(|l| l.starts_with("pretrain"))
            .unwrap_or("")
            .to_string();
        if row.contains("running: step") || start.elapsed() > Duration::from_secs(120) {
            break row;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        running.contains("running: step") && running.contains("/100 (") && running.contains("ETA"),
        "{running}"
    );
    assert!(!running.contains("resumes"), "{running}");
    // Ctrl-C: temper stops its child, keeps the stage's state and exits 130.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        !w.join("stages/pretrain/checkpoint").exists(),
        "pretrain finished before the interrupt"
    );
    let st = temper(w, &status_args);
    assert!(
        stdout(&st).contains("interrupted; resumes"),
        "{}",
        stdout(&st)
    );

    let mut args = vec!["run", t.as_str()];
    args.extend(slow);
    args.extend(["--stage", "pretrain", "--with-parents"]);
    let resumed = temper(w, &args);
    assert_ok(&resumed, "resumed run");
    assert!(
        stdout(&resumed).contains(
            "▶ pretrain: running (requested; last run was interrupted; resuming from its state)"
        ),
        "{}",
        stdout(&resumed)
    );
    let log = std::fs::read_to_string(w.join("logs/pretrain.log")).unwrap();
    assert!(
        log.contains("resuming from step"),
        "the stage did not resume:\n{log}"
    );

    // Under the file's own settings pretraining is stale: --only needs its parents up to
    // date, unless --with-parents, which brings the stale ones in.
    let only = temper(w, &["run", t.as_str(), "--only", "ppo", "--dry-run"]);
    let err = String::from_utf8_lossy(&only.stderr);
    assert!(
        !only.status.success() && err.contains("parent stage `pretrain` is stale"),
        "{err}"
    );
    let with = temper(
        w,
        &[
            "run",
            t.as_str(),
            "--only",
            "ppo",
            "--with-parents",
            "--dry-run",
        ],
    );
    assert_ok(&with, "--only with --with-parents");
    let plan = stdout(&with);
    assert!(
        plan.contains("pretrain: would run (params changed")
            && plan.contains("tokenizer: up to date")
            && plan.contains("ppo: would run")
            && plan.contains("eval: not selected"),
        "{plan}"
    );
}

/// `temper validate FILE`, killed if it takes over a minute (it once spun forever).
fn validate_within_a_minute(file: &Path) -> Output {
    let mut child = Command::new(bin("temper"))
        .args(["validate", file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!(
                "temper validate {} did not return in a minute",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn validate_checks_every_model_free_setting_and_names_what_waits_for_parents() {
    let dir = tempfile::tempdir().unwrap();
    // A repeated matrix value: one line naming it, at once.
    let twice = tiny_variant(dir.path(), |t| {
        t.replace(
            "  reward:\n    uses: reward\n",
            "  reward:\n    uses: reward\n    matrix: {seed: [1, 1]}\n",
        )
    });
    let out = validate_within_a_minute(&twice);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("stage `reward`: matrix key `seed` lists `1` twice"),
        "{err}"
    );
    // Settings that need no model are refused before any stage runs, at their line.
    for (edit, words) in [
        (
            "      samples: 2\n      peft: {method: lora, r: 0}\n",
            "with.peft.r: must be a positive rank",
        ),
        (
            "      samples: 2\n      peft: {method: freeze, top_layers: 0}\n",
            "with.peft.top_layers: must be at least 1",
        ),
    ] {
        let bad = tiny_variant(dir.path(), |t| t.replace("      samples: 2\n", edit));
        let out = validate_within_a_minute(&bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("stage `sft`") && err.contains(words), "{err}");
        let line = std::fs::read_to_string(&bad)
            .unwrap()
            .lines()
            .position(|l| l.contains("peft:"))
            .unwrap()
            + 1;
        assert!(
            err.contains(&format!("tiny.yaml:{line}:")),
            "line {line}: {err}"
        );
        let run = temper(&dir.path().join("w"), &["run", bad.to_str().unwrap()]);
        assert_eq!(run.status.code(), Some(2));
        assert!(
            !dir.path().join("w/stages/tokenizer").exists(),
            "nothing ran before the refusal"
        );
    }
    // A valid file: the checks that read a parent's output are named as waiting for it.
    let ok = tiny_variant(dir.path(), |t| t);
    let out = validate_within_a_minute(&ok);
    assert_ok(&out, "validate");
    let text = stdout(&out);
    assert!(text.contains("valid (6 stages)"), "{text}");
    assert!(
        text.contains("sft: init — the model with its tokenizer and chat template")
            && text.contains("PEFT target modules"),
        "{text}"
    );
    assert!(text.contains("ppo: policy, reward_model"), "{text}");
}

fn invalid_case(yaml: &str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let w = dir.path().join("work");
    let out = temper(&w, &["run", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(expect), "expected `{expect}` in:\n{err}");
    assert!(
        !w.exists(),
        "nothing may run or be created for an invalid file"
    );
}

#[test]
fn invalid_pipelines_fail_before_anything_runs_naming_the_problem() {
    let head = "name: bad\nworkdir: work\nstages:\n";
    invalid_case(
        &format!("{head}  a:\n    uses: tokenizer\n    wiht: {{}}\n"),
        "line 4: stage `a`: unknown field `wiht`",
    );
    invalid_case(
        "name: bad\nworkdir: work\nstagse: {}\n",
        "line 3: unknown field `stagse`",
    );
    invalid_case(
        &format!("{head}  a:\n    uses: distill\n"),
        "line 4: stage `a`: unknown kind `uses: distill`",
    );
    invalid_case(
        &format!("{head}  a:\n    uses: sft\n    with:\n      init: ${{pretrain.checkpoint}}\n"),
        "line 7: stage `a` refers to `pretrain`, which is not a stage",
    );
    invalid_case(
        &format!("{head}  a:\n    uses: sft\n    with:\n      init: ${{b.checkpoint}}\n  b:\n    uses: reward\n    with:\n      init: ${{a.checkpoint}}\n"),
        "cycle: a -> b -> a",
    );
    invalid_case(
        &format!("{head}  a:\n    uses: sft\n  a:\n    uses: reward\n"),
        "duplicate",
    );
    // Several problems are reported together.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        format!("{head}  a:\n    uses: distill\n  b:\n    uses: sft\n    needs: [nope]\n"),
    )
    .unwrap();
    let out = temper(&dir.path().join("w"), &["validate", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 problem(s)") && err.contains("distill") && err.contains("`nope`"),
        "{err}"
    );
}

/// configs/tiny.yaml rewritten by `edit`, in a folder of its own that refers back to the
/// fixtures, with its workdir there too.
#[test]
fn a_seed_sweep_runs_as_branches_and_compares_as_mean_and_std() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_reward_sweep(dir.path());
    let f = file.to_str().unwrap();
    let out = Command::new(bin("temper"))
        .args(["run", f])
        .output()
        .unwrap();
    assert_ok(&out, "sweep run");
    assert_eq!(
        ran(&out),
        [
            "tokenizer",
            "pretrain",
            "sft",
            "reward@seed=1",
            "reward@seed=2",
            "ppo@seed=1",
            "ppo@seed=2",
            "eval@seed=1",
            "eval@seed=2"
        ],
        "{}",
        stdout(&out)
    );
    // The seed reaches the branch's downstream stages; the shared upstream ran once.
    let cfg = std::fs::read_to_string(dir.path().join("work/configs/ppo@seed=2.yaml")).unwrap();
    assert!(
        cfg.contains("seed: 2") && cfg.contains("reward@seed=2/checkpoint"),
        "{cfg}"
    );
    let cmp = Command::new(bin("temper"))
        .args(["compare", f])
        .output()
        .unwrap();
    let text = stdout(&cmp);
    assert!(
        text.contains("reward (2 branches)") && text.contains("seed=1") && text.contains("(n=2)"),
        "{text}"
    );
    let row = text.lines().find(|l| l.starts_with("accuracy")).unwrap();
    assert!(row.contains(" ± "), "{row}");
    let json = Command::new(bin("temper"))
        .args(["compare", f, "--json"])
        .output()
        .unwrap();
    let first: serde_json::Value =
        serde_json::from_str(stdout(&json).lines().next().unwrap()).unwrap();
    assert_eq!(first["stage"], "reward");
    assert_eq!(first["metrics"]["accuracy"]["n"], 2);
    // `--stage reward` means every branch.
    let again = Command::new(bin("temper"))
        .args(["run", f, "--stage", "reward", "--dry-run"])
        .output()
        .unwrap();
    assert!(
        stdout(&again).contains("reward@seed=1: would run (requested"),
        "{}",
        stdout(&again)
    );
    assert!(
        stdout(&again).contains("reward@seed=2: would run (requested"),
        "{}",
        stdout(&again)
    );
}

#[test]
fn a_failing_gate_stops_the_stage_and_its_descendants() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_variant(dir.path(), |t| {
        t.replace(
            "  ppo:\n    uses: ppo\n",
            "  ppo:\n    uses: ppo\n    gate: [\"reward.accuracy >= 1.01\"]\n",
        )
    });
    let f = file.to_str().unwrap();
    let out = Command::new(bin("temper"))
        .args(["run", f])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "gated runs exit 4:\n{}",
        stdout(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains("⊘ ppo: gated: reward.accuracy >= 1.01 failed: reward.accuracy = 1.0000"),
        "{text}"
    );
    assert!(
        text.contains("- eval: skipped, parent ppo was gated"),
        "{text}"
    );
    let st = Command::new(bin("temper"))
        .args(["status", f])
        .output()
        .unwrap();
    assert!(
        stdout(&st).contains("gated: reward.accuracy >= 1.01 failed"),
        "{}",
        stdout(&st)
    );
    // With the gate met, the stage runs.
    let lowered = tiny_variant(dir.path(), |t| {
        t.replace(
            "  ppo:\n    uses: ppo\n",
            "  ppo:\n    uses: ppo\n    gate: [\"reward.accuracy >= 0.5\"]\n",
        )
    });
    let out = Command::new(bin("temper"))
        .args(["run", lowered.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out, "run with the gate met");
    assert!(stdout(&out).contains("✓ eval: done"), "{}", stdout(&out));
}

#[test]
fn two_runs_from_scratch_give_bit_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut summaries = Vec::new();
    for name in ["a", "b"] {
        let w = dir.path().join(name);
        assert_ok(&temper(&w, &["run", &tiny_yaml()]), "run");
        let mut per_stage = std::collections::BTreeMap::new();
        for stage in ["tokenizer", "pretrain", "sft", "reward", "ppo", "eval"] {
            let out = w.join("stages").join(stage);
            let mut s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                    .unwrap();
            let o = s.as_object_mut().unwrap();
            o.retain(|k, _| !matches!(k.as_str(), "wall_time_s" | "tokens_per_s" | "peak_rss_mb"));
            let weights = std::fs::read(out.join("checkpoint/model.safetensors")).ok();
            per_stage.insert(stage, (s, weights));
        }
        summaries.push(per_stage);
    }
    for (stage, (a, wa)) in &summaries[0] {
        let (b, wb) = &summaries[1][stage];
        assert_eq!(
            a, b,
            "{stage}: summaries differ between two runs from scratch"
        );
        assert!(
            wa == wb,
            "{stage}: weights differ between two runs from scratch"
        );
    }
}

/// configs/demo_study.yaml is configs/demo.yaml swept over three seeds from the feedback stage
/// down, and nothing else: the README's tables (from the study) describe the demo's recipe.
#[test]
fn the_demo_study_is_the_demo_over_three_seeds() {
    let read = |name: &str| -> serde_yaml::Value {
        let text = std::fs::read_to_string(repo().join("configs").join(name)).unwrap();
        serde_yaml::from_str(&text).unwrap()
    };
    let (demo, mut study) = (read("demo.yaml"), read("demo_study.yaml"));
    assert_eq!(study["name"], "demo_study");
    assert_eq!(study["workdir"], "../runs/demo_study");
    let label = study["stages"]["label"].as_mapping_mut().unwrap();
    let matrix = label
        .remove("matrix")
        .expect("the study sweeps the feedback stage");
    assert_eq!(
        matrix,
        serde_yaml::from_str::<serde_yaml::Value>("{seed: [1, 2, 3]}").unwrap()
    );
    assert_eq!(study["stages"], demo["stages"]);
    assert_eq!(study["defaults"], demo["defaults"]);
}
