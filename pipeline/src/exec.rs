//! Running a pipeline: select what may run, decide each stage when its parents are done, run
//! stale stages as subprocesses (up to `jobs` at once), record everything in the lock file and
//! a per-run manifest. Stage output goes to `<workdir>/logs/<stage>.log`; the terminal gets one
//! line per event. A failed stage stops its descendants only; Ctrl-C stops every child and
//! leaves each stage's atomic state for the next run to resume.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::json;

use crate::hash::HashCache;
use crate::plan::{output_hashes, resolve, staleness, Decision, Lock, Resolved, StageRecord};
use crate::schema::Pipeline;

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub jobs: usize,
    pub stage: Option<String>,
    pub from: Option<String>,
    pub with_parents: bool,
    pub force: bool,
    pub dry_run: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ancestors(p: &Pipeline, name: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut frontier = vec![name.to_string()];
    while let Some(n) = frontier.pop() {
        if let Some(s) = p.stage(&n) {
            for parent in &s.parents {
                if out.insert(parent.clone()) {
                    frontier.push(parent.clone());
                }
            }
        }
    }
    out
}

/// Short "key=value" text of the main numbers in a stage's summary.json.
pub fn key_metrics(out: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(out.join("summary.json")) else {
        return String::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return String::new();
    };
    const KEYS: [&str; 11] = [
        "loss",
        "ppl",
        "general/ppl",
        "accuracy",
        "margin",
        "reward/mean",
        "kl/mean",
        "win_rate",
        "judge_agreement_ppo",
        "vocab_size",
        "chars_per_token",
    ];
    KEYS.iter()
        .filter_map(|k| {
            v.get(*k).and_then(|x| x.as_f64()).map(|x| {
                format!(
                    "{k} {}",
                    if x.abs() >= 100.0 {
                        format!("{x:.0}")
                    } else {
                        format!("{x:.4}")
                    }
                )
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

struct Running {
    child: Child,
    resolved: Resolved,
    started: Instant,
}

/// Runs the pipeline; Ok(true) when every selected stage ended up up to date.
pub fn run(p: &Pipeline, opts: &RunOptions, interrupted: Arc<AtomicBool>) -> anyhow::Result<bool> {
    for name in opts.stage.iter().chain(&opts.from) {
        if p.stage(name).is_none() {
            bail!("no stage `{name}` in {}", p.file.display());
        }
    }
    std::fs::create_dir_all(&p.workdir)
        .with_context(|| format!("creating {}", p.workdir.display()))?;
    let guard_path = p.workdir.join(".run.lock");
    let guard = File::create(&guard_path)?;
    if guard.try_lock().is_err() {
        bail!(
            "another `temper run` is using {}; wait for it to finish",
            p.workdir.display()
        );
    }

    let mut lock = Lock::load(&p.workdir)?;
    let mut cache: HashCache = std::mem::take(&mut lock.file_hashes);
    let order: Vec<String> = p.topo_order().into_iter().map(|s| s.name.clone()).collect();

    // Forced: run whatever their state. Eligible: may run if stale.
    let forced: BTreeSet<String> = match (&opts.stage, &opts.from) {
        (Some(s), _) => [s.clone()].into(),
        (None, Some(f)) => std::iter::once(f.clone()).chain(p.descendants(f)).collect(),
        (None, None) if opts.force => order.iter().cloned().collect(),
        _ => BTreeSet::new(),
    };
    let eligible: BTreeSet<String> = if opts.stage.is_none() && opts.from.is_none() {
        order.iter().cloned().collect()
    } else if opts.with_parents {
        forced
            .iter()
            .flat_map(|f| ancestors(p, f))
            .chain(forced.iter().cloned())
            .collect()
    } else {
        forced.clone()
    };

    let mut keys = BTreeMap::new();
    let mut resolved = BTreeMap::new();
    for name in &order {
        let st = p.stage(name).expect("ordered names are stages");
        let r = resolve(st, p, &keys, &mut cache)?;
        keys.insert(name.clone(), r.key.clone());
        resolved.insert(name.clone(), r);
    }

    // Parents outside the selection must already be up to date.
    let needed: BTreeSet<String> = eligible
        .iter()
        .flat_map(|e| ancestors(p, e))
        .filter(|a| !eligible.contains(a))
        .collect();
    for a in &needed {
        let (d, why) = staleness(&resolved[a], lock.stages.get(a), p, &lock, &mut cache);
        if d != Decision::Skip {
            bail!("parent stage `{a}` is stale ({why}); run it first, or pass --with-parents");
        }
    }

    if opts.dry_run {
        let mut will_run = BTreeSet::new();
        for name in &order {
            if !eligible.contains(name) {
                println!("{name}: not selected");
                continue;
            }
            let (d, why) = staleness(&resolved[name], lock.stages.get(name), p, &lock, &mut cache);
            let running_parents: Vec<&String> = p
                .stage(name)
                .expect("stage")
                .parents
                .iter()
                .filter(|x| will_run.contains(*x))
                .collect();
            if forced.contains(name) {
                println!("{name}: would run (requested; {why})");
                will_run.insert(name.clone());
            } else if d != Decision::Skip {
                println!("{name}: would run ({why})");
                will_run.insert(name.clone());
            } else if !running_parents.is_empty() {
                println!(
                    "{name}: waits for {}; reruns if its outputs change",
                    running_parents
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                will_run.insert(name.clone());
            } else {
                println!("{name}: {why}");
            }
        }
        lock.file_hashes = cache;
        lock.save(&p.workdir)?;
        return Ok(true);
    }

    let logs = p.workdir.join("logs");
    let configs = p.workdir.join("configs");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&configs)?;
    let run_started = now();
    let mut manifest = Vec::new();
    let mut done: BTreeMap<String, bool> = BTreeMap::new(); // name → succeeded (or skipped)
    let mut running: Vec<Running> = Vec::new();
    let jobs = opts.jobs.max(1);
    let mut all_ok = true;

    loop {
        if interrupted.load(Ordering::SeqCst) {
            for r in &mut running {
                let _ = r.child.kill();
                let _ = r.child.wait();
                println!(
                    "✗ {} interrupted; its state/ is kept, the next run resumes it",
                    r.resolved.name
                );
                manifest.push(json!({"stage": r.resolved.name, "key": r.resolved.key, "decision": "interrupted"}));
            }
            running.clear();
            all_ok = false;
            break;
        }
        // Launch or settle every stage whose parents are settled.
        let mut progressed = false;
        for name in &order {
            if done.contains_key(name) || running.iter().any(|r| &r.resolved.name == name) {
                continue;
            }
            let parents = &p.stage(name).expect("stage").parents;
            if !parents.iter().all(|x| done.contains_key(x)) {
                continue;
            }
            if let Some(failed) = parents.iter().find(|x| done.get(*x) == Some(&false)) {
                println!("- {name}: skipped, parent {failed} did not finish");
                manifest.push(json!({"stage": name, "decision": "blocked", "reason": format!("parent {failed} did not finish")}));
                done.insert(name.clone(), false);
                progressed = true;
                continue;
            }
            let r = resolved[name].clone();
            let (mut d, mut why) = staleness(&r, lock.stages.get(name), p, &lock, &mut cache);
            if !eligible.contains(name) {
                // Outside the selection: leave it as it is.
                done.insert(name.clone(), true);
                progressed = true;
                continue;
            }
            if forced.contains(name) {
                why = format!("requested; {why}");
                if d == Decision::Skip {
                    d = Decision::Fresh;
                }
            }
            if d == Decision::Skip {
                println!("✓ {name}: up to date");
                manifest
                    .push(json!({"stage": name, "key": r.key, "decision": "skip", "reason": why}));
                done.insert(name.clone(), true);
                progressed = true;
                continue;
            }
            if running.len() >= jobs {
                continue;
            }
            let out = p.stage_out(name);
            if d == Decision::Fresh && out.exists() {
                std::fs::remove_dir_all(&out)
                    .with_context(|| format!("clearing {}", out.display()))?;
            }
            std::fs::create_dir_all(&out)?;
            let config_path = configs.join(format!("{name}.yaml"));
            std::fs::write(&config_path, serde_yaml::to_string(&r.config)?)?;
            let log_path = logs.join(format!("{name}.log"));
            let log = File::options().create(true).append(true).open(&log_path)?;
            let child = Command::new(&r.binary)
                .arg("--config")
                .arg(&config_path)
                .arg("--out")
                .arg(&out)
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", r.binary.display()))?;
            println!("▶ {name}: running ({why}); log: {}", log_path.display());
            let parent_outputs = parents
                .iter()
                .filter_map(|x| {
                    lock.stages
                        .get(x)
                        .map(|rec| (x.clone(), rec.outputs_hash()))
                })
                .collect();
            lock.stages.insert(
                name.clone(),
                StageRecord {
                    key: r.key.clone(),
                    kind: r.kind.clone(),
                    binary: r.binary_hash.clone(),
                    params: r.params.clone(),
                    inputs: r.inputs.clone(),
                    parents: r.parents.clone(),
                    parent_outputs,
                    outputs: BTreeMap::new(),
                    status: "running".into(),
                    started: now(),
                    finished: None,
                    duration_s: None,
                    exit_code: None,
                },
            );
            lock.file_hashes = cache.clone();
            lock.save(&p.workdir)?;
            running.push(Running {
                child,
                resolved: r,
                started: Instant::now(),
            });
            progressed = true;
        }

        // Reap finished children.
        let mut i = 0;
        while i < running.len() {
            let Some(status) = running[i].child.try_wait()? else {
                i += 1;
                continue;
            };
            let r = running.remove(i);
            let name = r.resolved.name.clone();
            let secs = r.started.elapsed().as_secs_f64();
            let out = p.stage_out(&name);
            let rec = lock.stages.get_mut(&name).expect("recorded at launch");
            rec.finished = Some(now());
            rec.duration_s = Some(secs);
            rec.exit_code = status.code();
            if status.success() {
                rec.outputs = output_hashes(&out, &mut cache)?;
                rec.status = "ok".into();
                println!("✓ {name}: done in {secs:.1}s {}", key_metrics(&out));
                done.insert(name.clone(), true);
            } else {
                rec.status = "failed".into();
                let log =
                    std::fs::read_to_string(p.workdir.join("logs").join(format!("{name}.log")))
                        .unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .to_string();
                println!(
                    "✗ {name}: failed ({}) after {secs:.1}s: {last}",
                    status
                        .code()
                        .map_or("killed".into(), |c| format!("exit {c}"))
                );
                done.insert(name.clone(), false);
                all_ok = false;
            }
            manifest.push(json!({
                "stage": name, "key": r.resolved.key, "decision": "ran", "exit_code": status.code(),
                "duration_s": secs, "binary": r.resolved.binary, "binary_hash": r.resolved.binary_hash,
                "inputs": r.resolved.inputs, "parents": r.resolved.parents,
            }));
            lock.file_hashes = cache.clone();
            lock.save(&p.workdir)?;
            progressed = true;
        }

        if done.len() == order.len() {
            break;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    lock.file_hashes = cache;
    lock.save(&p.workdir)?;
    let manifests = p.workdir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let record = json!({
        "format": 1, "pipeline": p.name, "file": p.file, "started": run_started, "finished": now(),
        "temper_version": env!("CARGO_PKG_VERSION"), "ok": all_ok, "stages": manifest,
    });
    std::fs::write(
        manifests.join(format!("{run_started}-{}.json", std::process::id())),
        serde_json::to_vec_pretty(&record)?,
    )?;
    Ok(all_ok)
}
