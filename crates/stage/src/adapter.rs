//! Where an adapter checkpoint's base model lives, read from its files without loading
//! anything: the orchestrator hashes the base with the adapter (it is read with it), and the
//! model core loads it from here.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// temper's own pointer, written beside every adapter it saves.
pub const TEMPER_ADAPTER: &str = "temper_adapter.json";
/// PEFT's adapter config.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

#[derive(Deserialize)]
struct TemperPointer {
    /// The base's folder, relative to the adapter's.
    base: Option<PathBuf>,
}

#[derive(Deserialize)]
struct PeftPointer {
    base_model_name_or_path: Option<String>,
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The local folder of the base an adapter in `dir` applies to: temper's relative pointer,
/// else PEFT's `base_model_name_or_path` when that is a local folder (absolute, or relative
/// to the adapter's folder, then to the working directory). None for a full checkpoint, or
/// an adapter whose base is not a local folder (the loader says so).
pub fn adapter_base(dir: &Path) -> Option<PathBuf> {
    let pointer = read::<TemperPointer>(&dir.join(TEMPER_ADAPTER)).and_then(|p| p.base);
    let named = peft_base_name(dir);
    // Resolved through the file system, so `adapter/../../base` is seen to lie outside.
    pointer
        .map(|base| dir.join(base))
        .into_iter()
        .chain(named.iter().flat_map(|n| [dir.join(n), PathBuf::from(n)]))
        .find(|p| p.is_dir())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// PEFT's `base_model_name_or_path`, as written.
pub fn peft_base_name(dir: &Path) -> Option<String> {
    read::<PeftPointer>(&dir.join(ADAPTER_CONFIG))?.base_model_name_or_path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temper_pointer_first_then_peft_name_then_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (adapter, base) = (d.path().join("adapter"), d.path().join("base"));
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::create_dir_all(&base).unwrap();
        assert_eq!(
            adapter_base(&adapter),
            None,
            "no pointer: a full checkpoint"
        );
        let other = d.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        let peft = format!(r#"{{"base_model_name_or_path": "{}"}}"#, other.display());
        std::fs::write(adapter.join(ADAPTER_CONFIG), peft).unwrap();
        let real = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(adapter_base(&adapter), Some(real(&other)));
        std::fs::write(adapter.join(TEMPER_ADAPTER), r#"{"base": "../base"}"#).unwrap();
        assert_eq!(
            adapter_base(&adapter),
            Some(real(&base)),
            "temper's pointer first"
        );
        std::fs::write(adapter.join(TEMPER_ADAPTER), r#"{"base": "../gone"}"#).unwrap();
        assert_eq!(
            adapter_base(&adapter),
            Some(real(&other)),
            "a broken pointer: PEFT's name"
        );
        std::fs::write(
            adapter.join(ADAPTER_CONFIG),
            r#"{"base_model_name_or_path": "meta-llama/Llama-3-8B"}"#,
        )
        .unwrap();
        assert_eq!(adapter_base(&adapter), None, "a hub name is not a folder");
    }
}
