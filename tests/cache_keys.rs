//! The cache never serves a stale result: after a finished run of a pipeline that uses every
//! stage kind, with every path key of every kind (`StageKind::paths`) pointing at a file of
//! the user's, changing any one of those files — a dataset, a checkpoint, a lexicon, a
//! reward command's script, the program a command runs from PATH, the base model behind an
//! adapter — makes the stages that read it stale, naming that input; putting the content
//! back makes them up to date again.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use temper_stage::kinds::{visit_paths, Found, PathRole};
use temper_stage::StageKind;

/// `temper <args>` with `bin_dir` first on PATH (where the test's own reward program lives).
fn temper(bin_dir: &Path, args: &[&str]) -> Output {
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(bin("temper"))
        .args(args)
        .env("PATH", path)
        .env("TEMPER_LOG", "warn")
        .output()
        .expect("temper runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The state column of `stage`'s row in `temper status`.
fn state_of(status: &str, stage: &str) -> String {
    status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(stage))
        .unwrap_or_else(|| panic!("no row for {stage} in:\n{status}"))
        .to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The file whose bytes stand for `path`'s content: itself, or a folder's weights.
fn file_to_change(path: &Path) -> PathBuf {
    if path.is_dir() {
        ["model.safetensors", "adapter_model.safetensors"]
            .iter()
            .map(|f| path.join(f))
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("{} holds no weights", path.display()))
    } else {
        path.to_path_buf()
    }
}

/// The models the pipeline reads as the user's own: a pretrained checkpoint (and a copy as a
/// reference), a reward model, and a LoRA adapter whose base lies outside its folder.
fn user_models(dir: &Path) {
    let make = dir.join("make");
    std::fs::create_dir_all(&make).unwrap();
    let (_, pre) = pretrained(&make, 10, "");
    let base = pre.join("checkpoint");
    let stage = |kind: &str, yaml: String| {
        let cfg = write(&make.join(format!("{kind}.yaml")), &yaml);
        let out = make.join(kind);
        assert_ok(&run_stage(&format!("temper-{kind}"), &cfg, &out), kind);
        out.join("checkpoint")
    };
    let rm = stage(
        "reward",
        format!(
            "init: {}\ndata: {}\nsteps: 4\nbatch_size: 4\nsave_every: 4\n",
            base.display(),
            tiny("pairs.jsonl").display()
        ),
    );
    stage(
        "sft",
        format!(
            "init: {}\ndata: {}\nsteps: 2\nbatch_size: 4\nsave_every: 2\nsamples: 0\npeft: {{method: lora, r: 2}}\n",
            base.display(),
            tiny("sft.jsonl").display()
        ),
    );
    copy_dir(&base, &dir.join("models/model"));
    copy_dir(&base, &dir.join("models/ref"));
    copy_dir(&rm, &dir.join("models/rm"));
}

const PIPELINE: &str = "\
name: keys
workdir: work
defaults: {device: cpu, seed: 3}
stages:
  tokenizer:
    uses: tokenizer
    with: {corpus: [data/corpus.txt], vocab_size: 300, text_split: blank_line}
  pretrain:
    uses: pretrain
    with:
      init: models/model
      tokenizer: data/tokenizer.json
      data: [data/corpus.txt]
      eval_data: {held: {files: [data/held.txt]}}
      cache_dir: cache
      block_size: 32
      steps: 2
      batch_size: 2
      save_every: 2
  sft:
    uses: sft
    with: {init: models/model, data: data/sft.jsonl, eval_data: data/sft_eval.jsonl, steps: 2, batch_size: 2, save_every: 2, samples: 0}
  reward:
    uses: reward
    with: {init: models/model, data: data/pairs.jsonl, eval_data: data/pairs_eval.jsonl, eval_sets: {human: data/human.jsonl}, steps: 2, batch_size: 2, save_every: 2}
  ppo:
    uses: ppo
    with:
      policy: models/model
      reward_model: models/rm
      prompts: data/prompts.jsonl
      rewards:
        - {kind: lexicon, path: data/lexicon.txt, weight: 0.1}
        - {kind: command, command: [sh, data/score.sh, data/weights.txt], inputs: [data/helper.txt], weight: 0.1}
      iterations: 2
      batch_size: 4
      minibatch_size: 4
      max_new_tokens: 6
      save_every: 2
  dpo:
    uses: dpo
    with: {policy: models/model, reference: models/ref, data: data/pairs.jsonl, eval_data: data/pairs_eval.jsonl, steps: 2, batch_size: 2, save_every: 2}
  grpo:
    uses: grpo
    with:
      policy: models/model
      reference: models/ref
      prompts: data/prompts.jsonl
      rewards:
        - {kind: model, path: models/rm}
        - {kind: lexicon, path: data/lexicon.txt}
        - {kind: command, command: [score-reward, data/weights.txt], inputs: [data/helper.txt], name: program}
      beta: 0.04
      num_generations: 2
      prompts_per_iteration: 2
      iterations: 2
      max_new_tokens: 6
      save_every: 2
  merge:
    uses: merge
    with: {adapter: make/sft/checkpoint}
  eval:
    uses: eval
    with:
      policies: {a: models/model, b: models/ref}
      baseline: a
      reference: models/ref
      reward_model: models/rm
      prompts: data/prompts_eval.jsonl
      lexicon: data/lexicon.txt
      judges:
        - {kind: afinn, path: data/afinn.txt}
        - {kind: command, command: [sh, data/score.sh], inputs: [data/helper.txt], name: script}
        - {kind: command, command: [score-reward], name: program}
      best_of:
        n: 2
        labeller:
          - {kind: lexicon, path: data/best_lexicon.txt}
          - {kind: command, command: [sh, data/score.sh], inputs: [data/best_helper.txt], name: script}
          - {kind: command, command: [score-reward], name: program}
      max_prompts: 4
      max_new_tokens: 6
  label:
    uses: label
    with:
      policy: models/model
      prompts: data/prompts.jsonl
      labeller:
        - {kind: afinn, path: data/afinn.txt}
        - {kind: command, command: [sh, data/score.sh, data/weights.txt], inputs: [data/helper.txt], name: script}
        - {kind: command, command: [score-reward], name: program}
      num_generations: 2
      max_prompts: 4
      max_new_tokens: 6
";

#[test]
fn changing_any_input_of_any_stage_kind_makes_it_stale_naming_that_input() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    user_models(dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for f in [
        "corpus.txt",
        "sft.jsonl",
        "sft_eval.jsonl",
        "pairs.jsonl",
        "pairs_eval.jsonl",
        "prompts.jsonl",
        "prompts_eval.jsonl",
    ] {
        std::fs::copy(tiny(f), data.join(f)).unwrap();
    }
    std::fs::copy(tiny("corpus.txt"), data.join("held.txt")).unwrap();
    std::fs::copy(tiny("pairs_eval.jsonl"), data.join("human.jsonl")).unwrap();
    std::fs::copy(
        dir.join("make/tok/tokenizer.json"),
        data.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/vader/lexicon.txt"),
        data.join("lexicon.txt"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/afinn/lexicon.txt"),
        data.join("afinn.txt"),
    )
    .unwrap();
    // A reward script and the files it is given or reads, and a program found on PATH.
    write(
        &data.join("score.sh"),
        "while read -r line; do echo 0.5; done\n",
    );
    write(&data.join("weights.txt"), "1\n");
    write(&data.join("helper.txt"), "helper\n");
    write(&data.join("best_helper.txt"), "helper\n");
    std::fs::copy(data.join("lexicon.txt"), data.join("best_lexicon.txt")).unwrap();
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let program = write(
        &bin_dir.join("score-reward"),
        "#!/bin/sh\nwhile read -r line; do echo 1; done\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = write(&dir.join("keys.yaml"), PIPELINE);
    let file_arg = file.to_str().unwrap();

    let run = temper(&bin_dir, &["run", file_arg]);
    assert_ok(&run, "the pipeline");

    // Every path key of every kind is exercised with a file of the user's.
    let spec: serde_yaml::Value = serde_yaml::from_str(PIPELINE).unwrap();
    let mut inputs: Vec<(String, StageKind, Found, String)> = Vec::new();
    let mut covered = BTreeSet::new();
    for (name, stage) in spec["stages"].as_mapping().unwrap() {
        let name = name.as_str().unwrap().to_string();
        let kind = StageKind::parse(stage["uses"].as_str().unwrap()).unwrap();
        let mut with = stage["with"].clone();
        visit_paths(kind, &mut with, dir, &mut |found, at, s| {
            // `rewards[1].command[0]` → the pattern `rewards.command`.
            let pattern: String = at
                .split('.')
                .map(|part| part.split('[').next().unwrap())
                .collect::<Vec<_>>()
                .join(".");
            covered.insert((kind, pattern, found));
            if found != Found::Cache {
                inputs.push((name.clone(), kind, found, s.clone()));
            }
        });
    }
    // `eval_data.*.files` matches `eval_data.held.files`.
    let matches = |pattern: &str, at: &str| {
        let (p, a): (Vec<&str>, Vec<&str>) =
            (pattern.split('.').collect(), at.split('.').collect());
        p.len() == a.len() && p.iter().zip(&a).all(|(p, a)| *p == "*" || p == a)
    };
    for kind in StageKind::ALL {
        for (pattern, role) in kind.paths() {
            let has = |found| {
                covered
                    .iter()
                    .any(|(k, at, f)| *k == kind && matches(pattern, at) && *f == found)
            };
            match role {
                PathRole::Input => assert!(has(Found::Input), "{kind}: `{pattern}` unexercised"),
                PathRole::Cache => assert!(has(Found::Cache), "{kind}: `{pattern}` unexercised"),
                PathRole::Command => assert!(
                    has(Found::Input) && has(Found::Program),
                    "{kind}: `{pattern}` needs a script and a PATH program"
                ),
            }
        }
    }

    let mut checked = 0;
    for (stage, kind, found, as_written) in &inputs {
        let target = match found {
            // A system program (`sh`) is hashed too, but is not ours to change.
            Found::Program if !bin_dir.join(as_written).exists() => continue,
            Found::Program => bin_dir.join(as_written),
            _ => file_to_change(&dir.join(as_written)),
        };
        let original = std::fs::read(&target).unwrap();
        let mut changed = original.clone();
        changed.extend_from_slice(b"\n");
        std::fs::write(&target, &changed).unwrap();
        let status = stdout(&temper(&bin_dir, &["status", file_arg]));
        let row = state_of(&status, stage);
        assert!(
            row.contains(&format!("stale: input changed: {as_written}")),
            "{kind} stage `{stage}` after {} changed:\n{status}",
            target.display()
        );
        std::fs::write(&target, &original).unwrap();
        checked += 1;
    }
    assert!(checked >= 30, "{checked} inputs checked");

    // The base behind an adapter is read with it: changing it makes the merge stale.
    let base = file_to_change(&dir.join("make/pretrain/checkpoint"));
    let original = std::fs::read(&base).unwrap();
    std::fs::write(&base, [original.as_slice(), b"\n"].concat()).unwrap();
    let status = stdout(&temper(&bin_dir, &["status", file_arg]));
    assert!(
        state_of(&status, "merge").contains("stale: input changed: make/sft/checkpoint"),
        "{status}"
    );
    std::fs::write(&base, &original).unwrap();

    // The same content again: up to date, nothing reruns; a cache location is no input.
    let status = stdout(&temper(&bin_dir, &["status", file_arg]));
    for (name, _) in spec["stages"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        assert!(
            state_of(&status, name).contains("up to date"),
            "{name}:\n{status}"
        );
    }
    let moved = temper(
        &bin_dir,
        &["run", file_arg, "-o", "pretrain.cache_dir=elsewhere"],
    );
    assert_ok(&moved, "a run with the token cache elsewhere");
    assert!(
        stdout(&moved).contains("✓ pretrain: up to date"),
        "{}",
        stdout(&moved)
    );
}
