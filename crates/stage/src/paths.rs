//! The path fields of stage configs, typed where they are declared: an [`InputPath`] is read
//! by the stage (its content is part of the cache key), a [`CachePath`] holds reusable work
//! (never part of the key), a [`CommandLine`] is a program with its arguments (the program
//! and the arguments naming files are inputs). [`crate::kinds`] says where each kind's
//! configs hold them, for the orchestrator, which reads configs as plain YAML;
//! [`check_declared`] proves the two agree every time a stage reads its config, so a path
//! field that a new stage or reward kind adds cannot be left out of the cache key unnoticed.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::kinds::{PathRole, StageKind};

thread_local! {
    /// While set, the path types serialize as `{"$input": …}` etc., so a config's path
    /// fields can be found by position (see [`check_declared`]).
    static MARKING: Cell<bool> = const { Cell::new(false) };
}

const INPUT: &str = "$input";
const CACHE: &str = "$cache";
const COMMAND: &str = "$command";

fn marked<S: Serializer, T: Serialize + ?Sized>(
    s: S,
    tag: &str,
    value: &T,
) -> Result<S::Ok, S::Error> {
    if MARKING.with(Cell::get) {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(tag, value)?;
        m.end()
    } else {
        value.serialize(s)
    }
}

macro_rules! path_type {
    ($(#[$doc:meta])* $name:ident, $tag:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(transparent)]
        pub struct $name(PathBuf);

        impl $name {
            pub fn as_path(&self) -> &Path {
                &self.0
            }
            pub fn into_path_buf(self) -> PathBuf {
                self.0
            }
        }

        impl Deref for $name {
            type Target = Path;
            fn deref(&self) -> &Path {
                &self.0
            }
        }

        impl AsRef<Path> for $name {
            fn as_ref(&self) -> &Path {
                &self.0
            }
        }

        impl From<PathBuf> for $name {
            fn from(p: PathBuf) -> Self {
                Self(p)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                marked(s, $tag, &self.0)
            }
        }
    };
}

path_type!(
    /// A file or folder the stage reads: hashed by content into its cache key.
    InputPath,
    INPUT
);
path_type!(
    /// Where the stage keeps reusable work: not part of its cache key.
    CachePath,
    CACHE
);

/// A program and its arguments (`[python3, score.py]`). The program (the file `PATH` finds for
/// a bare name) and every argument naming an existing file or folder are inputs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct CommandLine(pub Vec<String>);

impl Deref for CommandLine {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl Serialize for CommandLine {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        marked(s, COMMAND, &self.0)
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// Where the config's typed path fields are: (position like `rewards[1].path`, role).
fn typed_positions(config: &impl Serialize) -> Result<Vec<(String, PathRole)>, String> {
    MARKING.with(|m| m.set(true));
    let value = serde_json::to_value(config);
    MARKING.with(|m| m.set(false));
    let value = value.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    walk(&value, String::new(), &mut out);
    Ok(out)
}

fn walk(v: &Value, at: String, out: &mut Vec<(String, PathRole)>) {
    match v {
        Value::Object(m) if m.len() == 1 => {
            let (k, inner) = m.iter().next().expect("one entry");
            let role = match k.as_str() {
                INPUT => Some(PathRole::Input),
                CACHE => Some(PathRole::Cache),
                COMMAND => Some(PathRole::Command),
                _ => None,
            };
            match role {
                Some(role) => out.push((at, role)),
                None => walk(inner, join(&at, k), out),
            }
        }
        Value::Object(m) => m.iter().for_each(|(k, v)| walk(v, join(&at, k), out)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// Whether a position (`eval_data.held.files[0]`) lies at a kinds.rs pattern
/// (`eval_data.*.files`): list indices are where a pattern's lists are walked.
pub fn at_pattern(position: &str, pattern: &str) -> bool {
    let bare: String = position
        .split('.')
        .map(|part| part.split('[').next().unwrap_or(part))
        .collect::<Vec<_>>()
        .join(".");
    let (p, a): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), bare.split('.').collect());
    p.len() == a.len() && p.iter().zip(&a).all(|(p, a)| *p == "*" || p == a)
}

/// Checks that the path fields of a `kind` config's type are exactly where kinds.rs says:
/// every typed path at a declared pattern of its role, and every declared pattern holding a
/// value in this config typed as a path. An error names the field and what to change.
pub fn check_declared(kind: StageKind, config: &impl Serialize) -> Result<(), String> {
    let typed = typed_positions(config)?;
    for (position, role) in &typed {
        let declared = kind
            .paths()
            .iter()
            .any(|(pattern, r)| r == role && at_pattern(position, pattern));
        if !declared {
            return Err(format!(
                "`{position}` is typed as {} in the {kind} config, but crates/stage/src/kinds.rs does not declare it as one for {kind}: the cache key would not see it",
                role.describe()
            ));
        }
    }
    // The other way: a declared pattern that a plain value fills.
    MARKING.with(|m| m.set(false));
    let plain = serde_json::to_value(config).map_err(|e| e.to_string())?;
    let mut strings = Vec::new();
    strings_with_positions(&plain, String::new(), &mut strings);
    for (pattern, role) in kind.paths() {
        for position in strings.iter().filter(|p| at_pattern(p, pattern)) {
            let is_typed = typed.iter().any(|(t, _)| {
                position == t
                    || (*role == PathRole::Command && position.starts_with(&format!("{t}[")))
            });
            if !is_typed {
                return Err(format!(
                    "crates/stage/src/kinds.rs declares `{pattern}` of {kind} as {}, but `{position}` is a plain value in its config type",
                    role.describe()
                ));
            }
        }
    }
    Ok(())
}

fn strings_with_positions(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::String(_) => out.push(at),
        Value::Object(m) => m
            .iter()
            .for_each(|(k, v)| strings_with_positions(v, join(&at, k), out)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings_with_positions(item, format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    struct Eval {
        files: Vec<InputPath>,
    }

    #[derive(Serialize)]
    struct Pretrain {
        tokenizer: InputPath,
        data: Vec<InputPath>,
        init: Option<InputPath>,
        eval_data: BTreeMap<String, Eval>,
        cache_dir: Option<CachePath>,
        block_size: usize,
    }

    fn pretrain() -> Pretrain {
        let p = |s: &str| InputPath::from(PathBuf::from(s));
        Pretrain {
            tokenizer: p("t.json"),
            data: vec![p("a.txt"), p("b.txt")],
            init: None,
            eval_data: [(
                "held".to_string(),
                Eval {
                    files: vec![p("c.txt")],
                },
            )]
            .into(),
            cache_dir: Some(CachePath::from(PathBuf::from("cache"))),
            block_size: 64,
        }
    }

    #[test]
    fn typed_paths_are_found_by_position_and_serialize_plainly_otherwise() {
        let got = typed_positions(&pretrain()).unwrap();
        let want = [
            ("cache_dir", PathRole::Cache),
            ("data[0]", PathRole::Input),
            ("data[1]", PathRole::Input),
            ("eval_data.held.files[0]", PathRole::Input),
            ("tokenizer", PathRole::Input),
        ];
        let want: Vec<(String, PathRole)> = want.iter().map(|(p, r)| (p.to_string(), *r)).collect();
        assert_eq!(got, want);
        let plain = serde_json::to_value(pretrain()).unwrap();
        assert_eq!(
            plain["tokenizer"], "t.json",
            "a plain string outside the check"
        );
        assert!(at_pattern("eval_data.held.files[0]", "eval_data.*.files"));
        assert!(!at_pattern("eval_data.held", "eval_data.*.files"));
        check_declared(StageKind::Pretrain, &pretrain()).unwrap();
    }

    #[test]
    fn a_path_field_kinds_rs_does_not_declare_or_a_declared_plain_value_is_named() {
        #[derive(Serialize)]
        struct Undeclared {
            init: InputPath,
            data: InputPath,
            vocab: InputPath,
        }
        let p = |s: &str| InputPath::from(PathBuf::from(s));
        let e = check_declared(
            StageKind::Sft,
            &Undeclared {
                init: p("m"),
                data: p("d"),
                vocab: p("v.txt"),
            },
        )
        .unwrap_err();
        assert!(
            e.contains("`vocab` is typed as an input path in the sft config"),
            "{e}"
        );

        #[derive(Serialize)]
        struct Plain {
            init: InputPath,
            data: String,
        }
        let e = check_declared(
            StageKind::Sft,
            &Plain {
                init: p("m"),
                data: "d.jsonl".into(),
            },
        )
        .unwrap_err();
        assert!(
            e.contains("declares `data` of sft as an input path, but `data` is a plain value"),
            "{e}"
        );
    }

    #[test]
    fn a_command_line_is_one_typed_position() {
        #[derive(Serialize)]
        struct Reward {
            kind: &'static str,
            command: CommandLine,
            inputs: Vec<InputPath>,
        }
        #[derive(Serialize)]
        struct Grpo {
            policy: InputPath,
            prompts: InputPath,
            rewards: Vec<Reward>,
        }
        let g = Grpo {
            policy: InputPath::from(PathBuf::from("m")),
            prompts: InputPath::from(PathBuf::from("p.jsonl")),
            rewards: vec![Reward {
                kind: "command",
                command: CommandLine(vec!["python3".into(), "score.py".into()]),
                inputs: vec![],
            }],
        };
        check_declared(StageKind::Grpo, &g).unwrap();
        let got = typed_positions(&g).unwrap();
        assert!(got.contains(&("rewards[0].command".to_string(), PathRole::Command)));
    }
}
