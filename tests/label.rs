//! The feedback stage (temper-label) on the tiny fixtures: pairs and best-of-n rows exactly as
//! a hand-made labeller's scores say, ties and all-equal groups dropped and counted, a killed
//! run resumed to the same files, bad labeller answers stopped with one line, and the iterated
//! pipeline of configs/tiny_feedback.yaml end to end.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A labeller in Python: a reply scores its length in characters modulo 7 (many distinct
/// values, and ties).
fn length_mod_7(dir: &Path) -> PathBuf {
    write(
        &dir.join("mod7.py"),
        "import json, sys\nfor line in sys.stdin:\n    print(len(json.loads(line)['reply']) % 7, flush=True)\n",
    )
}

fn label_config(dir: &Path, sft: &Path, labeller: &str, extra: &str) -> PathBuf {
    write(
        &dir.join("label.yaml"),
        &format!(
            "policy: {}\nprompts: {}\nlabeller: {labeller}\nbatch_size: 4\n\
             max_new_tokens: 12\nseed: 5\n{}{extra}",
            sft.display(),
            tiny("prompts.jsonl").display(),
            match extra.contains("num_generations") {
                true => "",
                false => "num_generations: 4\n",
            }
        ),
    )
}

/// What the stage should have chosen, recomputed from its replies.jsonl: per prompt, the first
/// best and the first worst reply; a pair when their scores differ.
fn expected_pairs(replies: &[Value]) -> Vec<(String, String, f64)> {
    let mut groups: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for r in replies {
        groups
            .entry(r["prompt_index"].as_u64().unwrap())
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for group in groups.values() {
        let score = |r: &Value| r["score"].as_f64().unwrap();
        let (mut best, mut worst) = (group[0], group[0]);
        for r in group {
            if score(r) > score(best) {
                best = r;
            }
            if score(r) < score(worst) {
                worst = r;
            }
        }
        let (b, w) = (
            best["reply"].as_str().unwrap(),
            worst["reply"].as_str().unwrap(),
        );
        if score(best) > score(worst) && b != w {
            out.push((b.to_string(), w.to_string(), score(best) - score(worst)));
        }
    }
    out
}

#[test]
fn pairs_and_best_of_n_follow_the_labeller_and_a_killed_run_resumes_to_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (sft, rm) = sft_and_reward(dir);
    let script = length_mod_7(dir);
    let labeller = format!(
        "[{{kind: command, command: [python3, {}], name: mod7}}, {{kind: model, path: {}, weight: 0.0}}]",
        script.display(),
        rm.display()
    );
    let cfg = label_config(dir, &sft, &labeller, "best_min_score: 3\n");
    let out = dir.join("label");
    assert_ok(&run_stage("temper-label", &cfg, &out), "label");

    let replies = rows(&out.join("replies.jsonl"));
    assert_eq!(replies.len(), 64 * 4, "4 replies to each of the 64 prompts");
    for r in &replies {
        let text = r["reply"].as_str().unwrap();
        let want = (text.chars().count() % 7) as f64;
        assert_eq!(r["score/mod7"].as_f64(), Some(want), "{text:?}");
        // A weight of 0: the reward model is scored and logged but adds nothing.
        assert!(r["score/model"].as_f64().unwrap().is_finite());
        assert_eq!(r["score"].as_f64(), Some(want));
    }
    let pairs = rows(&out.join("pairs.jsonl"));
    let got: Vec<(String, String, f64)> = pairs
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap().to_string();
            (s("chosen"), s("rejected"), p["margin"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(got, expected_pairs(&replies));
    assert!(pairs.len() >= 40, "{} pairs", pairs.len());
    for p in &pairs {
        assert!(
            p["prompt"].is_string(),
            "a one-turn prompt is written as text"
        );
        assert!(p["chosen_score"].as_f64() > p["rejected_score"].as_f64());
    }
    // Best-of-n: every prompt whose best reply scores ≥ 3, in `messages` form.
    let best = rows(&out.join("best_of_n.jsonl"));
    let expected_best = {
        let mut by_prompt: BTreeMap<u64, f64> = BTreeMap::new();
        for r in &replies {
            let e = by_prompt
                .entry(r["prompt_index"].as_u64().unwrap())
                .or_insert(f64::MIN);
            *e = e.max(r["score"].as_f64().unwrap());
        }
        by_prompt.values().filter(|&&s| s >= 3.0).count()
    };
    assert_eq!(best.len(), expected_best);
    for b in &best {
        assert!(b["score"].as_f64().unwrap() >= 3.0);
        let m = b["messages"].as_array().unwrap();
        assert_eq!(
            (m[0]["role"].as_str(), m[1]["role"].as_str()),
            (Some("user"), Some("assistant"))
        );
    }
    let totals = summary(&out);
    assert_eq!(totals["pairs/kept"].as_f64(), Some(pairs.len() as f64));
    assert_eq!(
        totals["pairs/kept"].as_f64().unwrap() + totals["pairs/dropped_ties"].as_f64().unwrap(),
        64.0,
        "best against worst: one candidate per prompt"
    );
    for k in [
        "score/mean",
        "score/p90",
        "margin/mean",
        "len/chosen/mean",
        "len/rejected/mean",
    ] {
        assert!(totals[k].is_number(), "{k} missing from the summary");
    }
    assert_eq!(
        metrics(&out)
            .iter()
            .filter(|r| r["split"] == "train")
            .count(),
        16
    );

    // Killed after a save, then resumed: the same replies, pairs and rows, byte for byte.
    let killed = dir.join("killed");
    let saved = kill_after_saved_step("temper-label", &cfg, &killed, 5);
    assert_ok(&run_stage("temper-label", &cfg, &killed), "resumed label");
    for f in ["replies.jsonl", "pairs.jsonl", "best_of_n.jsonl"] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(killed.join(f)).unwrap(),
            "{f} differs after resuming from batch {saved}"
        );
    }

    // Every pair of replies: oriented by score, above the margin, ties counted.
    let cfg = label_config(dir, &sft, &labeller, "pairs: all\nmin_margin: 1\n");
    let all = dir.join("all");
    assert_ok(&run_stage("temper-label", &cfg, &all), "label, all pairs");
    let s = summary(&all);
    assert_eq!(
        s["pairs/kept"].as_f64().unwrap()
            + s["pairs/dropped_ties"].as_f64().unwrap()
            + s["pairs/dropped_margin"].as_f64().unwrap()
            + s["pairs/dropped_same_text"].as_f64().unwrap(),
        64.0 * 6.0,
        "six pairs of four replies per prompt"
    );
    assert!(rows(&all.join("pairs.jsonl"))
        .iter()
        .all(|p| p["margin"].as_f64().unwrap() > 1.0));
}

