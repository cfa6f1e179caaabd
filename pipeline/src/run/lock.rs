//! The lock file `<workdir>/temper.lock`: what ran, under which key, and what it wrote.
//!
//! Per stage it keeps two records: `done`, the last successful run, whose outputs are in
//! `stages/<name>/`, and `attempt`, a run that has not succeeded yet (running, failed or
//! interrupted) in `stages/.<name>.next/`. A fresh run never touches `done`'s folder until it
//! succeeds. Paths are recorded relative to the pipeline file as written, so a moved project
//! keeps its records. The file carries a format number that is checked on read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::plan::hash::HashCache;

pub const LOCK_FORMAT: u32 = 2;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Ok,
    #[default]
    Running,
    Failed,
    Interrupted,
}

/// One run of a stage: what its key covered, and how it ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRecord {
    pub key: String,
    pub kind: String,
    pub binary: String,
    pub params: Json,
    /// Input key as written → content hash.
    pub inputs: BTreeMap<String, String>,
    /// Parent stage → its key when this ran.
    pub parents: BTreeMap<String, String>,
    /// Parent stage → hash of the outputs this run consumed.
    pub parent_outputs: BTreeMap<String, String>,
    /// Relative path → hash of everything the run wrote (state/ and dot-files excluded);
    /// filled in when it succeeds.
    pub outputs: BTreeMap<String, String>,
    pub status: RunStatus,
    /// Why it ran (the planner's reason).
    pub reason: String,
    pub started: u64,
    pub finished: Option<u64>,
    pub duration_s: Option<f64>,
    pub exit_code: Option<i32>,
}

impl RunRecord {
    /// Hash of what children consume: the outputs less the run's own reports (metrics,
    /// samples, summary, resolved config, TensorBoard events), which differ between any two
    /// runs by their timings.
    pub fn outputs_hash(&self) -> String {
        let consumed: BTreeMap<&String, &String> = self
            .outputs
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "metrics.jsonl" | "samples.jsonl" | "summary.json" | "config.yaml"
                ) && !k.starts_with("tb/")
            })
            .collect();
        blake3::hash(
            serde_json::to_string(&consumed)
                .expect("map serialises")
                .as_bytes(),
        )
        .to_hex()
        .to_string()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageEntry {
    /// The last successful run (outputs in `stages/<name>/`).
    #[serde(default)]
    pub done: Option<RunRecord>,
    /// A run that has not succeeded (outputs, state and log in `stages/.<name>.next/`).
    #[serde(default)]
    pub attempt: Option<RunRecord>,
    /// Why a gate stopped the stage at the last `temper run`, if one did.
    #[serde(default)]
    pub gated: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Lock {
    pub format: u32,
    pub stages: BTreeMap<String, StageEntry>,
    /// Content hashes by path, size and mtime, so unchanged files are not re-read.
    #[serde(default)]
    pub file_hashes: HashCache,
}

impl Lock {
    pub fn path(workdir: &Path) -> PathBuf {
        workdir.join("temper.lock")
    }

    /// The lock of `workdir`, or an empty one when it has none yet.
    pub fn load(workdir: &Path) -> anyhow::Result<Lock> {
        let p = Self::path(workdir);
        if !p.exists() {
            return Ok(Lock {
                format: LOCK_FORMAT,
                ..Default::default()
            });
        }
        let what_to_do = "move it aside to start the bookkeeping over: every stage then reruns, and each stage's previous outputs stay in place until its new run succeeds";
        let bytes = std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let format = serde_json::from_slice::<Json>(&bytes)
            .ok()
            .and_then(|v| v.get("format").and_then(Json::as_u64));
        match format {
            Some(f) if f == LOCK_FORMAT as u64 => {}
            Some(f) => anyhow::bail!(
                "{}: lock format {f}, this temper reads {LOCK_FORMAT}: it was written by another temper version; use that version, or {what_to_do}",
                p.display()
            ),
            None => anyhow::bail!("{}: unreadable (not a temper lock); {what_to_do}", p.display()),
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}; {what_to_do}", p.display()))
    }

    pub fn save(&self, workdir: &Path) -> anyhow::Result<()> {
        temper_stage::atomic::write_atomic(&Self::path(workdir), &serde_json::to_vec_pretty(self)?)
    }

    pub fn done(&self, stage: &str) -> Option<&RunRecord> {
        self.stages.get(stage).and_then(|e| e.done.as_ref())
    }

    pub fn gated(&self, stage: &str) -> Option<&str> {
        self.stages.get(stage).and_then(|e| e.gated.as_deref())
    }

    pub fn attempt(&self, stage: &str) -> Option<&RunRecord> {
        self.stages.get(stage).and_then(|e| e.attempt.as_ref())
    }

    pub fn entry(&mut self, stage: &str) -> &mut StageEntry {
        self.stages.entry(stage.to_string()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_of_another_format_is_refused_naming_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(Lock::path(d.path()), r#"{"format": 1, "stages": {}}"#).unwrap();
        let e = Lock::load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("lock format 1, this temper reads 2") && e.contains("move it aside"),
            "{e}"
        );
        std::fs::write(Lock::path(d.path()), "garbage").unwrap();
        assert!(Lock::load(d.path())
            .unwrap_err()
            .to_string()
            .contains("unreadable"));
        let mut lock = Lock::load(&d.path().join("none")).unwrap();
        lock.entry("sft").done = Some(RunRecord::default());
        lock.save(d.path()).unwrap();
        assert!(Lock::load(d.path()).unwrap().done("sft").is_some());
    }

    #[test]
    fn outputs_hash_ignores_the_runs_own_reports() {
        let mut a = RunRecord::default();
        a.outputs
            .insert("checkpoint/model.safetensors".into(), "x".into());
        a.outputs.insert("metrics.jsonl".into(), "m1".into());
        a.outputs
            .insert("tb/events.out.tfevents.1.host".into(), "t1".into());
        let mut b = a.clone();
        b.outputs.insert("metrics.jsonl".into(), "m2".into());
        b.outputs
            .insert("tb/events.out.tfevents.2.host".into(), "t2".into());
        assert_eq!(a.outputs_hash(), b.outputs_hash());
        b.outputs
            .insert("checkpoint/model.safetensors".into(), "y".into());
        assert_ne!(a.outputs_hash(), b.outputs_hash());
    }
}
