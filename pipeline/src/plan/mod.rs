//! Deciding what runs: for each stage, skip it (up to date), resume its unfinished attempt, or
//! run it fresh, with the reason printed beside the decision. Pure functions of the resolved
//! stage, the lock and the outputs on disk.

pub mod hash;
pub mod resolve;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value as Json;

use crate::plan::hash::{hash_tree, HashCache};
use crate::plan::resolve::Resolved;
use crate::run::lock::{Lock, RunRecord, RunStatus};
use crate::spec::Pipeline;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Up to date: nothing to do.
    Skip,
    /// Continue the unfinished attempt with the same key from its state.
    Resume,
    /// Start over in a new attempt folder; the current outputs stay until it succeeds.
    Fresh,
}

/// Files a stage writes that are not outputs: its resumable state and scratch or marker
/// files.
pub fn not_an_output(rel: &str) -> bool {
    let first = rel.split('/').next().unwrap_or(rel);
    matches!(first, "state" | "state.tmp" | "state.old") || first.starts_with('.')
}

/// Relative path → hash of everything in a stage folder that is an output.
pub fn output_hashes(
    out: &Path,
    cache: &mut HashCache,
) -> std::io::Result<BTreeMap<String, String>> {
    if !out.exists() {
        return Ok(BTreeMap::new());
    }
    hash_tree(out, &not_an_output, cache)
}

/// Dotted paths of the parameters that differ between two JSON values.
pub fn changed_params(old: &Json, new: &Json, prefix: &str, out: &mut Vec<String>) {
    match (old, new) {
        (Json::Object(a), Json::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => changed_params(x, y, &path, out),
                    _ => out.push(path),
                }
            }
        }
        (a, b) if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Why the key changed since `rec`, in the words the user would look for.
pub fn key_change(r: &Resolved, rec: &RunRecord) -> String {
    if rec.binary != r.binary_hash {
        return format!("binary temper-{} changed", r.kind);
    }
    let mut changed = Vec::new();
    changed_params(&rec.params, &r.params, "", &mut changed);
    if !changed.is_empty() {
        return format!("params changed: {}", changed.join(", "));
    }
    for (path, h) in &r.inputs {
        if rec.inputs.get(path) != Some(h) {
            return format!("input changed: {path}");
        }
    }
    for path in rec.inputs.keys() {
        if !r.inputs.contains_key(path) {
            return format!("input removed: {path}");
        }
    }
    for (parent, k) in &r.parents {
        if rec.parents.get(parent) != Some(k) {
            return format!("parent {parent} changed");
        }
    }
    "key changed".into()
}

