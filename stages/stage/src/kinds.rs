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
}

/// What a path parameter is to the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRole {
    /// Read by the stage: its content is part of the stage's cache key.
    Input,
    /// Where the stage keeps reusable work (a token cache): never hashed, and not part of the
    /// key, since where a cache lives cannot change a result.
    Cache,
}

impl StageKind {
    pub const ALL: [StageKind; 9] = [
        StageKind::Tokenizer,
        StageKind::Pretrain,
        StageKind::Sft,
        StageKind::Reward,
        StageKind::Ppo,
        StageKind::Dpo,
        StageKind::Grpo,
        StageKind::Merge,
        StageKind::Eval,
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
            StageKind::Sft | StageKind::Reward => {
                &[("init", Input), ("data", Input), ("eval_data", Input)]
            }
            StageKind::Ppo => &[
                ("policy", Input),
                ("reward_model", Input),
                ("prompts", Input),
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
            ],
            StageKind::Merge => &[("adapter", Input)],
            StageKind::Eval => &[
                ("policies.*", Input),
                ("reference", Input),
                ("reward_model", Input),
                ("prompts", Input),
                ("lexicon", Input),
            ],
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

/// Calls `f(dotted key path, string)` for every string at a position `pattern` matches.
pub fn visit_pattern(value: &mut Value, pattern: &str, f: &mut dyn FnMut(&str, &mut String)) {
    let parts: Vec<&str> = pattern.split('.').collect();
    visit(value, &parts, String::new(), f);
}

fn visit(value: &mut Value, parts: &[&str], at: String, f: &mut dyn FnMut(&str, &mut String)) {
    match value {
        Value::Sequence(items) => {
            for item in items {
                visit(item, parts, at.clone(), f);
            }
        }
        Value::String(s) if parts.is_empty() => f(&at, s),
        Value::Mapping(m) if !parts.is_empty() => {
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

/// Makes the kind's relative path parameters absolute against `base` (the config file's
/// folder), in place.
pub fn resolve_paths(kind: StageKind, config: &mut Value, base: &Path) {
    for (pattern, _) in kind.paths() {
        visit_pattern(config, pattern, &mut |_, s| {
            if !s.is_empty() && Path::new(s.as_str()).is_relative() {
                *s = normalize(&base.join(s.as_str()))
                    .to_string_lossy()
                    .into_owned();
            }
        });
    }
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
        visit_pattern(&mut v, "eval_data.*.files", &mut |k, s| {
            seen.push((k.to_string(), s.clone()))
        });
        assert_eq!(
            seen,
            [(
                "eval_data.gen.files".to_string(),
                "/base/configs/c.txt".to_string()
            )]
        );
        assert_eq!(StageKind::Pretrain.volatile_keys(), ["cache_dir"]);
        assert_eq!(StageKind::parse("ppo"), Some(StageKind::Ppo));
        assert_eq!(normalize(Path::new("a/b/../c/./d")), Path::new("a/c/d"));
    }
}
