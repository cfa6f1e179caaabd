//! The stage kinds, and which of each kind's parameters are paths.
//!
//! This table is the one place that says which keys name input files or folders: the
//! orchestrator hashes and resolves exactly those (everything else is a plain value, whatever
//! it happens to spell), and a stage binary resolves exactly those relative to its config
//! file. A pattern is a dotted key path; `*` matches any key of a mapping, and a list matches
//! each of its items, so `eval_data.*.files` covers `eval_data: {general: {files: [a, b]}}`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    Tokenizer,
    Pretrain,
    Sft,
    Reward,
    Ppo,
    Dpo,
    Grpo,
    Merge,
    Eval,
    Label,
}

/// What a path parameter is to the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRole {
    /// Read by the stage: its content is part of the stage's cache key.
    Input,
    /// A command line `[program, args…]` the stage runs (a `command` reward). The program is
    /// an input: a path when it has a `/`, else the file `PATH` finds for it. So is every
    /// argument that names an existing file or folder (relative to the config's folder);
    /// anything else on the line is a plain value, part of the key as written.
    Command,
    /// Where the stage keeps reusable work (a token cache): never hashed, and not part of the
    /// key, since where a cache lives cannot change a result.
    Cache,
}

impl PathRole {
    /// "an input path", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            PathRole::Input => "an input path",
            PathRole::Command => "a command line",
            PathRole::Cache => "a cache path",
        }
    }
}

/// A path found in a config, and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Found {
    /// A file or folder the stage reads.
    Input,
    /// A cache location.
    Cache,
    /// A program named without a folder: run from `PATH`, so the file `PATH` finds is what
    /// the stage runs.
    Program,
}