/// The decision for one stage and its reason.
pub fn decide(
    r: &Resolved,
    p: &Pipeline,
    lock: &Lock,
    cache: &mut HashCache,
) -> (Decision, String) {
    if let Some(a) = lock.attempt(&r.name) {
        if a.key == r.key && a.status != RunStatus::Ok && p.stage_attempt(&r.name).exists() {
            let how = match (a.status, a.exit_code) {
                (RunStatus::Failed, Some(c)) => format!("failed (exit {c})"),
                (RunStatus::Failed, None) => "was killed".into(),
                _ => "was interrupted".into(),
            };
            return (
                Decision::Resume,
                format!("last run {how}; resuming from its state"),
            );
        }
    }
    let Some(done) = lock.done(&r.name) else {
        return (Decision::Fresh, "never run".into());
    };
    if done.key != r.key {
        return (Decision::Fresh, key_change(r, done));
    }
    match output_hashes(&p.stage_out(&r.name), cache) {
        Ok(now) if now == done.outputs => {}
        Ok(now) => {
            let missing = done.outputs.keys().find(|k| !now.contains_key(*k));
            let changed = done
                .outputs
                .iter()
                .find(|(k, v)| now.get(*k).is_some_and(|n| n != *v));
            let what = missing
                .map(|m| format!("output missing: {m}"))
                .or_else(|| changed.map(|(c, _)| format!("output changed: {c}")))
                .unwrap_or_else(|| "outputs changed".into());
            return (Decision::Fresh, what);
        }
        Err(e) => return (Decision::Fresh, format!("outputs unreadable: {e}")),
    }
    for (parent, h) in &done.parent_outputs {
        if lock.done(parent).map(RunRecord::outputs_hash).as_ref() != Some(h) {
            return (Decision::Fresh, format!("parent {parent} outputs changed"));
        }
    }
    (Decision::Skip, "up to date".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_params_names_every_dotted_path() {
        let mut out = Vec::new();
        changed_params(
            &json!({"a": 1, "optim": {"lr": 1e-3, "x": 1}, "gone": true}),
            &json!({"a": 1, "optim": {"lr": 2e-3, "x": 1}, "new": [1]}),
            "",
            &mut out,
        );
        assert_eq!(out, ["gone", "new", "optim.lr"]);
    }

    fn fixture(workdir: &Path) -> (Pipeline, Resolved) {
        let p = Pipeline {
            name: "t".into(),
            file: workdir.join("t.yaml"),
            base: workdir.into(),
            workdir: workdir.into(),
            stages: Vec::new(),
        };
        let r = Resolved {
            name: "sft".into(),
            kind: temper_stage::StageKind::Sft,
            binary: "temper-sft".into(),
            binary_hash: "bin".into(),
            config: Default::default(),
            config_abs: Default::default(),
            params: json!({"steps": 3}),
            inputs: [("data.jsonl".to_string(), "h1".to_string())].into(),
            parents: [("pretrain".to_string(), "k0".to_string())].into(),
            upstream: Default::default(),
            key: "k1".into(),
        };
        (p, r)
    }

    fn record(r: &Resolved, outputs: &BTreeMap<String, String>, status: RunStatus) -> RunRecord {
        RunRecord {
            key: r.key.clone(),
            binary: r.binary_hash.clone(),
            params: r.params.clone(),
            inputs: r.inputs.clone(),
            parents: r.parents.clone(),
            outputs: outputs.clone(),
            status,
            ..Default::default()
        }
    }

    #[test]
    fn decisions_and_their_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let (p, r) = fixture(dir.path());
        let mut cache = HashCache::new();
        let mut lock = Lock::default();
        assert_eq!(
            decide(&r, &p, &lock, &mut cache),
            (Decision::Fresh, "never run".into())
        );

        let out = p.stage_out("sft");
        std::fs::create_dir_all(out.join("checkpoint")).unwrap();
        std::fs::write(out.join("checkpoint/model.safetensors"), "w").unwrap();
        let outputs = output_hashes(&out, &mut cache).unwrap();
        lock.entry("sft").done = Some(record(&r, &outputs, RunStatus::Ok));
        assert_eq!(decide(&r, &p, &lock, &mut cache).0, Decision::Skip);

        let mut changed = r.clone();
        changed.key = "k2".into();
        changed.params = json!({"steps": 4});
        assert_eq!(
            decide(&changed, &p, &lock, &mut cache).1,
            "params changed: steps"
        );
        changed.params = r.params.clone();
        changed.inputs.insert("data.jsonl".into(), "h2".into());
        assert_eq!(
            decide(&changed, &p, &lock, &mut cache).1,
            "input changed: data.jsonl"
        );
        changed.inputs = r.inputs.clone();
        changed.parents.insert("pretrain".into(), "k9".into());
        assert_eq!(
            decide(&changed, &p, &lock, &mut cache).1,
            "parent pretrain changed"
        );

        // An unfinished attempt with the new key resumes; with another key it starts over.
        std::fs::create_dir_all(p.stage_attempt("sft")).unwrap();
        lock.entry("sft").attempt = Some(record(&changed, &Default::default(), RunStatus::Failed));
        assert_eq!(decide(&changed, &p, &lock, &mut cache).0, Decision::Resume);
        assert_eq!(decide(&r, &p, &lock, &mut cache).0, Decision::Skip);

        std::fs::remove_file(out.join("checkpoint/model.safetensors")).unwrap();
        assert_eq!(
            decide(&r, &p, &lock, &mut cache),
            (
                Decision::Fresh,
                "output missing: checkpoint/model.safetensors".into()
            )
        );
    }

    #[test]
    fn state_and_dot_files_are_not_outputs() {
        for rel in [
            "state/model0.safetensors",
            "state.tmp/x",
            ".temper-stage",
            ".summary.json.tmp",
        ] {
            assert!(not_an_output(rel), "{rel}");
        }
        for rel in [
            "checkpoint/model.safetensors",
            "metrics.jsonl",
            "tokenizer.json",
        ] {
            assert!(!not_an_output(rel), "{rel}");
        }
    }
}
