//! `temper run`: select what may run, plan each stage, check every stage that may run with its
//! own parser, then launch stale stages as subprocesses (up to `jobs` at once) and reap them,
//! recording everything in the lock file and a per-run manifest.
//!
//! A stage runs in `stages/.<name>.next/` and is swapped into `stages/<name>/` only when it
//! succeeds, so a failed or interrupted run destroys nothing. A failed stage stops its
//! descendants only. SIGINT, SIGTERM and SIGHUP are passed to the running stages (which save
//! their state and stop); a second signal kills them; kill -9 of `temper run` reaches them too
//! (PR_SET_PDEATHSIG).

pub mod folders;
pub mod launch;
pub mod lock;
pub mod slurm;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::json;
use temper_stage::signals;

use crate::plan::hash::HashCache;
use crate::plan::resolve::{ancestors, configs_dir, resolve_all, Resolved};
use crate::plan::validate::validate_stages;
use crate::plan::{decide, output_hashes, Decision};
use crate::run::folders::{check_foreign, claim_workdir, recover, remove_stage_folder, swap_in};
use crate::run::launch::{Ranks, StageCommand};
use crate::run::lock::{Lock, RunRecord, RunStatus};
use crate::spec::Pipeline;

mod stage_process;
use stage_process::{launch, reap, stop_all};

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub jobs: usize,
    pub stage: Option<String>,
    pub from: Option<String>,
    /// Only this stage, if it is stale.
    pub only: Option<String>,
    pub with_parents: bool,
    pub force: bool,
    /// Start selected stages over even where an unfinished attempt could be resumed.
    pub fresh: bool,
    pub dry_run: bool,
}

/// How `temper run` ended, as its exit code.
pub const EXIT_OK: i32 = 0;
pub const EXIT_STAGE_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
/// A gate stopped a stage (and its descendants); nothing failed.
pub const EXIT_GATED: i32 = 4;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which stages the options force to run, and which may run if stale.
struct Selection {
    forced: BTreeSet<String>,
    eligible: BTreeSet<String>,
}

fn select(p: &Pipeline, opts: &RunOptions, order: &[String]) -> Selection {
    let forced: BTreeSet<String> = match (&opts.stage, &opts.from) {
        (Some(s), _) => p.named(s).into_iter().collect(),
        (None, Some(f)) => p
            .named(f)
            .into_iter()
            .flat_map(|n| std::iter::once(n.clone()).chain(p.descendants(&n)))
            .collect(),
        (None, None) if opts.force => order.iter().cloned().collect(),
        _ => BTreeSet::new(),
    };
    let chosen: BTreeSet<String> = match &opts.only {
        Some(only) => p.named(only).into_iter().collect(),
        None if opts.stage.is_none() && opts.from.is_none() => order.iter().cloned().collect(),
        None => forced.clone(),
    };
    // --with-parents adds every stage upstream of the chosen ones; each runs only if stale.
    let eligible = if opts.with_parents {
        chosen
            .iter()
            .flat_map(|c| ancestors(p, c))
            .chain(chosen.iter().cloned())
            .collect()
    } else {
        chosen
    };
    Selection { forced, eligible }
}

/// The decision for a stage under the options: a forced stage runs even when up to date, and
/// `--fresh` never resumes.
fn decision(
    r: &Resolved,
    p: &Pipeline,
    lock: &Lock,
    sel: &Selection,
    opts: &RunOptions,
    cache: &mut HashCache,
) -> (Decision, String) {
    let (mut d, mut why) = decide(r, p, lock, cache);
    if sel.forced.contains(&r.name) {
        why = format!("requested; {why}");
        if d == Decision::Skip || (opts.fresh && d == Decision::Resume) {
            d = Decision::Fresh;
        }
    }
    (d, why)
}

/// The plan printed by `--dry-run`, and the stages that may run (for validation). Stages whose
/// parents will run wait for them and rerun only if their outputs change.
fn plan(
    p: &Pipeline,
    resolved: &BTreeMap<String, Resolved>,
    lock: &Lock,
    sel: &Selection,
    opts: &RunOptions,
    cache: &mut HashCache,
) -> (Vec<String>, Vec<String>) {
    let (mut lines, mut may_run) = (Vec::new(), Vec::new());
    for st in p.topo_order() {
        let name = &st.name;
        if !sel.eligible.contains(name) {
            lines.push(format!("{name}: not selected"));
            continue;
        }
        let (d, why) = decision(&resolved[name], p, lock, sel, opts, cache);
        let waits: Vec<&str> = st
            .parents
            .iter()
            .filter(|x| may_run.contains(*x))
            .map(String::as_str)
            .collect();
        if d != Decision::Skip {
            lines.push(format!("{name}: would run ({why})"));
            may_run.push(name.clone());
        } else if !waits.is_empty() {
            lines.push(format!(
                "{name}: waits for {}; reruns if their outputs change",
                waits.join(", ")
            ));
            may_run.push(name.clone());
        } else {
            lines.push(format!("{name}: {why}"));
        }
    }
    (lines, may_run)
}