impl StageKind {
    pub const ALL: [StageKind; 10] = [
        StageKind::Tokenizer,
        StageKind::Pretrain,
        StageKind::Sft,
        StageKind::Reward,
        StageKind::Ppo,
        StageKind::Dpo,
        StageKind::Grpo,
        StageKind::Merge,
        StageKind::Eval,
        StageKind::Label,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageKind::Tokenizer => "tokenizer",
            StageKind::Pretrain => "pretrain",
            StageKind::Sft => "sft",
            StageKind::Reward => "reward",
            StageKind::Ppo => "ppo",
            StageKind::Dpo => "dpo",
            StageKind::Grpo => "grpo",
            StageKind::Merge => "merge",
            StageKind::Eval => "eval",
            StageKind::Label => "label",
        }
    }

    pub fn parse(s: &str) -> Option<StageKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn names() -> String {
        Self::ALL.map(|k| k.name()).join(", ")
    }

    /// Whether its binary trains data-parallel over c10d (more than one rank, `resources:
    /// {nproc: N}`); the others refuse a world above one.
    pub fn data_parallel(self) -> bool {
        matches!(
            self,
            StageKind::Pretrain
                | StageKind::Sft
                | StageKind::Reward
                | StageKind::Dpo
                | StageKind::Grpo
                | StageKind::Ppo
        )
    }

    /// The binary that runs this kind: `temper-<kind>`.
    pub fn binary(self) -> String {
        format!("temper-{}", self.name())
    }

    /// The kind's path parameters and what each is.
    pub fn paths(self) -> &'static [(&'static str, PathRole)] {
        use PathRole::*;
        match self {
            StageKind::Tokenizer => &[("corpus", Input)],
            StageKind::Pretrain => &[
                ("tokenizer", Input),
                ("data", Input),
                ("init", Input),
                ("eval_data.*.files", Input),
                ("cache_dir", Cache),
            ],
            StageKind::Sft => &[("init", Input), ("data", Input), ("eval_data", Input)],
            StageKind::Reward => &[
                ("init", Input),
                ("data", Input),
                ("eval_data", Input),
                ("eval_sets.*", Input),
            ],
            StageKind::Ppo => &[
                ("policy", Input),
                ("reward_model", Input),
                ("prompts", Input),
                ("rewards.path", Input),
                ("rewards.command", Command),
                ("rewards.inputs", Input),
            ],
            StageKind::Dpo => &[
                ("policy", Input),
                ("reference", Input),
                ("data", Input),
                ("eval_data", Input),
            ],
            StageKind::Grpo => &[
                ("policy", Input),
                ("reference", Input),
                ("prompts", Input),
                ("rewards.path", Input),
                ("rewards.command", Command),
                ("rewards.inputs", Input),
            ],
            StageKind::Merge => &[("adapter", Input)],
            StageKind::Eval => &[
                ("policies.*", Input),
                ("reference", Input),
                ("reward_model", Input),
                ("prompts", Input),
                ("lexicon", Input),
                ("judges.path", Input),
                ("judges.command", Command),
                ("judges.inputs", Input),
                ("best_of.labeller.path", Input),
                ("best_of.labeller.command", Command),
                ("best_of.labeller.inputs", Input),
            ],
            StageKind::Label => &[
                ("policy", Input),
                ("prompts", Input),
                ("labeller.path", Input),
                ("labeller.command", Command),
                ("labeller.inputs", Input),
            ],
        }
    }

    /// The checks a `--validate` leaves for the run when a path is pending (an upstream
    /// stage has not written it yet): what reading its content is needed for.
    pub fn content_checks(self) -> &'static str {
        match self {
            StageKind::Tokenizer => "the corpus's text",
            StageKind::Pretrain => {
                "the tokenizer against the model, the data's tokens, PEFT target modules and layers, memory"
            }
            StageKind::Sft | StageKind::Reward => {
                "the model with its tokenizer and chat template, the examples rendered and their lengths, PEFT target modules and layers, memory"
            }
            StageKind::Dpo => {
                "the policy and reference against one tokenizer, the pairs rendered, PEFT target modules and layers, memory"
            }
            StageKind::Ppo | StageKind::Grpo => {
                "the policy, reference and reward models against one tokenizer, the prompts and the fields each reward reads, PEFT target modules and layers, memory"
            }
            StageKind::Merge => "the adapter against its base",
            StageKind::Eval => {
                "the policies, reference and reward model against one tokenizer, the prompts and the fields the judges read"
            }
            StageKind::Label => {
                "the policy and any labelling reward model against one tokenizer, the prompts and the fields the labeller reads"
            }
        }
    }

    /// Top-level keys that do not take part in the cache key.
    pub fn volatile_keys(self) -> Vec<&'static str> {
        self.paths()
            .iter()
            .filter(|(_, role)| *role == PathRole::Cache)
            .map(|(p, _)| *p)
            .collect()
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Calls `f(what, position, value)` for every path in a `kind` config: the strings at its
/// declared path keys, and on its command lines the program and the arguments that are paths
/// (an argument is one when it names an existing file or folder, absolute or relative to
/// `base`, the config's folder). Positions name list items: `rewards[1].command[2]`.
///
/// This is the one place that decides what a path is: the orchestrator (hashing, rewriting)
/// and the stage (resolving) both call it, so they cannot disagree.
pub fn visit_paths(
    kind: StageKind,
    config: &mut Value,
    base: &Path,
    f: &mut dyn FnMut(Found, &str, &mut String),
) {
    for (pattern, role) in kind.paths() {
        let parts: Vec<&str> = pattern.split('.').collect();
        visit(config, &parts, String::new(), &mut |at, node| match role {
            PathRole::Input | PathRole::Cache => {
                let found = if *role == PathRole::Input {
                    Found::Input
                } else {
                    Found::Cache
                };
                match node {
                    Value::String(s) => f(found, at, s),
                    Value::Sequence(items) => {
                        for (i, item) in items.iter_mut().enumerate() {
                            if let Value::String(s) = item {
                                f(found, &format!("{at}[{i}]"), s);
                            }
                        }
                    }
                    _ => {}
                }
            }
            PathRole::Command => {
                let Value::Sequence(items) = node else { return };
                for (i, item) in items.iter_mut().enumerate() {
                    let Value::String(s) = item else { continue };
                    let found = if i == 0 {
                        if s.contains('/') {
                            Some(Found::Input)
                        } else {
                            (!s.is_empty()).then_some(Found::Program)
                        }
                    } else {
                        names_existing_path(s, base).then_some(Found::Input)
                    };
                    if let Some(found) = found {
                        f(found, &format!("{at}[{i}]"), s);
                    }
                }
            }
        });
    }
}

/// Whether a command-line argument names an existing file or folder. Options (`-x`,
/// `--flag=value`) never do: a file an option names belongs under the reward's `inputs:`.
fn names_existing_path(arg: &str, base: &Path) -> bool {
    if arg.is_empty() || arg.starts_with('-') {
        return false;
    }
    let p = Path::new(arg);
    if p.is_absolute() {
        p.exists()
    } else {
        base.join(p).exists()
    }
}

/// Calls `f(position, node)` on every node at the end of `parts`; lists on the way are
/// walked item by item.
fn visit(value: &mut Value, parts: &[&str], at: String, f: &mut dyn FnMut(&str, &mut Value)) {
    if parts.is_empty() {
        f(&at, value);
        return;
    }
    match value {
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                visit(item, parts, format!("{at}[{i}]"), f);
            }
        }
        Value::Mapping(m) => {
            for (k, v) in m.iter_mut() {
                let Some(k) = k.as_str() else { continue };
                if parts[0] == "*" || parts[0] == k {
                    let next = if at.is_empty() {
                        k.to_string()
                    } else {
                        format!("{at}.{k}")
                    };
                    visit(v, &parts[1..], next, f);
                }
            }
        }
        _ => {}
    }
}

