//! Resolving a stage: its references substituted, its declared input paths hashed by content,
//! its cache key, and the config file its binary will read.
//!
//! key = BLAKE3(kind, hash of the stage binary, parameters as written (references symbolic,
//! cache locations left out), content hashes of its input paths, parents' keys).
//!
//! Only the keys [`temper_stage::kinds`] declares as paths are treated as paths: a value that
//! happens to name a file (`arch: gpt2` beside a folder called `gpt2`) stays a value. In the
//! written config, paths are relative to the config's own folder wherever they share more than
//! the file-system root with it, so a project moved or copied as a whole keeps its configs (and
//! so its stages' resumable states) valid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde_json::Value as Json;
use serde_yaml::{Mapping, Value};
use temper_stage::kinds::{normalize, visit_pattern, PathRole};
use temper_stage::StageKind;

use crate::hash::{hash_file, hash_path, HashCache};
use crate::schema::{references, Pipeline, Stage};

/// A stage ready to plan and run.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub name: String,
    pub kind: StageKind,
    pub binary: PathBuf,
    pub binary_hash: String,
    /// The config its binary reads, paths relative to `<workdir>/configs/`.
    pub config: Mapping,
    /// The same with absolute paths, for a config written anywhere else (validation).
    pub config_abs: Mapping,
    /// Parameters as written, cache locations left out: what the key covers.
    pub params: Json,
    /// Input path as written → content hash.
    pub inputs: BTreeMap<String, String>,
    /// Parent stage → its key.
    pub parents: BTreeMap<String, String>,
    /// Paths upstream stages produce that this stage reads (absolute).
    pub upstream: BTreeMap<String, Vec<PathBuf>>,
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

pub fn binary_for(kind: StageKind) -> PathBuf {
    bin_dir().join(kind.binary())
}