struct Running {
    ranks: Ranks,
    name: String,
    started: Instant,
}

/// Everything checked before anything is written: parents outside the selection are up to
/// date, no folder of someone else's is in the way, and every stage that may run passes its
/// own `--validate`. Some(exit code) when the run ends here (a dry run, or problems).
fn preflight(
    p: &Pipeline,
    opts: &RunOptions,
    resolved: &BTreeMap<String, Resolved>,
    lock: &Lock,
    sel: &Selection,
    cache: &mut HashCache,
) -> anyhow::Result<Option<i32>> {
    for a in sel.eligible.iter().flat_map(|e| ancestors(p, e)) {
        if !sel.eligible.contains(&a) {
            let (d, why) = decide(&resolved[&a], p, lock, cache);
            if d != Decision::Skip {
                bail!("parent stage `{a}` is stale ({why}); run it first, or pass --with-parents");
            }
        }
    }
    let (lines, may_run) = plan(p, resolved, lock, sel, opts, cache);
    if opts.dry_run {
        lines.iter().for_each(|l| println!("{l}"));
        return Ok(Some(EXIT_OK));
    }
    for name in &may_run {
        check_foreign(p, name)?;
    }
    let rebuilt: BTreeSet<String> = may_run.iter().cloned().collect();
    let problems = validate_stages(p, resolved, &may_run, &rebuilt)?.problems;
    if problems.is_empty() {
        return Ok(None);
    }
    eprintln!(
        "temper: error: {} problem(s) found before running anything:",
        problems.len()
    );
    for pr in &problems {
        eprintln!("  {pr}");
    }
    Ok(Some(EXIT_INVALID))
}

/// Runs the pipeline; returns the exit code.
pub fn run(p: &Pipeline, opts: &RunOptions) -> anyhow::Result<i32> {
    for name in opts.stage.iter().chain(&opts.from).chain(&opts.only) {
        if p.named(name).is_empty() {
            bail!("no stage `{name}` in {}", p.file.display());
        }
    }
    let mut lock = Lock::load(&p.workdir)?;
    let mut cache = std::mem::take(&mut lock.file_hashes);
    let order: Vec<String> = p.topo_order().into_iter().map(|s| s.name.clone()).collect();
    let resolved = resolve_all(p, &mut cache)?;
    let sel = select(p, opts, &order);
    if let Some(code) = preflight(p, opts, &resolved, &lock, &sel, &mut cache)? {
        return Ok(code);
    }
    for name in &sel.eligible {
        if let Some(why) = p.stage(name).and_then(|s| s.resources.unrunnable_here()) {
            bail!("stage `{name}`: {why}");
        }
    }
    std::fs::create_dir_all(&p.workdir)
        .with_context(|| format!("creating {}", p.workdir.display()))?;
    claim_workdir(p)?;
    let guard = File::create(p.workdir.join(".run.lock"))?;
    if guard.try_lock().is_err() {
        bail!(
            "another `temper run` is using {}; wait for it to finish",
            p.workdir.display()
        );
    }
    recover(p, &mut lock, &mut cache)?;
    for dir in ["logs", "configs", "stages", "manifests"] {
        std::fs::create_dir_all(p.workdir.join(dir))?;
    }
    let mut ex = Executor {
        p,
        opts,
        sel,
        resolved,
        order,
        lock,
        cache,
        manifest: Vec::new(),
        settled: BTreeMap::new(),
        running: Vec::new(),
        gated: Vec::new(),
    };
    let started = now();
    let interrupted = ex.execute()?;
    let Executor {
        mut lock,
        cache,
        manifest,
        settled,
        gated,
        ..
    } = ex;
    lock.file_hashes = cache;
    lock.save(&p.workdir)?;
    let all_ok = !interrupted && settled.values().all(|&ok| ok);
    write_manifest(p, started, all_ok, manifest)?;
    drop(guard);
    // Stages that did not finish because of a gate (the gated ones and their descendants).
    let stopped_by_gates: BTreeSet<String> = gated
        .iter()
        .flat_map(|g| std::iter::once(g.clone()).chain(p.descendants(g)))
        .collect();
    let failed = settled
        .iter()
        .any(|(name, ok)| !ok && !stopped_by_gates.contains(name));
    Ok(if interrupted {
        temper_stage::EXIT_INTERRUPTED
    } else if all_ok {
        EXIT_OK
    } else if failed {
        EXIT_STAGE_FAILED
    } else {
        EXIT_GATED
    })
}

