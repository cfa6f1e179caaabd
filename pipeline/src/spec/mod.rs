//! The pipeline file: `name`, `workdir`, `defaults`, `stages`. Each stage names its kind
//! (`uses`), its parameters (`with`, merged over `defaults`) and may refer to other stages'
//! outputs as `${stage.out}` or `${stage.checkpoint}`; those references (and `needs:`) are the
//! DAG's edges. Relative paths are relative to the pipeline file's folder.
//!
//! `load` reports every problem it finds at once, each naming its line where the file has one.

pub mod gate;
mod graph;
pub mod matrix;
mod overrides;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use temper_stage::StageKind;

use graph::graph_problems;
use overrides::apply_override;
pub use overrides::set_dotted;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: String,
    workdir: PathBuf,
    #[serde(default)]
    defaults: Mapping,
    stages: Mapping,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    uses: String,
    #[serde(default)]
    with: Mapping,
    #[serde(default)]
    needs: Vec<String>,
    /// Expand this stage (and everything downstream) over these values: `{seed: [1, 2, 3]}`.
    #[serde(default)]
    matrix: Mapping,
    /// Conditions on parents' summaries: `["reward.accuracy >= 0.7"]`.
    #[serde(default)]
    gate: Vec<String>,
    /// Processes to run it as: `{nproc: 2}` (data parallel).
    #[serde(default)]
    resources: Option<crate::run::launch::Resources>,
}

#[derive(Clone, Debug)]
pub struct Stage {
    /// The stage's name, or its branch's (`reward@seed=1`) when a matrix expanded it.
    pub name: String,
    /// The name written in the file (the same as `name` outside sweeps).
    pub group: String,
    pub uses: StageKind,
    /// Parameters: defaults merged with `with`, references still symbolic.
    pub params: Mapping,
    /// Stages this one depends on (references, `needs` and gates), sorted.
    pub parents: BTreeSet<String>,
    /// Its own matrix before expansion: (dotted key, values).
    pub matrix: Vec<(String, Vec<Value>)>,
    pub gates: Vec<crate::spec::gate::Gate>,
    /// How many ranks it runs as (one unless `resources:` says more).
    pub resources: crate::run::launch::Resources,
}

#[derive(Clone, Debug)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// The folder relative paths are resolved against.
    pub base: PathBuf,
    pub workdir: PathBuf,
    /// In file order.
    pub stages: Vec<Stage>,
}

/// One problem in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {} problem(s):\n  {}", .file.display(), .problems.len(), .problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct Invalid {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// The 1-based line of the first line of `text` that satisfies `pred`.
fn find_line(text: &str, pred: impl Fn(&str) -> bool) -> Option<usize> {
    text.lines().position(pred).map(|i| i + 1)
}

/// The line where stage `name` is declared under `stages:`.
fn stage_line(text: &str, name: &str) -> Option<usize> {
    find_line(text, |l| {
        let t = l.trim_start();
        l.len() > t.len()
            && (t.starts_with(&format!("{name}:")) || t.starts_with(&format!("\"{name}\":")))
    })
}

/// `${stage.field}` references in a string.
pub fn references(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        let inner = &rest[start + 2..start + end];
        // The field is the last component: a branch name (`sft@optim.lr=0.001`) has dots.
        if let Some((stage, field)) = inner.rsplit_once('.') {
            out.push((stage.to_string(), field.to_string()));
        } else {
            out.push((inner.to_string(), String::new()));
        }
        rest = &rest[start + end + 1..];
    }
    out
}

/// Every string in a YAML value, depth first.
pub fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Sequence(items) => items.iter().for_each(|i| strings(i, out)),
        Value::Mapping(m) => m.values().for_each(|i| strings(i, out)),
        Value::Tagged(t) => strings(&t.value, out),
        _ => {}
    }
}

/// Parses and checks a pipeline file: unknown keys, unknown kinds, duplicate names, dangling
/// references and cycles, all reported together.
#[cfg(test)]
pub fn load(file: &Path) -> anyhow::Result<Pipeline> {
    load_with(file, &[])
}

/// [`load`] with `-o stage.key=value` overrides applied before sweeps are expanded.
pub fn load_with(file: &Path, overrides: &[String]) -> anyhow::Result<Pipeline> {
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let invalid = |problems| Invalid {
        file: file.into(),
        problems,
    };
    let raw: RawPipeline = serde_yaml::from_str(&text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        let message = e
            .to_string()
            .split(" at line ")
            .next()
            .unwrap_or_default()
            .to_string();
        invalid(vec![Problem { line, message }])
    })?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let base = base.canonicalize().unwrap_or(base);
    let mut problems = Vec::new();
    let mut stages = Vec::new();
    for (key, value) in &raw.stages {
        match parse_stage(&text, key, value, &raw.defaults) {
            Ok((stage, mut found)) => {
                problems.append(&mut found);
                stages.push(stage);
            }
            Err(mut found) => problems.append(&mut found),
        }
    }
    for o in overrides {
        apply_override(&mut stages, o)?;
    }
    problems.extend(graph_problems(&text, &stages));
    let workdir = normalize(&base.join(&raw.workdir));
    if let Some(problem) = workdir_problem(&workdir, &base) {
        problems.push(Problem {
            line: find_line(&text, |l| l.trim_start().starts_with("workdir:")),
            message: problem,
        });
    }
    if !problems.is_empty() {
        return Err(invalid(problems).into());
    }
    let mut p = Pipeline {
        name: raw.name,
        file: file.into(),
        base,
        workdir,
        stages,
    };
    let order: Vec<Stage> = p.topo_order().into_iter().cloned().collect();
    p.stages = crate::spec::matrix::expand(order)?;
    Ok(p)
}

