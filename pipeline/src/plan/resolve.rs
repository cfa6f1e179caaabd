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
use temper_stage::adapter::adapter_base;
use temper_stage::kinds::{find_on_path, normalize, visit_paths, Found};
use temper_stage::{StageKind, AUTO_PRECISION_VAR};

use crate::plan::hash::{hash_file, hash_path, HashCache};
use crate::spec::{references, Pipeline, Stage};

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

/// What an input of the key is: a file or folder, or a program run from `PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum InputPath {
    Path(PathBuf),
    Program(String),
}

/// Writes the stage's config: references substituted, its paths (as [`visit_paths`] finds
/// them) relative to the configs folder; returns the same config with absolute paths, and
/// the inputs the key covers — as written → what to hash — without those an upstream stage
/// produces (its key covers them).
fn rewrite_paths(
    stage: &Stage,
    p: &Pipeline,
    upstream: &mut BTreeMap<String, Vec<PathBuf>>,
) -> (Value, Value, BTreeMap<String, InputPath>) {
    let configs = configs_dir(p);
    let absolute = |s: &str| {
        normalize(&if Path::new(s).is_absolute() {
            PathBuf::from(s)
        } else {
            p.base.join(s)
        })
    };
    // Paths are found in the parameters as written (relative to the pipeline's folder),
    // then substituted; the two copies are visited alike, so they find the same paths.
    let mut config = Value::Mapping(stage.params.clone());
    let mut config_abs = config.clone();
    let mut inputs = BTreeMap::new();
    visit_paths(stage.uses, &mut config_abs, &p.base, &mut |found, _, s| {
        if found != Found::Program && !s.is_empty() {
            *s = absolute(&substitute(s, p, &mut BTreeMap::new()))
                .to_string_lossy()
                .into_owned();
        }
    });
    visit_paths(stage.uses, &mut config, &p.base, &mut |found, _, s| {
        if s.is_empty() {
            return;
        }
        let from_upstream = s.contains("${");
        match found {
            Found::Program => {
                inputs.insert(s.clone(), InputPath::Program(s.clone()));
                return;
            }
            Found::Input if !from_upstream => {
                inputs.insert(s.clone(), InputPath::Path(absolute(s)));
            }
            Found::Input | Found::Cache => {}
        }
        let abs = absolute(&substitute(s, p, upstream));
        *s = relative_to(&abs, &configs)
            .unwrap_or(abs)
            .to_string_lossy()
            .into_owned();
    });
    substitute_all(&mut config, p, upstream);
    substitute_all(&mut config_abs, p, &mut BTreeMap::new());
    (config, config_abs, inputs)
}

/// The content hash of one input. An adapter's base, when it lies outside the adapter's
/// folder, is read with it and so hashed with it. A folder holding the workdir is refused:
/// its content changes with every run, so the stage could never be up to date.
fn hash_input(input: &InputPath, p: &Pipeline, cache: &mut HashCache) -> anyhow::Result<String> {
    let path = match input {
        InputPath::Program(name) => match find_on_path(name) {
            Some(file) => return Ok(hash_file(&file, cache)?),
            None => return Ok("missing".into()),
        },
        InputPath::Path(path) => path,
    };
    if !path.exists() {
        // The stage's own check reports it; the key still changes when it appears.
        return Ok("missing".into());
    }
    anyhow::ensure!(
        !(path.is_dir() && p.workdir.starts_with(path)),
        "{} holds the workdir {}, whose content changes with every run; name the files the stage reads instead",
        path.display(),
        p.workdir.display()
    );
    let own = hash_path(path, cache)?;
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
    match adapter_base(path).filter(|base| !base.starts_with(&real)) {
        Some(base) => Ok(
            blake3::hash(format!("{own} {}", hash_path(&base, cache)?).as_bytes())
                .to_hex()
                .to_string(),
        ),
        None => Ok(own),
    }
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
    let mut upstream = BTreeMap::new();
    let (config, config_abs, input_paths) = rewrite_paths(stage, p, &mut upstream);
    let mut inputs = BTreeMap::new();
    for (as_written, input) in &input_paths {
        let h = hash_input(input, p, cache)
            .map_err(|e| anyhow::anyhow!("stage `{}`: input `{as_written}`: {e}", stage.name))?;
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
    let mut key_src = serde_json::json!({"kind": stage.uses.name(), "binary": binary_hash, "params": params, "inputs": inputs, "parents": parents});
    // What `precision: auto` is forced to, when it is (the stages read it from the
    // environment); unset, the key is as it always was.
    if let Ok(forced) = std::env::var(AUTO_PRECISION_VAR) {
        key_src["auto_precision"] = forced.into();
    }
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