/// The state of one `temper run` while stages launch and finish.
struct Executor<'a> {
    p: &'a Pipeline,
    opts: &'a RunOptions,
    sel: Selection,
    resolved: BTreeMap<String, Resolved>,
    order: Vec<String>,
    lock: Lock,
    cache: HashCache,
    manifest: Vec<serde_json::Value>,
    /// Stage → whether it succeeded (or was up to date).
    settled: BTreeMap<String, bool>,
    running: Vec<Running>,
    /// Stages a gate stopped.
    gated: Vec<String>,
}

impl Executor<'_> {
    /// Launches and reaps until every stage is settled; true when a signal stopped the run.
    fn execute(&mut self) -> anyhow::Result<bool> {
        loop {
            if signals::stop_requested() {
                stop_all(
                    &mut self.running,
                    &mut self.lock,
                    self.p,
                    &mut self.manifest,
                )?;
                return Ok(true);
            }
            let launched = self.launch_ready()?;
            let reaped = self.reap_finished()?;
            if self.settled.len() == self.order.len() {
                return Ok(false);
            }
            if !launched && !reaped {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Settles or launches every stage whose parents are settled; true if anything changed.
    fn launch_ready(&mut self) -> anyhow::Result<bool> {
        let mut progressed = false;
        for name in self.order.clone() {
            if self.settled.contains_key(&name) || self.running.iter().any(|r| r.name == name) {
                continue;
            }
            let parents = &self.p.stage(&name).expect("stage").parents;
            if !parents.iter().all(|x| self.settled.contains_key(x)) {
                continue;
            }
            if let Some(failed) = parents
                .iter()
                .find(|x| self.settled.get(*x) == Some(&false))
            {
                let why = if self.gated.contains(failed) {
                    format!("parent {failed} was gated")
                } else {
                    format!("parent {failed} did not finish")
                };
                println!("- {name}: skipped, {why}");
                self.manifest
                    .push(json!({"stage": name, "decision": "blocked", "reason": why}));
                self.settled.insert(name, false);
                progressed = true;
                continue;
            }
            if !self.sel.eligible.contains(&name) {
                self.settled.insert(name, true); // outside the selection: left as it is
                progressed = true;
                continue;
            }
            let r = &self.resolved[&name];
            let (d, why) = decision(r, self.p, &self.lock, &self.sel, self.opts, &mut self.cache);
            if d == Decision::Skip {
                println!("✓ {name}: up to date");
                self.manifest
                    .push(json!({"stage": name, "key": r.key, "decision": "skip", "reason": why}));
                self.settled.insert(name, true);
                progressed = true;
                continue;
            }
            if self.running.len() >= self.opts.jobs.max(1) {
                continue;
            }
            if let Some(failed) = self.gate_failure(&name) {
                println!("⊘ {name}: gated: {failed}");
                self.manifest
                    .push(json!({"stage": name, "decision": "gated", "reason": failed}));
                self.lock.entry(&name).gated = Some(failed);
                self.gated.push(name.clone());
                self.settled.insert(name, false);
                progressed = true;
                continue;
            }
            self.lock.entry(&name).gated = None;
            self.running
                .push(launch(self.p, r, d, &why, &mut self.lock)?);
            self.lock.file_hashes = self.cache.clone();
            self.lock.save(&self.p.workdir)?;
            progressed = true;
        }
        Ok(progressed)
    }

    /// The first of the stage's gates that fails on its parent's summary, if any.
    fn gate_failure(&self, name: &str) -> Option<String> {
        let st = self.p.stage(name).expect("stage");
        st.gates.iter().find_map(|g| {
            let summary = std::fs::read_to_string(self.p.stage_out(&g.stage).join("summary.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            g.check(summary.as_ref()).err()
        })
    }

    /// Records every stage that has exited; true if any had.
    fn reap_finished(&mut self) -> anyhow::Result<bool> {
        let mut reaped = false;
        let mut i = 0;
        while i < self.running.len() {
            let Some(status) = self.running[i].ranks.try_wait()? else {
                i += 1;
                continue;
            };
            let r = self.running.remove(i);
            let resolved = &self.resolved[&r.name];
            let ok = reap(
                self.p,
                &r,
                status,
                &mut self.lock,
                &mut self.cache,
                &mut self.manifest,
                resolved,
            )?;
            self.settled.insert(r.name.clone(), ok);
            self.lock.file_hashes = self.cache.clone();
            self.lock.save(&self.p.workdir)?;
            reaped = true;
        }
        Ok(reaped)
    }
}

fn write_manifest(
    p: &Pipeline,
    started: u64,
    ok: bool,
    stages: Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    let record = json!({
        "format": 2, "pipeline": p.name, "file": p.file, "started": started, "finished": now(),
        "temper_version": env!("CARGO_PKG_VERSION"), "ok": ok, "stages": stages,
    });
    temper_stage::atomic::write_json(
        &p.workdir
            .join("manifests")
            .join(format!("{started}-{}.json", std::process::id())),
        &record,
    )
}