/// Makes the kind's relative paths absolute against `base` (the config file's folder), in
/// place. A program run from `PATH` stays a name.
pub fn resolve_paths(kind: StageKind, config: &mut Value, base: &Path) {
    visit_paths(kind, config, base, &mut |found, _, s| {
        if found != Found::Program && !s.is_empty() && Path::new(s.as_str()).is_relative() {
            *s = normalize(&base.join(s.as_str()))
                .to_string_lossy()
                .into_owned();
        }
    });
}

/// The file `PATH` finds for a program named without a folder, as a shell would run it.
pub fn find_on_path(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `a/b/../c` → `a/c`, without touching the file system (the path may not exist yet).
pub fn normalize(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_reach_nested_lists_and_any_key() {
        let mut v: Value = serde_yaml::from_str(
            "data: [a.txt, b.txt]\ntokenizer: t.json\neval_data: {gen: {files: [c.txt], split: all}}\nmodel: {arch: gpt2}\ncache_dir: cache\n",
        )
        .unwrap();
        resolve_paths(StageKind::Pretrain, &mut v, Path::new("/base/configs"));
        let out: Value = serde_yaml::from_str(
            "data: [/base/configs/a.txt, /base/configs/b.txt]\ntokenizer: /base/configs/t.json\neval_data: {gen: {files: [/base/configs/c.txt], split: all}}\nmodel: {arch: gpt2}\ncache_dir: /base/configs/cache\n",
        )
        .unwrap();
        assert_eq!(v, out, "only path keys change; `arch: gpt2` stays a value");
        let mut seen = Vec::new();
        visit_paths(
            StageKind::Pretrain,
            &mut v,
            Path::new("/"),
            &mut |found, at, s| seen.push((found, at.to_string(), s.clone())),
        );
        let at = |found, at: &str, s: &str| (found, at.to_string(), s.to_string());
        assert_eq!(
            seen,
            [
                at(Found::Input, "tokenizer", "/base/configs/t.json"),
                at(Found::Input, "data[0]", "/base/configs/a.txt"),
                at(Found::Input, "data[1]", "/base/configs/b.txt"),
                at(
                    Found::Input,
                    "eval_data.gen.files[0]",
                    "/base/configs/c.txt"
                ),
                at(Found::Cache, "cache_dir", "/base/configs/cache"),
            ]
        );
        assert_eq!(StageKind::Pretrain.volatile_keys(), ["cache_dir"]);
        assert_eq!(StageKind::parse("ppo"), Some(StageKind::Ppo));
        assert_eq!(normalize(Path::new("a/b/../c/./d")), Path::new("a/c/d"));
    }

    #[test]
    fn command_lines_hold_paths_only_where_a_file_exists() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("score.py"), "print(1)").unwrap();
        std::fs::create_dir(base.path().join("judge")).unwrap();
        let mut v: Value = serde_yaml::from_str(
            "rewards:\n  - {kind: length, min: 1, max: 2}\n  - {kind: command, command: [python3, score.py, judge, -v, --model=judge, not_there.py]}\n  - {kind: command, command: [bin/run.sh, \"print(1)\"], inputs: [extra.json]}\n  - {kind: lexicon, path: lex.txt}\n",
        )
        .unwrap();
        let mut seen = Vec::new();
        visit_paths(StageKind::Grpo, &mut v, base.path(), &mut |found, at, s| {
            seen.push((found, at.to_string(), s.clone()))
        });
        let at = |found, at: &str, s: &str| (found, at.to_string(), s.to_string());
        assert_eq!(
            seen,
            [
                at(Found::Input, "rewards[3].path", "lex.txt"),
                at(Found::Program, "rewards[1].command[0]", "python3"),
                at(Found::Input, "rewards[1].command[1]", "score.py"),
                at(Found::Input, "rewards[1].command[2]", "judge"),
                at(Found::Input, "rewards[2].command[0]", "bin/run.sh"),
                at(Found::Input, "rewards[2].inputs[0]", "extra.json"),
            ],
            "options, missing files and inline code stay values"
        );
        resolve_paths(StageKind::Ppo, &mut v, base.path());
        let command = &v["rewards"][1]["command"];
        assert_eq!(
            command[0],
            Value::from("python3"),
            "a PATH program stays a name"
        );
        assert_eq!(
            command[1],
            Value::from(base.path().join("score.py").to_str().unwrap())
        );
        assert_eq!(command[5], Value::from("not_there.py"));
        assert!(find_on_path("sh").is_some_and(|p| p.is_absolute()));
        assert_eq!(find_on_path("surely-no-such-program-here"), None);
    }
}
