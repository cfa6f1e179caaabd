//! Runs that stop midway — SIGTERM, kill -9, a project moved between runs, a reader that
//! closes the pipe — leave nothing running and resume where they were.

use super::*;

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
