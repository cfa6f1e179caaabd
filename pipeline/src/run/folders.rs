//! The work folder's layout and the orchestrator's side of "temper only deletes what temper
//! made": the workdir marker, foreign-folder checks before anything runs, the swap of a
//! succeeded attempt into place, and the recovery of a swap or run cut short by a kill.
//!
//! ```text
//! <workdir>/.temper-workdir        marker: this folder is temper's, for pipeline NAME
//! <workdir>/temper.lock            what ran (lock.rs)
//! <workdir>/stages/<name>/         the last successful outputs of each stage
//! <workdir>/stages/.<name>.next/   a run that has not succeeded yet
//! <workdir>/configs/<name>.yaml    the config each stage binary reads
//! <workdir>/logs/<name>.log        every attempt's output, appended
//! <workdir>/manifests/             one record per `temper run`
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use temper_stage::atomic::{recover_dir, replace_dir};
use temper_stage::folder::{holder, is_stage_folder};

use crate::plan::hash::HashCache;
use crate::plan::output_hashes;
use crate::run::lock::{Lock, RunStatus};
use crate::spec::Pipeline;

const WORKDIR_MARKER: &str = ".temper-workdir";
const WORKDIR_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct WorkdirMarker {
    format: u32,
    pipeline: String,
}

/// Makes sure the workdir is temper's (creating and marking it if new or empty); a folder of
/// other files, or another pipeline's workdir, is refused.
pub fn claim_workdir(p: &Pipeline) -> anyhow::Result<()> {
    let w = &p.workdir;
    let marker = w.join(WORKDIR_MARKER);
    if marker.exists() {
        let m: WorkdirMarker = serde_json::from_slice(&std::fs::read(&marker)?).map_err(|e| {
            anyhow::anyhow!(
                "{}: unreadable ({e}); is this a temper workdir?",
                marker.display()
            )
        })?;
        anyhow::ensure!(
            m.format == WORKDIR_FORMAT,
            "{}: workdir format {} (this temper reads {WORKDIR_FORMAT}); use the temper that made it, or another workdir",
            w.display(),
            m.format
        );
        anyhow::ensure!(
            m.pipeline == p.name,
            "workdir {} belongs to pipeline `{}`, not `{}`; give this pipeline a workdir of its own",
            w.display(),
            m.pipeline,
            p.name
        );
        return Ok(());
    }
    let empty = std::fs::read_dir(w)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    anyhow::ensure!(
        empty,
        "workdir {} holds files temper did not write (no {WORKDIR_MARKER}); temper writes and replaces folders inside its workdir, so give it a new or empty folder",
        w.display()
    );
    temper_stage::atomic::write_json(
        &marker,
        &WorkdirMarker {
            format: WORKDIR_FORMAT,
            pipeline: p.name.clone(),
        },
    )
}

/// Refuses to run a stage whose folders hold files temper did not make.
pub fn check_foreign(p: &Pipeline, name: &str) -> anyhow::Result<()> {
    for dir in [p.stage_out(name), p.stage_attempt(name)] {
        anyhow::ensure!(
            !dir.exists() || is_stage_folder(&dir),
            "{} exists but temper did not make it (no .temper-stage marker): temper never replaces or deletes such a folder; move it away",
            dir.display()
        );
    }
    Ok(())
}

/// Removes a stage folder, only if it is temper's.
pub fn remove_stage_folder(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    anyhow::ensure!(
        is_stage_folder(dir),
        "{} is not a temper stage folder; not removing it",
        dir.display()
    );
    if let Some(pid) = holder(dir) {
        anyhow::bail!(
            "{} is in use by another process (pid {pid}); wait for it to finish or stop it",
            dir.display()
        );
    }
    std::fs::remove_dir_all(dir).map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display()))
}

/// Puts a succeeded attempt in place of the stage's outputs. The hash cache follows the
/// files, which a rename does not change.
pub fn swap_in(p: &Pipeline, name: &str, cache: &mut HashCache) -> anyhow::Result<()> {
    let (next, out, old) = (
        p.stage_attempt(name),
        p.stage_out(name),
        p.stage_retired(name),
    );
    check_foreign(p, name)?;
    if old.exists() {
        remove_stage_folder(&old)?;
    }
    replace_dir(&next, &out, &old)?;
    let (from, to) = (
        next.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    );
    let moved: Vec<String> = cache
        .keys()
        .filter(|k| k.starts_with(&from))
        .cloned()
        .collect();
    for k in moved {
        if let Some(stamp) = cache.remove(&k) {
            cache.insert(format!("{to}{}", &k[from.len()..]), stamp);
        }
    }
    Ok(())
}

/// Repairs what a kill of an earlier `temper run` may have left: a swap cut between its
/// renames, an attempt recorded as running whose process is gone, a succeeded attempt whose
/// swap never happened. Fails if an earlier run's stage is still alive.
pub fn recover(p: &Pipeline, lock: &mut Lock, cache: &mut HashCache) -> anyhow::Result<()> {
    for st in &p.stages {
        let (next, out, old) = (
            p.stage_attempt(&st.name),
            p.stage_out(&st.name),
            p.stage_retired(&st.name),
        );
        recover_dir(&out, &old)?;
        if old.exists() && is_stage_folder(&old) {
            remove_stage_folder(&old)?;
        }
        let entry = lock.entry(&st.name);
        match &mut entry.attempt {
            Some(a) if a.status == RunStatus::Running => {
                if let Some(pid) = next.exists().then(|| holder(&next)).flatten() {
                    anyhow::bail!(
                        "stage `{}` of an earlier `temper run` is still running (pid {pid}) in {}; wait for it or stop it",
                        st.name,
                        next.display()
                    );
                }
                a.status = RunStatus::Interrupted;
            }
            Some(_) => {}
            None if next.exists() && is_stage_folder(&next) => {
                // The lock says the attempt succeeded (it is written before the swap).
                let done = entry.done.as_ref().map(|d| d.outputs.clone());
                if done.is_some_and(|d| output_hashes(&next, cache).ok() == Some(d)) {
                    swap_in(p, &st.name, cache)?;
                }
            }
            None => {}
        }
    }
    Ok(())
}
