//! Stage configs: typed, read from YAML with every error naming the file, the line and the key.
//!
//! Relative paths in a config are relative to the config file's folder (only the keys
//! [`crate::kinds`] declares as paths are resolved). The config's hash is taken as written,
//! before that resolution and without cache locations, so a project moved or copied as a whole
//! still resumes its stages' states.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml::Value;

use crate::exit::{invalid, StageError};
use crate::kinds::{resolve_paths, StageKind};
use crate::yaml_lines::{duplicate_at, line_of, path_at};

/// A problem with one config value: exit 2, one line, naming where to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted key path, when the problem is one key's.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(k) = &self.field {
            write!(f, ": field `{k}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A parsed stage config with what error messages and resumption need.
pub struct ConfigFile<T> {
    pub value: T,
    /// The stage kind it configures.
    pub kind: StageKind,
    pub path: PathBuf,
    pub text: String,
    /// BLAKE3 of the config as written, cache keys left out: a state is resumed only under
    /// the config that wrote it.
    pub hash: String,
}

impl<T: DeserializeOwned + Serialize> ConfigFile<T> {
    /// Reads and parses `path` as the config of a `kind` stage.
    pub fn load(path: &Path, kind: StageKind) -> Result<Self, StageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(anyhow::anyhow!("config {}: {e}", path.display())))?;
        let at = |e: serde_yaml::Error| {
            let line = e.location().map(|l| l.line());
            let message = e.to_string();
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_string();
            // A key given twice is reported where its mapping starts: name the second one.
            let twice = message
                .split_once("duplicate field `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .and_then(|(k, _)| line.and_then(|l| duplicate_at(&text, l, k)));
            if let Some((second, keys)) = twice {
                return FieldError {
                    file: path.into(),
                    line: Some(second),
                    field: Some(keys.join(".")),
                    message: "given twice in one mapping: keep one".into(),
                };
            }
            // An unknown key names itself; otherwise the deepest key on the error's line.
            let unknown = message
                .split_once("unknown field `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(k, _)| k.to_string());
            let field = line
                .and_then(|l| path_at(&text, l, unknown.as_deref()))
                .map(|p| p.join("."));
            // serde_yaml prefixes nested errors with their path; the field is named anyway.
            let message = match message.split_once(": ") {
                Some((prefix, rest)) if field.as_deref().is_some_and(|f| f.starts_with(prefix)) => {
                    rest.to_string()
                }
                _ => message,
            };
            FieldError {
                file: path.into(),
                line,
                field,
                message,
            }
        };
        // Parse from the text first, so type errors carry their line.
        serde_yaml::from_str::<T>(&text).map_err(|e| invalid(at(e)))?;
        let mut raw: Value = serde_yaml::from_str(&text).map_err(|e| invalid(at(e)))?;
        let mut hashed = raw.clone();
        if let Value::Mapping(m) = &mut hashed {
            for key in kind.volatile_keys() {
                m.remove(key);
            }
        }
        let canonical = serde_json::to_string(&hashed).map_err(invalid)?;
        let hash = blake3::hash(canonical.as_bytes()).to_hex()[..16].to_string();
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        resolve_paths(kind, &mut raw, &base);
        let value = serde_yaml::from_value(raw).map_err(|e| invalid(at(e)))?;
        // The config type's path fields and kinds.rs must agree, or the cache could miss an
        // input: a bug in temper, not in the config, so it is not exit 2.
        crate::paths::check_declared(kind, &value)
            .map_err(|e| anyhow::anyhow!("internal error: {e}; please report it"))?;
        Ok(Self {
            value,
            kind,
            path: path.into(),
            text,
            hash,
        })
    }
}

impl<T> ConfigFile<T> {
    /// An error about `field` (dotted path), naming its line in the config.
    pub fn error(&self, field: &str, message: impl fmt::Display) -> StageError {
        let parts: Vec<&str> = field.split('.').collect();
        invalid(FieldError {
            file: self.path.clone(),
            line: line_of(&self.text, &parts),
            field: Some(field.into()),
            message: message.to_string(),
        })
    }

    /// Fails with [`Self::error`] unless `ok`.
    pub fn ensure(
        &self,
        ok: bool,
        field: &str,
        message: impl fmt::Display,
    ) -> Result<(), StageError> {
        if ok {
            Ok(())
        } else {
            Err(self.error(field, message))
        }
    }
}

impl<T: Serialize> ConfigFile<T> {
    /// `--validate`'s output: the resolved config, every default filled in.
    pub fn print_resolved(&self) -> Result<(), StageError> {
        let text = serde_yaml::to_string(&self.value).map_err(anyhow::Error::from)?;
        println!("{text}");
        Ok(())
    }

    /// Saves the resolved config beside the outputs, as `config.yaml`.
    pub fn write_resolved(&self, out: &Path) -> Result<(), StageError> {
        crate::atomic::write_yaml(&out.join("config.yaml"), &self.value)?;
        Ok(())
    }
}

/// Checks a value lies in a range; the message says which and what was given.
pub fn in_range<N: PartialOrd + fmt::Display + Copy>(value: N, lo: N, hi: N) -> Result<(), String> {
    if value >= lo && value <= hi {
        Ok(())
    } else {
        Err(format!("must be in [{lo}, {hi}], got {value}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        data: crate::InputPath,
        steps: u64,
        #[serde(default)]
        optim: Optim,
    }
    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Optim {
        #[serde(default)]
        lr: f64,
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("c.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "data: x.txt\nsteps: 3\noptim:\n  lrr: 1\n");
        let e = ConfigFile::<Cfg>::load(&p, StageKind::Sft).err().unwrap();
        assert_eq!(e.code, crate::EXIT_INVALID);
        let msg = e.to_string();
        assert!(msg.contains("c.yaml:4: field `optim.lrr`: "), "{msg}");
        assert!(msg.contains("unknown field `lrr`"), "{msg}");

        let p = write(dir.path(), "data: x.txt\nsteps: -3\n");
        let msg = ConfigFile::<Cfg>::load(&p, StageKind::Sft)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("c.yaml:2: field `steps`"), "{msg}");
    }

    #[test]
    fn relative_paths_resolve_against_the_file_and_the_hash_ignores_where_it_is() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let text = "data: ../d/x.txt\nsteps: 3\n";
        let ca = ConfigFile::<Cfg>::load(&write(a.path(), text), StageKind::Sft).unwrap();
        let cb = ConfigFile::<Cfg>::load(&write(b.path(), text), StageKind::Sft).unwrap();
        assert_eq!(
            ca.value.data.as_path(),
            a.path().parent().unwrap().join("d/x.txt")
        );
        assert_eq!(ca.hash, cb.hash, "same config as written, same hash");
        let e = ca.error("optim.lr", "must be positive");
        assert!(
            e.to_string()
                .ends_with("c.yaml: field `optim.lr`: must be positive"),
            "{e}"
        );
        let cc = ConfigFile::<Cfg>::load(
            &write(a.path(), "data: ../d/x.txt\nsteps: 4\n"),
            StageKind::Sft,
        )
        .unwrap();
        assert_ne!(ca.hash, cc.hash);
    }
}