/// One stage of the file: its kind, its parameters over the defaults and its parents, with
/// the problems that do not stop it from being read; Err when it cannot be read at all.
fn parse_stage(
    text: &str,
    key: &Value,
    value: &Value,
    defaults: &Mapping,
) -> Result<(Stage, Vec<Problem>), Vec<Problem>> {
    let Some(name) = key.as_str() else {
        return Err(vec![Problem {
            line: None,
            message: format!("stage names must be strings, got {key:?}"),
        }]);
    };
    let line = stage_line(text, name);
    let problem = |message: String| Problem { line, message };
    let mut problems = Vec::new();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        problems.push(problem(format!(
            "stage name `{name}`: use letters, digits, `_` and `-`"
        )));
    }
    let st: RawStage = serde_yaml::from_value(value.clone())
        .map_err(|e| vec![problem(format!("stage `{name}`: {e}"))])?;
    let kind = StageKind::parse(&st.uses).ok_or_else(|| {
        vec![problem(format!(
            "stage `{name}`: unknown kind `uses: {}` (one of {})",
            st.uses,
            StageKind::names()
        ))]
    })?;
    let mut params = defaults.clone();
    for (k, v) in st.with {
        params.insert(k, v);
    }
    let mut parents: BTreeSet<String> = st.needs.iter().cloned().collect();
    let mut matrix = Vec::new();
    for (k, v) in &st.matrix {
        let key = k.as_str().unwrap_or_default().to_string();
        match v.as_sequence() {
            Some(values) if !values.is_empty() && !key.is_empty() => {
                // Two values that name the same branch would be one stage twice.
                let mut seen = BTreeSet::new();
                match values
                    .iter()
                    .find(|v| !seen.insert(crate::spec::matrix::render(v)))
                {
                    Some(twice) => problems.push(problem(format!(
                        "stage `{name}`: matrix key `{key}` lists `{}` twice; each value makes one branch",
                        crate::spec::matrix::render(twice)
                    ))),
                    None => matrix.push((key, values.clone())),
                }
            }
            _ => problems.push(problem(format!(
                "stage `{name}`: matrix key `{key}` needs a non-empty list of values"
            ))),
        }
    }
    let mut gates = Vec::new();
    for g in &st.gate {
        match crate::spec::gate::parse(g) {
            Ok(gate) => {
                parents.insert(gate.stage.clone());
                gates.push(gate);
            }
            Err(e) => problems.push(Problem {
                line: find_line(text, |l| l.contains(g.as_str())).or(line),
                message: format!("stage `{name}`: {e}"),
            }),
        }
    }
    let mut found = Vec::new();
    strings(&Value::Mapping(params.clone()), &mut found);
    for s in &found {
        for (stage, field) in references(s) {
            if !matches!(field.as_str(), "out" | "checkpoint") {
                let r = format!("${{{stage}.{field}}}");
                problems.push(Problem {
                    line: find_line(text, |l| l.contains(&r)).or(line),
                    message: format!("stage `{name}`: reference `{r}`: use `${{{stage}.out}}` or `${{{stage}.checkpoint}}`"),
                });
            }
            parents.insert(stage);
        }
    }
    let resources = st.resources.unwrap_or_default();
    for message in resources.problems(kind) {
        problems.push(Problem {
            line: find_line(text, |l| l.contains("resources:") && l.contains("nproc")).or(line),
            message: format!("stage `{name}`: {message}"),
        });
    }
    let stage = Stage {
        name: name.to_string(),
        group: name.to_string(),
        uses: kind,
        params,
        parents,
        matrix,
        gates,
        resources,
    };
    Ok((stage, problems))
}

