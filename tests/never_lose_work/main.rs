//! Issue 11's promises, each tried the way a user breaks them: a typo after a finished run, a
//! workdir on top of the project, signals and kill -9, a never-run pipeline with a typo at its
//! end, zero cadences, a mismatched tokenizer, a moved project, a dry run, a closed pipe, and
//! values that merely look like paths. Every test uses its own copy of the tiny project.
//!
//! `after_a_run`: what a finished run keeps whatever comes next; `interrupted`: signals, kill -9,
//! a moved project and a closed pipe; `bad_config`: mistakes caught before anything is written.

mod after_a_run;
mod bad_config;
#[path = "../common.rs"]
mod common;
mod interrupted;

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
    wait_for(&progress, "pretrain's first state");
    child
}