#[test]
fn an_all_equal_labeller_gives_no_pairs_and_bad_labeller_input_stops_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (sft, _) = sft_and_reward(dir);
    // Every reply scores the same: every group is a tie; best-of-n keeps each prompt's first.
    let constant = write(&dir.join("one.sh"), "while read -r line; do echo 1; done\n");
    let cfg = label_config(
        dir,
        &sft,
        &format!("[{{kind: command, command: [sh, {}]}}]", constant.display()),
        "",
    );
    let out = dir.join("equal");
    assert_ok(&run_stage("temper-label", &cfg, &out), "constant labeller");
    assert_eq!(
        std::fs::read_to_string(out.join("pairs.jsonl")).unwrap(),
        ""
    );
    let s = summary(&out);
    assert_eq!(s["pairs/kept"].as_f64(), Some(0.0));
    assert_eq!(s["pairs/dropped_ties"].as_f64(), Some(64.0));
    assert_eq!(rows(&out.join("best_of_n.jsonl")).len(), 64);

    // A labeller that answers garbage: exit non-zero, one line naming the command and what it
    // said; the earlier run's files are untouched.
    let before = std::fs::read(out.join("pairs.jsonl")).unwrap();
    let garbage = write(
        &dir.join("bad.sh"),
        "while read -r line; do echo nope; done\n",
    );
    let cfg = label_config(
        dir,
        &sft,
        &format!("[{{kind: command, command: [sh, {}]}}]", garbage.display()),
        "",
    );
    let bad = run_stage("temper-label", &cfg, &dir.join("bad"));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("bad.sh") && last.contains("nope"), "{err}");
    assert!(!dir.join("bad/summary.json").exists());
    assert_eq!(std::fs::read(out.join("pairs.jsonl")).unwrap(), before);

    // Settings refused before anything is read, at their key.
    for (extra, words) in [
        (
            "num_generations: 1\n",
            "field `num_generations`: must be at least 2",
        ),
        ("temperature: 0\n", "field `temperature`"),
        (
            "min_margin: -1\n",
            "field `min_margin`: must be a number ≥ 0",
        ),
    ] {
        let cfg = label_config(dir, &sft, "[{kind: length, min: 1, max: 4}]", extra);
        assert_refused("temper-label", &cfg, &dir.join("refused"), words);
    }
    let cfg = label_config(dir, &sft, "[{kind: exact_match}]", "");
    let out = run_stage("temper-label", &cfg, &dir.join("no-answer"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("row 1") && err.contains("`answer`"),
        "{err}"
    );
}