/// Why `workdir` cannot be a pipeline's work folder, if it cannot: temper writes and replaces
/// folders under it, so it may not be the pipeline file's own folder or one of its ancestors
/// (where a project's own `stages/` or `configs/` live).
pub fn workdir_problem(workdir: &Path, base: &Path) -> Option<String> {
    if workdir.as_os_str().is_empty() || base.starts_with(workdir) {
        return Some(format!(
            "workdir `{}` is the pipeline file's folder or contains it; use a folder of its own, e.g. `runs/NAME`",
            workdir.display()
        ));
    }
    None
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stages a name on the command line means: a stage, or every branch of a swept one.
    pub fn named(&self, name: &str) -> Vec<String> {
        self.stages
            .iter()
            .filter(|s| s.name == name || s.group == name)
            .map(|s| s.name.clone())
            .collect()
    }

    /// Where a stage's last successful outputs live.
    pub fn stage_out(&self, name: &str) -> PathBuf {
        self.workdir.join("stages").join(name)
    }

    /// Where a stage runs until it succeeds and is swapped in as [`Self::stage_out`].
    pub fn stage_attempt(&self, name: &str) -> PathBuf {
        self.workdir.join("stages").join(format!(".{name}.next"))
    }

    /// Where the previous outputs sit for the instant of a swap.
    pub fn stage_retired(&self, name: &str) -> PathBuf {
        self.workdir.join("stages").join(format!(".{name}.old"))
    }
}

pub use temper_stage::kinds::normalize;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_found_anywhere_in_a_string() {
        assert_eq!(
            references("${tokenizer.out}/tokenizer.json and ${sft.checkpoint}"),
            [
                ("tokenizer".to_string(), "out".to_string()),
                ("sft".to_string(), "checkpoint".to_string())
            ]
        );
        assert_eq!(references("${bare}"), [("bare".to_string(), String::new())]);
        assert!(references("no ${ closing").is_empty());
    }

    #[test]
    fn overrides_reach_nested_keys_and_every_branch() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        let yaml = "name: p\nworkdir: w\nstages:\n  sft: {uses: sft, matrix: {seed: [1, 2]}, with: {optim: {lr: 1}}}\n";
        std::fs::write(&file, yaml).unwrap();
        let o = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = load_with(&file, &o(&["sft.optim.lr=2e-3", "sft.steps=[1, 2]"])).unwrap();
        assert_eq!(p.stages.len(), 2);
        for st in &p.stages {
            assert_eq!(st.params["optim"]["lr"], Value::from(2e-3));
            assert_eq!(
                st.params["steps"],
                serde_yaml::from_str::<Value>("[1, 2]").unwrap()
            );
        }
        assert_eq!(
            p.stage("sft@seed=2").unwrap().params["seed"],
            Value::from(2)
        );
        let err = |x: &str| load_with(&file, &o(&[x])).unwrap_err().to_string();
        assert!(err("nope.x=1").contains("no stage `nope`"));
        assert!(err("sft.optim.lr.x=1").contains("not a mapping"));
    }

    #[test]
    fn bad_matrices_and_gates_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        let yaml = "name: p\nworkdir: w\nstages:\n  a: {uses: sft, matrix: {seed: []}}\n  b: {uses: ppo, gate: [\"a.accuracy >> 1\"]}\n  c: {uses: ppo, gate: [\"z.loss < 1\"]}\n  d: {uses: sft, matrix: {seed: [1, 2, 1], optim.lr: [1, \"1\"]}}\n";
        std::fs::write(&file, yaml).unwrap();
        let e = load(&file).unwrap_err().to_string();
        assert!(
            e.contains("matrix key `seed` needs a non-empty list"),
            "{e}"
        );
        assert!(e.contains("gate `a.accuracy >> 1`"), "{e}");
        assert!(
            e.contains("stage `d`: matrix key `seed` lists `1` twice"),
            "{e}"
        );
        assert!(
            e.contains("stage `d`: matrix key `optim.lr` lists `1` twice"),
            "a number and a string that name the same branch: {e}"
        );
        assert!(
            e.contains("stage `c` refers to `z`, which is not a stage"),
            "{e}"
        );
    }

    #[test]
    fn topo_order_ends_even_on_a_graph_the_checks_would_refuse() {
        let stage = |name: &str, parents: &[&str]| Stage {
            name: name.into(),
            group: name.into(),
            uses: StageKind::Sft,
            params: Mapping::new(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            matrix: Vec::new(),
            gates: Vec::new(),
            resources: Default::default(),
        };
        let p = Pipeline {
            name: "p".into(),
            file: "p.yaml".into(),
            base: "/".into(),
            workdir: "/w".into(),
            stages: vec![
                stage("a", &[]),
                stage("a", &[]),
                stage("b", &["c"]),
                stage("c", &["b"]),
            ],
        };
        let names: Vec<&str> = p.topo_order().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn the_workdir_may_not_contain_the_pipeline_file() {
        let base = Path::new("/p/configs");
        assert!(workdir_problem(Path::new("/p/configs"), base).is_some());
        assert!(workdir_problem(Path::new("/p"), base).is_some());
        assert!(workdir_problem(Path::new(""), base).is_some());
        assert!(workdir_problem(Path::new("/p/runs/demo"), base).is_none());
        assert_eq!(
            normalize(Path::new("/p/configs/../runs/./demo")),
            Path::new("/p/runs/demo")
        );
    }
}
