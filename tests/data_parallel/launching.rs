//! The orchestrator launches the ranks (itself or through torchrun) and exports Slurm jobs.

use std::path::Path;

use crate::common::*;
use crate::{assert_weights_agree, max_weight_diff};

/// A one-stage pipeline: data-parallel pretraining with `resources`, in `dir/<name>/`.
fn dp_pipeline(dir: &Path, name: &str, resources: &str, steps: u64) -> std::path::PathBuf {
    let tok = tokenizer(dir);
    write(
        &dir.join(format!("{name}.yaml")),
        &format!(
            "name: dp\nworkdir: {name}\nstages:\n  lm:\n    uses: pretrain\n    resources: {resources}\n    with:\n      tokenizer: {}\n      data: [{}]\n      model: {{arch: gpt2, n_layer: 2, n_head: 2, d_model: 64, max_position: 64}}\n      block_size: 64\n      steps: {steps}\n      batch_size: 16\n      optim: {{lr: 3.0e-3, warmup_steps: 10}}\n      eval_every: 20\n      save_every: 5\n      log_every: 5\n      cache_dir: {}\n",
            tok.display(),
            tiny("corpus.txt").display(),
            dir.join("cache").display()
        ),
    )
}

fn temper_run(file: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("temper"));
    cmd.args(["run", file.to_str().unwrap()])
        .env("TEMPER_TORCHRUN", repo().join(".venv/bin/torchrun"))
        .env("TEMPER_DIST_TIMEOUT", "60");
    cmd
}

#[test]
fn temper_run_launches_the_ranks_itself_or_through_torchrun_and_a_signal_stops_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let lm = |name: &str| dir.path().join(name).join("stages/lm");

    let file = dp_pipeline(dir.path(), "own", "{nproc: 2}", 30);
    let out = temper_run(&file).output().unwrap();
    assert_ok(&out, "temper run with nproc: 2");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("on 2 ranks"), "{said}");
    let rank1 = std::fs::read_to_string(dir.path().join("own/logs/lm.rank1.log")).unwrap();
    assert!(rank1.contains("rank 1 of 2"), "{rank1}");

    let file = dp_pipeline(dir.path(), "torchrun", "{nproc: 2, launcher: torchrun}", 30);
    assert_ok(&temper_run(&file).output().unwrap(), "launcher: torchrun");
    assert_weights_agree(
        &lm("own"),
        &lm("torchrun"),
        "checkpoint/model.safetensors",
        "temper's ranks and torchrun's",
    );

    // SIGTERM to `temper run` mid-stage: both ranks stop, and the rerun resumes to the
    // uninterrupted run's weights.
    let file = dp_pipeline(dir.path(), "stopped", "{nproc: 2}", 30);
    let mut child = temper_run(&file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let attempt = dir.path().join("stopped/stages/.lm.next");
    let start = std::time::Instant::now();
    while saved_step(&attempt).is_none_or(|s| s < 5) {
        assert!(start.elapsed().as_secs() < 300, "no state written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(130), "interrupted");
    wait_until_gone(&attempt.to_string_lossy());
    let stopped_at = saved_step(&attempt).unwrap();
    let out = temper_run(&file).output().unwrap();
    assert_ok(&out, "resumed");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("resuming"), "{said}");
    let d = max_weight_diff(&lm("own"), &lm("stopped"));
    assert!(
        d < 1e-6,
        "stopped at step {stopped_at} and resumed: differs by {d:e}"
    );

    // A stage without data parallelism asking for ranks is refused before anything runs.
    let bad = write(
        &dir.path().join("bad.yaml"),
        "name: bad\nworkdir: badwork\nstages:\n  e:\n    uses: eval\n    resources: {nproc: 2}\n    with: {}\n",
    );
    let out = std::process::Command::new(bin("temper"))
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("temper-eval does not train data-parallel"),
        "{err}"
    );
}