#[test]
fn the_iterated_feedback_pipeline_runs_end_to_end_and_judges_with_a_held_out_lexicon() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("configs/tiny_feedback.yaml"))
        .unwrap()
        .replace(
            "../tests/fixtures",
            &repo().join("tests/fixtures").to_string_lossy(),
        )
        .replace("workdir: ../runs/tiny_feedback", "workdir: work");
    // The best-of row picks by a labeller the test can recompute from the text alone.
    let mod7 = length_mod_7(dir.path());
    let vader_and_length = "        labeller:\n          - {kind: lexicon, path: ";
    let start = text.find(vader_and_length).expect("best_of's labeller");
    let end = start + text[start..].find("penalty: 0.05}\n").unwrap() + "penalty: 0.05}\n".len();
    let text = format!(
        "{}        labeller: [{{kind: command, command: [python3, {}]}}]\n{}",
        &text[..start],
        mod7.display(),
        &text[end..]
    );
    let file = write(&dir.path().join("feedback.yaml"), &text);
    let file = file.to_str().unwrap();
    let first = run("temper", &["run", file]);
    assert_ok(&first, "tiny_feedback");
    // The run ends by saying what each stage achieved, one line each.
    let said = String::from_utf8_lossy(&first.stdout);
    let summary_at = said.find("What each stage achieved").expect("the summary");
    let summary_lines = &said[summary_at..];
    for want in [
        "  label ",
        "pairs and",
        "  ppo ",
        "KL",
        "best_of_4 vs sft:",
        "temper report",
    ] {
        assert!(summary_lines.contains(want), "{want}: {summary_lines}");
    }
    let again = run("temper", &["summary", file]);
    assert_ok(&again, "temper summary");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        summary_lines.trim_start()
    );
    let work = dir.path().join("work/stages");
    // Round 2 labels the PPO policy's replies, not the SFT model's.
    let r1 = rows(&work.join("label/replies.jsonl"));
    let r2 = rows(&work.join("label_2/replies.jsonl"));
    assert_eq!(r1.len(), r2.len());
    assert_ne!(r1, r2);
    let eval = summary(&work.join("eval"));
    for policy in ["sft", "ppo", "ppo_2", "dpo", "dpo_2", "sft_best"] {
        for k in ["afinn_mean", "vader_mean", "kl", "len"] {
            assert!(eval[format!("{policy}/{k}")].is_number(), "{policy}/{k}");
        }
    }
    // Best of 4: its first draw is the SFT model's own reply (the same model, the same seeds),
    // so per prompt its labeller value (length mod 7) is at least SFT's; its KL is analytic.
    let kl = eval["best_of_4/kl"].as_f64().unwrap();
    assert!((kl - (4f64.ln() - 0.75)).abs() < 1e-12, "{kl}");
    let samples = rows(&work.join("eval/samples.jsonl"));
    assert!(!samples.is_empty());
    let mod7 = |r: &Value, k: &str| r[k].as_str().unwrap().len() % 7;
    let mut better = 0;
    for r in &samples {
        let (best, sft) = (mod7(r, "best_of_4"), mod7(r, "sft"));
        assert!(best >= sft, "{r}");
        better += usize::from(best > sft);
    }
    assert!(better > 0, "best of 4 never beat the single reply");
    let (label, one) = (
        &eval["best_of_4/label_mean"],
        &eval["best_of_4/label_mean_one"],
    );
    assert!(
        label.as_f64().unwrap() > one.as_f64().unwrap(),
        "{label} {one}"
    );
    // The reward model trained on labelled replies is also measured on human pairs.
    let reward = summary(&work.join("reward"));
    let human = reward["human/accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&human), "{human}");
    let report = std::fs::read_to_string(work.join("eval/report.md")).unwrap();
    let vader_row = report
        .lines()
        .find(|l| l.starts_with("| vader_mean |"))
        .unwrap();
    assert_eq!(vader_row.matches('†').count(), 6, "{vader_row}");
    let afinn_row = report
        .lines()
        .find(|l| l.starts_with("| afinn_mean |"))
        .unwrap();
    assert_eq!(afinn_row.matches('†').count(), 0, "{afinn_row}");
    // Nothing changed: every stage is up to date.
    let again = run("temper", &["run", file]);
    assert_ok(&again, "second run");
    let said = String::from_utf8_lossy(&again.stdout);
    assert_eq!(said.matches("up to date").count(), 14, "{said}");
}
