//! The stage contract's file side, shared by every stage binary (see ARCHITECTURE.md):
//! typed YAML configs whose errors name the key and line, the resolved config saved beside the
//! outputs, and JSON written atomically.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{DataError, Result};

/// Reads a stage config. Unknown keys, wrong types and missing fields are errors naming the
/// file, the key and its line (serde's `deny_unknown_fields` on the config structs).
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(DataError::io(path))?;
    serde_yaml::from_str(&text).map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))
}

/// Writes `value` as YAML (the resolved config, with every default filled in).
pub fn write_yaml<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_yaml::to_string(value)
        .map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))?;
    write_atomic(path, &text)
}

/// Write to a temporary sibling, fsync, rename: readers see the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(DataError::io(&tmp))?;
    f.write_all(bytes).map_err(DataError::io(&tmp))?;
    f.sync_all().map_err(DataError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(DataError::io(path))
}
