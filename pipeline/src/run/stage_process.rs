//! A stage as a subprocess: started in its attempt folder with the lock updated (`launch`),
//! reaped into its final folder or left to resume (`reap`), and stopped with the run
//! (`stop_all`).

use super::*;

/// Starts a stage in its attempt folder (a fresh one, or the one it resumes) and records the
/// attempt in the lock.
pub(super) fn launch(
    p: &Pipeline,
    r: &Resolved,
    d: Decision,
    why: &str,
    lock: &mut Lock,
) -> anyhow::Result<Running> {
    let name = &r.name;
    let folder = p.stage_attempt(name);
    if d == Decision::Fresh {
        remove_stage_folder(&folder)?;
    }
    let config_path = configs_dir(p).join(format!("{name}.yaml"));
    temper_stage::atomic::write_atomic(&config_path, serde_yaml::to_string(&r.config)?.as_bytes())?;
    let log_path = p.workdir.join("logs").join(format!("{name}.log"));
    let resources = &p.stage(name).expect("stage").resources;
    let world = resources.world();
    let mut log = File::options().create(true).append(true).open(&log_path)?;
    writeln!(
        log,
        "=== {}: temper run: {name} ({why}) in {}{}",
        temper_stage::clock::utc(now()),
        folder.display(),
        if world > 1 {
            format!(", {world} ranks")
        } else {
            String::new()
        }
    )?;
    let command = StageCommand {
        binary: &r.binary,
        args: vec![
            "--config".into(),
            config_path.into(),
            "--out".into(),
            folder.clone().into(),
        ],
        env: vec![
            ("TEMPER_PIPELINE", p.file.clone().into()),
            ("TEMPER_STAGE", name.into()),
        ],
        log: &log_path,
    };
    let ranks = Ranks::spawn(&command, resources)?;
    let on = if world > 1 {
        format!(" on {world} ranks (rank k>0 logs to {name}.rank<k>.log)")
    } else {
        String::new()
    };
    println!("▶ {name}: running ({why}){on}; log: {}", log_path.display());
    let parent_outputs = r
        .parents
        .keys()
        .filter_map(|x| lock.done(x).map(|rec| (x.clone(), rec.outputs_hash())))
        .collect();
    lock.entry(name).attempt = Some(RunRecord {
        key: r.key.clone(),
        kind: r.kind.name().into(),
        binary: r.binary_hash.clone(),
        params: r.params.clone(),
        inputs: r.inputs.clone(),
        parents: r.parents.clone(),
        parent_outputs,
        outputs: BTreeMap::new(),
        status: RunStatus::Running,
        reason: why.into(),
        started: now(),
        finished: None,
        duration_s: None,
        exit_code: None,
    });
    Ok(Running {
        ranks,
        name: name.clone(),
        started: Instant::now(),
    })
}

/// Records how a stage ended; a success is recorded, then swapped into place. Returns whether
/// it succeeded.
pub(super) fn reap(
    p: &Pipeline,
    r: &Running,
    status: std::process::ExitStatus,
    lock: &mut Lock,
    cache: &mut HashCache,
    manifest: &mut Vec<serde_json::Value>,
    resolved: &Resolved,
) -> anyhow::Result<bool> {
    let name = &r.name;
    let secs = r.started.elapsed().as_secs_f64();
    let entry = lock.entry(name);
    let mut rec = entry.attempt.take().expect("recorded at launch");
    rec.finished = Some(now());
    rec.duration_s = Some(secs);
    rec.exit_code = status.code();
    let ok = status.success();
    if ok {
        rec.outputs = output_hashes(&p.stage_attempt(name), cache)?;
        rec.status = RunStatus::Ok;
        entry.done = Some(rec);
        // Recorded before the swap: a kill in between is finished by `recover`.
        lock.save(&p.workdir)?;
        swap_in(p, name, cache)?;
        println!(
            "✓ {name}: done in {secs:.1}s {}",
            crate::views::status::key_metrics(&p.stage_out(name))
        );
    } else {
        rec.status = if status.code() == Some(temper_stage::EXIT_INTERRUPTED) {
            RunStatus::Interrupted
        } else {
            RunStatus::Failed
        };
        entry.attempt = Some(rec);
        let log = std::fs::read_to_string(p.workdir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        let how = status
            .code()
            .map_or("killed".into(), |c| format!("exit {c}"));
        println!("✗ {name}: failed ({how}) after {secs:.1}s: {last}");
        if let Some(d) = &lock.done(name) {
            println!(
                "  its previous outputs (key {}) are kept in {}",
                &d.key[..8],
                p.stage_out(name).display()
            );
        }
    }
    // Parameters and final numbers too, so `temper diff` can compare with this run later.
    let summary = ok
        .then(|| std::fs::read_to_string(p.stage_out(name).join("summary.json")).ok())
        .flatten()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    manifest.push(json!({
        "stage": name, "key": resolved.key, "decision": "ran", "exit_code": status.code(),
        "duration_s": secs, "binary": resolved.binary, "binary_hash": resolved.binary_hash,
        "inputs": resolved.inputs, "parents": resolved.parents, "params": resolved.params,
        "summary": summary,
    }));
    Ok(ok)
}

/// Asks every running stage to stop (SIGTERM to its process group: it saves its state and
/// exits), waits up to TEMPER_STOP_GRACE_S seconds (default 30), then kills what is left.
pub(super) fn stop_all(
    running: &mut Vec<Running>,
    lock: &mut Lock,
    p: &Pipeline,
    manifest: &mut Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    for r in running.iter() {
        signals::signal_group(r.ranks.pgid, libc::SIGTERM);
    }
    let deadline = Instant::now() + crate::run::launch::grace();
    while Instant::now() < deadline && running.iter_mut().any(|r| !r.ranks.exited()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for mut r in running.drain(..) {
        r.ranks.kill();
        if let Some(a) = lock.entry(&r.name).attempt.as_mut() {
            a.status = RunStatus::Interrupted;
            a.finished = Some(now());
        }
        println!(
            "✗ {} interrupted; its state/ is kept in {}, and the next run resumes it",
            r.name,
            p.stage_attempt(&r.name).display()
        );
        manifest.push(json!({"stage": r.name, "decision": "interrupted"}));
    }
    Ok(())
}
