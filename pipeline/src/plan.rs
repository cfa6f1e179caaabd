//! Planning: each stage's cache key, the lock file that remembers what ran, and the decision
//! (run or skip) for every stage with the reason printed beside it.
//!
//! key = BLAKE3(kind, hash of the stage binary, parameters as written (references symbolic),
//! content hashes of input files, parents' keys). A stage is up to date when its key matches
//! the lock, its last run succeeded, its outputs hash as recorded, and its parents' outputs
//! are those it was built from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use serde_yaml::{Mapping, Value};

use crate::hash::{hash_file, hash_path, hash_tree, HashCache};
use crate::schema::{references, Pipeline, Stage};

pub const LOCK_FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: String,
    pub kind: String,
    pub binary: String,
    pub params: Json,
    pub inputs: BTreeMap<String, String>,
    pub parents: BTreeMap<String, String>,
    /// Parents' output hashes when this stage ran.
    pub parent_outputs: BTreeMap<String, String>,
    /// Relative path → hash of everything the stage wrote (state/ and logs excluded).
    pub outputs: BTreeMap<String, String>,
    /// ok | failed | running
    pub status: String,
    pub started: u64,
    pub finished: Option<u64>,
    pub duration_s: Option<f64>,
    pub exit_code: Option<i32>,
}

impl StageRecord {
    /// Hash of what children consume: the outputs less the run's own reports (metrics,
    /// samples, summary, resolved config), which differ between any two runs by their timings.
    pub fn outputs_hash(&self) -> String {
        let consumed: BTreeMap<&String, &String> = self
            .outputs
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "metrics.jsonl" | "samples.jsonl" | "summary.json" | "config.yaml"
                )
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
pub struct Lock {
    pub format: u32,
    pub stages: BTreeMap<String, StageRecord>,
    pub file_hashes: HashCache,
}

impl Lock {
    pub fn path(workdir: &Path) -> PathBuf {
        workdir.join("temper.lock")
    }

    pub fn load(workdir: &Path) -> anyhow::Result<Lock> {
        let p = Self::path(workdir);
        if !p.exists() {
            return Ok(Lock {
                format: LOCK_FORMAT,
                ..Default::default()
            });
        }
        let lock: Lock = serde_json::from_slice(&std::fs::read(&p)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}; delete it to start over", p.display()))?;
        Ok(lock)
    }

    pub fn save(&self, workdir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(workdir)?;
        let p = Self::path(workdir);
        let tmp = p.with_extension("lock.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }
}

/// Files a stage writes that are not outputs: its resumable state and scratch files.
pub fn not_an_output(rel: &str) -> bool {
    let first = rel.split('/').next().unwrap_or(rel);
    matches!(first, "state" | "state.tmp" | "state.old") || first.starts_with('.')
}

/// Everything a stage wrote, hashed.
pub fn output_hashes(
    out: &Path,
    cache: &mut HashCache,
) -> std::io::Result<BTreeMap<String, String>> {
    if !out.exists() {
        return Ok(BTreeMap::new());
    }
    hash_tree(out, &not_an_output, cache)
}

/// A stage ready to run: resolved parameters (for its config file) and what its key covers.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub name: String,
    pub kind: String,
    pub binary: PathBuf,
    pub binary_hash: String,
    pub config: Mapping,
    pub params: Json,
    pub inputs: BTreeMap<String, String>,
    pub parents: BTreeMap<String, String>,
    pub key: String,
}

/// Where stage binaries are: beside `temper`, unless TEMPER_BIN_DIR says otherwise.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TEMPER_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

pub fn binary_for(kind: &str) -> PathBuf {
    bin_dir().join(format!("temper-{kind}"))
}

/// Substitutes references and makes existing relative paths absolute, collecting inputs.
fn resolve_value(v: &Value, p: &Pipeline, inputs: &mut BTreeMap<String, PathBuf>) -> Value {
    match v {
        Value::String(s) => {
            let refs = references(s);
            if !refs.is_empty() {
                let mut out = s.clone();
                for (stage, field) in refs {
                    let target = match field.as_str() {
                        "checkpoint" => p.stage_out(&stage).join("checkpoint"),
                        _ => p.stage_out(&stage),
                    };
                    out = out.replace(&format!("${{{stage}.{field}}}"), &target.to_string_lossy());
                }
                return Value::String(out);
            }
            let candidate = crate::schema::normalize(&if Path::new(s).is_absolute() {
                PathBuf::from(s)
            } else {
                p.base.join(s)
            });
            // Paths inside the workdir are temper's own outputs and caches, never inputs.
            if !s.is_empty()
                && !s.contains('\n')
                && candidate.exists()
                && !candidate.starts_with(&p.workdir)
            {
                let abs = candidate.canonicalize().unwrap_or(candidate);
                inputs.insert(s.clone(), abs.clone());
                Value::String(abs.to_string_lossy().into_owned())
            } else {
                v.clone()
            }
        }
        Value::Sequence(items) => {
            Value::Sequence(items.iter().map(|i| resolve_value(i, p, inputs)).collect())
        }
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), resolve_value(v, p, inputs)))
                .collect(),
        ),
        other => other.clone(),
    }
}