/// `target` relative to the folder `from` when they share more than the root, else None.
/// Both must be absolute and normalised.
pub fn relative_to(target: &Path, from: &Path) -> Option<PathBuf> {
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let shares_more_than_root = t
        .iter()
        .take(common)
        .any(|c| matches!(c, Component::Normal(_)));
    if !shares_more_than_root {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Some(out)
}

/// The folder a stage's config is written to.
pub fn configs_dir(p: &Pipeline) -> PathBuf {
    p.workdir.join("configs")
}

/// Substitutes `${stage.out}` and `${stage.checkpoint}` in `s` with absolute paths, noting
/// which stages it reads.
fn substitute(s: &str, p: &Pipeline, refs: &mut BTreeMap<String, Vec<PathBuf>>) -> String {
    let mut out = s.to_string();
    for (stage, field) in references(s) {
        let target = match field.as_str() {
            "checkpoint" => p.stage_out(&stage).join("checkpoint"),
            _ => p.stage_out(&stage),
        };
        out = out.replace(&format!("${{{stage}.{field}}}"), &target.to_string_lossy());
        refs.entry(stage).or_default().push(target);
    }
    out
}

fn substitute_all(v: &mut Value, p: &Pipeline, refs: &mut BTreeMap<String, Vec<PathBuf>>) {
    match v {
        Value::String(s) if s.contains("${") => *s = substitute(s, p, refs),
        Value::Sequence(items) => items.iter_mut().for_each(|i| substitute_all(i, p, refs)),
        Value::Mapping(m) => m.iter_mut().for_each(|(_, i)| substitute_all(i, p, refs)),
        _ => {}
    }
}

/// Rewrites the stage's declared path parameters in `config` (references already substituted)
/// relative to the configs folder; returns the same config with absolute paths, and the
/// input paths as written → absolute, without those an upstream stage produces.
fn rewrite_paths(
    stage: &Stage,
    p: &Pipeline,
    config: &mut Value,
) -> (Value, BTreeMap<String, PathBuf>) {
    let configs = configs_dir(p);
    let absolute = |s: &str| {
        normalize(&if Path::new(s).is_absolute() {
            PathBuf::from(s)
        } else {
            p.base.join(s)
        })
    };
    // The values as written, to key inputs by what the user typed; visited in the same order.
    let mut written = Vec::new();
    let mut raw = Value::Mapping(stage.params.clone());
    for (pattern, role) in stage.uses.paths() {
        visit_pattern(&mut raw, pattern, &mut |_, s| {
            written.push((*role, s.clone()))
        });
    }
    let mut config_abs = config.clone();
    for (pattern, _) in stage.uses.paths() {
        visit_pattern(&mut config_abs, pattern, &mut |_, s| {
            if !s.is_empty() {
                *s = absolute(s).to_string_lossy().into_owned();
            }
        });
    }
    let mut input_paths = BTreeMap::new();
    let mut i = 0;
    for (pattern, _) in stage.uses.paths() {
        visit_pattern(config, pattern, &mut |_, s| {
            let (role, as_written) = &written[i];
            i += 1;
            if s.is_empty() {
                return;
            }
            let abs = absolute(s);
            if *role == PathRole::Input && !as_written.contains("${") {
                input_paths.insert(as_written.clone(), abs.clone());
            }
            *s = relative_to(&abs, &configs)
                .unwrap_or(abs)
                .to_string_lossy()
                .into_owned();
        });
    }
    (config_abs, input_paths)
}

pub fn resolve(
    stage: &Stage,
    p: &Pipeline,
    keys: &BTreeMap<String, String>,
    cache: &mut HashCache,
) -> anyhow::Result<Resolved> {
    let binary = binary_for(stage.uses);
    let binary_hash = hash_file(&binary, cache).map_err(|e| {
        anyhow::anyhow!(
            "stage `{}`: binary {}: {e} (build it with `cargo build --release`)",
            stage.name,
            binary.display()
        )
    })?;
    let mut config = Value::Mapping(stage.params.clone());
    let mut upstream = BTreeMap::new();
    substitute_all(&mut config, p, &mut upstream);
    let (config_abs, input_paths) = rewrite_paths(stage, p, &mut config);
    let mut inputs = BTreeMap::new();
    for (as_written, abs) in &input_paths {
        let h = if abs.exists() {
            hash_path(abs, cache).map_err(|e| {
                anyhow::anyhow!("stage `{}`: input {}: {e}", stage.name, abs.display())
            })?
        } else {
            // The stage's own check reports it; the key still changes when it appears.
            "missing".to_string()
        };
        inputs.insert(as_written.clone(), h);
    }
    let mut key_params = stage.params.clone();
    for k in stage.uses.volatile_keys() {
        key_params.remove(k);
    }
    let params = serde_json::to_value(&key_params)?;
    let parents: BTreeMap<String, String> = stage
        .parents
        .iter()
        .map(|n| (n.clone(), keys.get(n).cloned().unwrap_or_default()))
        .collect();
    let key_src = serde_json::json!({"kind": stage.uses.name(), "binary": binary_hash, "params": params, "inputs": inputs, "parents": parents});
    let key = blake3::hash(key_src.to_string().as_bytes()).to_hex()[..24].to_string();
    let (Value::Mapping(config), Value::Mapping(config_abs)) = (config, config_abs) else {
        unreachable!("a mapping stays a mapping")
    };
    Ok(Resolved {
        name: stage.name.clone(),
        kind: stage.uses,
        binary,
        binary_hash,
        config,
        config_abs,
        params,
        inputs,
        parents,
        upstream,
        key,
    })
}

/// Every stage resolved, parents first (each key covers its parents' keys).
pub fn resolve_all(
    p: &Pipeline,
    cache: &mut HashCache,
) -> anyhow::Result<BTreeMap<String, Resolved>> {
    let mut keys = BTreeMap::new();
    let mut out = BTreeMap::new();
    for st in p.topo_order() {
        let r = resolve(st, p, &keys, cache)?;
        keys.insert(st.name.clone(), r.key.clone());
        out.insert(st.name.clone(), r);
    }
    Ok(out)
}

/// Every stage upstream of `name`.
pub fn ancestors(p: &Pipeline, name: &str) -> BTreeSet<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_share_more_than_the_root() {
        let r = |a: &str, b: &str| relative_to(Path::new(a), Path::new(b));
        assert_eq!(
            r("/w/p/data/x.parquet", "/w/p/runs/demo/configs").unwrap(),
            Path::new("../../../data/x.parquet")
        );
        assert_eq!(
            r(
                "/w/p/runs/demo/stages/sft/checkpoint",
                "/w/p/runs/demo/configs"
            )
            .unwrap(),
            Path::new("../stages/sft/checkpoint")
        );
        assert_eq!(r("/usr/share/dict/words", "/w/p/runs/demo/configs"), None);
        assert_eq!(r("/w/p", "/w/p").unwrap(), Path::new("."));
    }
}
