//! `temper diff FILE [--against MANIFEST|WORKDIR] [--json]`: what changed between two runs of a
//! pipeline and what it did. For every stage: the parameters that differ (dotted, as `-o` would
//! write them), the inputs whose content differs, and the final metrics side by side with their
//! deltas. The current side is the lock (the last successful run of each stage) with the
//! stages' summaries; the other side is a manifest from `manifests/`, another workdir of the same
//! pipeline, or by default each stage's previous different result in this workdir's manifests.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::run::lock::Lock;
use crate::spec::Pipeline;

/// One stage's run as the diff sees it.
#[derive(Clone, Debug, Default)]
struct Side {
    key: String,
    params: Value,
    inputs: BTreeMap<String, String>,
    summary: Map<String, Value>,
    /// Where it comes from, for the header.
    from: String,
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn summary_of(dir: &Path) -> Map<String, Value> {
    read_json(&dir.join("summary.json"))
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
}

/// The current side: each stage's last successful run in the lock, with its summary.
fn current(p: &Pipeline) -> anyhow::Result<BTreeMap<String, Side>> {
    lock_sides(p, &p.workdir, "lock")
}

/// Each stage's last successful run in the lock of `workdir`, with its summary.
fn lock_sides(p: &Pipeline, workdir: &Path, from: &str) -> anyhow::Result<BTreeMap<String, Side>> {
    let lock = Lock::load(workdir)?;
    Ok(p.stages
        .iter()
        .filter_map(|s| {
            let d = lock.done(&s.name)?;
            Some((
                s.name.clone(),
                Side {
                    key: d.key.clone(),
                    params: d.params.clone(),
                    inputs: d.inputs.clone(),
                    summary: summary_of(&workdir.join("stages").join(&s.name)),
                    from: from.into(),
                },
            ))
        })
        .collect())
}

/// Successful stage entries of a manifest, refusing one of another pipeline.
fn manifest_sides(p: &Pipeline, path: &Path) -> anyhow::Result<BTreeMap<String, Side>> {
    let m = read_json(path)?;
    let name = m["pipeline"].as_str().unwrap_or("");
    anyhow::ensure!(
        name == p.name,
        "{} is a manifest of pipeline `{name}`, not `{}`",
        path.display(),
        p.name
    );
    let file = path
        .file_name()
        .map_or(String::new(), |f| f.to_string_lossy().into_owned());
    let mut out = BTreeMap::new();
    for e in m["stages"].as_array().into_iter().flatten() {
        if e["decision"] != "ran" || e["exit_code"] != 0 || e.get("params").is_none() {
            continue;
        }
        let stage = e["stage"].as_str().unwrap_or_default().to_string();
        out.insert(
            stage,
            Side {
                key: e["key"].as_str().unwrap_or_default().into(),
                params: e["params"].clone(),
                inputs: serde_json::from_value(e["inputs"].clone()).unwrap_or_default(),
                summary: e["summary"].as_object().cloned().unwrap_or_default(),
                from: format!("manifest {file}"),
            },
        );
    }
    Ok(out)
}

/// The manifests of a workdir, oldest first.
fn manifests(workdir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(workdir.join("manifests"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    // Named `<unix start>-<pid>.json`: the number orders them.
    v.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.split('-').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    });
    v
}

/// The other side: `against` (a manifest or a workdir), else each stage's latest earlier run
/// whose key differs from the current one.
fn baseline(
    p: &Pipeline,
    now: &BTreeMap<String, Side>,
    against: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, Side>> {
    match against {
        Some(path) if path.is_file() => manifest_sides(p, path),
        Some(dir) if dir.is_dir() => {
            let marker = read_json(&dir.join(".temper-workdir"))?;
            let name = marker["pipeline"].as_str().unwrap_or("");
            anyhow::ensure!(
                name == p.name,
                "{} is a workdir of pipeline `{name}`, not `{}`",
                dir.display(),
                p.name
            );
            lock_sides(p, dir, &format!("workdir {}", dir.display()))
        }
        Some(other) => anyhow::bail!("--against {}: not found", other.display()),
        None => {
            let mut out = BTreeMap::new();
            for m in manifests(&p.workdir) {
                // A damaged manifest (cut off by a full disk, say) costs its own entries only.
                let sides = match manifest_sides(p, &m) {
                    Ok(sides) => sides,
                    Err(e) => {
                        eprintln!("temper: warning: skipping manifest {e}");
                        continue;
                    }
                };
                for (stage, side) in sides {
                    if now.get(&stage).is_some_and(|n| n.key != side.key) {
                        out.insert(stage, side); // later manifests overwrite earlier ones
                    }
                }
            }
            Ok(out)
        }
    }
}

/// `{"a": {"b": 1}}` → `a.b = 1`.
fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(x, &key, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// One stage's differences as JSON: params {key: [old, new]}, inputs [changed paths],
/// metrics {key: {old, new, delta}}.
fn stage_diff(old: &Side, new: &Side) -> Value {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(&old.params, "", &mut a);
    flatten(&new.params, "", &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let params: Map<String, Value> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| ((*k).clone(), json!([a.get(k), b.get(k)])))
        .collect();
    let inputs: Vec<&String> = new
        .inputs
        .iter()
        .filter(|(path, hash)| old.inputs.get(*path) != Some(hash))
        .map(|(path, _)| path)
        .chain(old.inputs.keys().filter(|k| !new.inputs.contains_key(*k)))
        .collect();
    let mut metrics = Map::new();
    for (k, v) in &new.summary {
        let (Some(x), Some(y)) = (old.summary.get(k).and_then(Value::as_f64), v.as_f64()) else {
            continue;
        };
        if k == "wall_time_s" || x == y {
            continue;
        }
        metrics.insert(k.clone(), json!({"old": x, "new": y, "delta": y - x}));
    }
    json!({"from": old.from, "old_key": old.key, "new_key": new.key,
           "params": params, "inputs": inputs, "metrics": metrics})
}

pub fn diff(p: &Pipeline, against: Option<&Path>, as_json: bool) -> anyhow::Result<()> {
    let now = current(p)?;
    let then = baseline(p, &now, against)?;
    let mut all = Map::new();
    for s in &p.stages {
        let (Some(new), Some(old)) = (now.get(&s.name), then.get(&s.name)) else {
            continue;
        };
        if new.key == old.key {
            continue;
        }
        all.insert(s.name.clone(), stage_diff(old, new));
    }
    if as_json {
        println!("{}", Value::Object(all));
        return Ok(());
    }
    if all.is_empty() {
        println!("no stage differs from the run it is compared with");
        return Ok(());
    }
    for (stage, d) in &all {
        println!(
            "{stage}: {} → {} (against {})",
            &d["old_key"].as_str().unwrap_or("")
                [..8.min(d["old_key"].as_str().unwrap_or("").len())],
            &d["new_key"].as_str().unwrap_or("")
                [..8.min(d["new_key"].as_str().unwrap_or("").len())],
            d["from"].as_str().unwrap_or("")
        );
        for (k, v) in d["params"].as_object().into_iter().flatten() {
            println!("  param  {k}: {} → {}", v[0], v[1]);
        }
        for i in d["inputs"].as_array().into_iter().flatten() {
            println!("  input  {}: content changed", i.as_str().unwrap_or(""));
        }
        for (k, v) in d["metrics"].as_object().into_iter().flatten() {
            let f = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
            println!(
                "  metric {k}: {:.4} → {:.4} ({:+.4})",
                f(&v["old"]),
                f(&v["new"]),
                f(&v["delta"])
            );
        }
    }
    Ok(())
}