pub fn resolve(
    stage: &Stage,
    p: &Pipeline,
    keys: &BTreeMap<String, String>,
    cache: &mut HashCache,
) -> anyhow::Result<Resolved> {
    let binary = binary_for(&stage.uses);
    let binary_hash = hash_file(&binary, cache).map_err(|e| {
        anyhow::anyhow!(
            "stage `{}`: binary {}: {e} (build with `cargo build --release`)",
            stage.name,
            binary.display()
        )
    })?;
    let mut input_paths = BTreeMap::new();
    let Value::Mapping(config) =
        resolve_value(&Value::Mapping(stage.params.clone()), p, &mut input_paths)
    else {
        unreachable!("a mapping resolves to a mapping")
    };
    let mut inputs = BTreeMap::new();
    for (written, abs) in &input_paths {
        let h = hash_path(abs, cache)
            .map_err(|e| anyhow::anyhow!("stage `{}`: input {}: {e}", stage.name, abs.display()))?;
        inputs.insert(written.clone(), h);
    }
    let params = serde_json::to_value(&stage.params)?;
    let parents: BTreeMap<String, String> = stage
        .parents
        .iter()
        .map(|n| (n.clone(), keys.get(n).cloned().unwrap_or_default()))
        .collect();
    let key_src = serde_json::json!({"kind": stage.uses, "binary": binary_hash, "params": params, "inputs": inputs, "parents": parents});
    let key = blake3::hash(key_src.to_string().as_bytes()).to_hex()[..24].to_string();
    Ok(Resolved {
        name: stage.name.clone(),
        kind: stage.uses.clone(),
        binary,
        binary_hash,
        config,
        params,
        inputs,
        parents,
        key,
    })
}

/// Dotted paths of the parameters that differ between two JSON values.
pub fn changed_params(old: &Json, new: &Json, prefix: &str, out: &mut Vec<String>) {
    match (old, new) {
        (Json::Object(a), Json::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
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

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Skip,
    /// Run from an empty output folder.
    Fresh,
    /// Run on the existing output folder: the stage resumes from its state/.
    Resume,
}

/// Why a stage must run, or None when it is up to date.
pub fn staleness(
    r: &Resolved,
    rec: Option<&StageRecord>,
    p: &Pipeline,
    lock: &Lock,
    cache: &mut HashCache,
) -> (Decision, String) {
    let Some(rec) = rec else {
        return (Decision::Fresh, "never run".into());
    };
    if rec.key == r.key && rec.status != "ok" {
        return (
            Decision::Resume,
            format!(
                "last run {}; resuming from its state",
                if rec.status == "running" {
                    "interrupted"
                } else {
                    "failed"
                }
            ),
        );
    }
    if rec.key != r.key {
        if rec.binary != r.binary_hash {
            return (Decision::Fresh, format!("binary temper-{} changed", r.kind));
        }
        let mut changed = Vec::new();
        changed_params(&rec.params, &r.params, "", &mut changed);
        if !changed.is_empty() {
            return (
                Decision::Fresh,
                format!("params changed: {}", changed.join(", ")),
            );
        }
        for (path, h) in &r.inputs {
            if rec.inputs.get(path) != Some(h) {
                return (Decision::Fresh, format!("input changed: {path}"));
            }
        }
        for (parent, k) in &r.parents {
            if rec.parents.get(parent) != Some(k) {
                return (Decision::Fresh, format!("parent {parent} changed"));
            }
        }
        return (Decision::Fresh, "key changed".into());
    }
    match output_hashes(&p.stage_out(&r.name), cache) {
        Ok(now) if now == rec.outputs => {}
        Ok(now) => {
            let missing: Vec<&String> = rec
                .outputs
                .keys()
                .filter(|k| !now.contains_key(*k))
                .collect();
            let changed: Vec<&String> = rec
                .outputs
                .iter()
                .filter(|(k, v)| now.get(*k).is_some_and(|n| n != *v))
                .map(|(k, _)| k)
                .collect();
            let what = missing
                .first()
                .map(|m| format!("output missing: {m}"))
                .or_else(|| changed.first().map(|c| format!("output changed: {c}")))
                .unwrap_or_else(|| "outputs changed".into());
            return (Decision::Fresh, what);
        }
        Err(e) => return (Decision::Fresh, format!("outputs unreadable: {e}")),
    }
    for (parent, h) in &rec.parent_outputs {
        if lock
            .stages
            .get(parent)
            .map(StageRecord::outputs_hash)
            .as_ref()
            != Some(h)
        {
            return (Decision::Fresh, format!("parent {parent} outputs changed"));
        }
    }
    (Decision::Skip, "up to date".into())
}