#[test]
fn temper_export_slurm_writes_a_chain_of_jobs_that_run_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let file = write(
        &dir.path().join("p.yaml"),
        &format!(
            "name: chain\nworkdir: work\nstages:\n  lm:\n    uses: pretrain\n    with:\n      tokenizer: {}\n      data: [{}]\n      model: {{arch: gpt2, n_layer: 1, n_head: 2, d_model: 32, max_position: 32}}\n      block_size: 32\n      steps: 3\n      batch_size: 4\n      cache_dir: {}\n  sft:\n    uses: sft\n    resources: {{nproc: 2, nnodes: 2}}\n    matrix: {{seed: [1, 2]}}\n    with: {{init: \"${{lm.checkpoint}}\", data: {}, steps: 2, batch_size: 4}}\n",
            tok.display(),
            tiny("corpus.txt").display(),
            dir.path().join("cache").display(),
            tiny("sft.jsonl").display()
        ),
    );
    let slurm = dir.path().join("slurm");
    let out = std::process::Command::new(bin("temper"))
        .args(["export", "slurm", file.to_str().unwrap(), "--out"])
        .arg(&slurm)
        .arg("--sbatch=--partition=gpu")
        .output()
        .unwrap();
    assert_ok(&out, "temper export slurm");
    let names: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&slurm)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names,
        [
            "1-lm.sbatch",
            "2-sft-seed-1.sbatch",
            "3-sft-seed-2.sbatch",
            "submit.sh"
        ]
    );
    for n in &names {
        let check = std::process::Command::new("bash")
            .arg("-n")
            .arg(slurm.join(n))
            .output()
            .unwrap();
        assert_ok(&check, &format!("bash -n {n}"));
    }
    let sft = std::fs::read_to_string(slurm.join("2-sft-seed-1.sbatch")).unwrap();
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --partition=gpu",
        "export MASTER_ADDR",
        "--only 'sft@seed=1'",
    ] {
        assert!(sft.contains(line), "{line} missing from:\n{sft}");
    }

    // Slurm is not installed here, so the chain is checked with a stand-in for `sbatch` that
    // records its arguments and runs the one-rank job at once, in a batch environment that
    // speaks of 4 tasks (which the one-process stage must not inherit); the two-node SFT jobs
    // are only checked above (they need srun).
    let calls = dir.path().join("calls");
    let fake = dir.path().join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    write(
        &fake.join("sbatch"),
        &format!(
            "#!/usr/bin/env bash\necho \"$*\" >> {calls}\nn=$(wc -l < {calls})\ncase \"${{@: -1}}\" in *lm.sbatch) SLURM_NTASKS=4 SLURM_PROCID=0 bash \"${{@: -1}}\" > {log} 2>&1 || exit 1;; esac\necho \"$((100 + n));cluster\"\n",
            calls = calls.display(),
            log = dir.path().join("job.log").display()
        ),
    );
    let status = std::process::Command::new("chmod")
        .args(["+x"])
        .arg(fake.join("sbatch"))
        .status()
        .unwrap();
    assert!(status.success());
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let out = std::process::Command::new("bash")
        .arg(slurm.join("submit.sh"))
        .env("PATH", path)
        .output()
        .unwrap();
    let job_log = std::fs::read_to_string(dir.path().join("job.log")).unwrap_or_default();
    assert_ok(
        &out,
        &format!("submit.sh (the first job printed: {job_log})"),
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 3, "{calls}");
    assert!(lines[0].starts_with("--parsable 1-lm.sbatch"), "{calls}");
    assert!(
        lines[1].contains("--dependency=afterok:101 2-sft"),
        "{calls}"
    );
    assert!(
        lines[2].contains("--dependency=afterok:102 3-sft"),
        "{calls}"
    );
    assert!(
        dir.path()
            .join("work/stages/lm/checkpoint/model.safetensors")
            .exists(),
        "the first job ran the stage: {job_log}"
    );
}
