//! `-o stage.key=value` on the command line, applied to a stage's parameters.

use serde_yaml::{Mapping, Value};

use super::Stage;

/// Applies one `-o stage.key=value` override (value parsed as YAML; `key` may be dotted) to
/// the stage written as `stage` (every branch of it).
pub(super) fn apply_override(stages: &mut [Stage], spec: &str) -> anyhow::Result<()> {
    let bad = || anyhow::anyhow!("override `{spec}`: expected stage.key=value");
    let (lhs, value) = spec.split_once('=').ok_or_else(bad)?;
    let (stage, key) = lhs.split_once('.').ok_or_else(bad)?;
    let value: Value =
        serde_yaml::from_str(value).map_err(|e| anyhow::anyhow!("override `{spec}`: {e}"))?;
    let mut found = false;
    for st in stages.iter_mut().filter(|s| s.group == stage) {
        set_dotted(&mut st.params, key, value.clone())
            .map_err(|e| anyhow::anyhow!("override `{spec}`: {e}"))?;
        found = true;
    }
    anyhow::ensure!(found, "override `{spec}`: no stage `{stage}`");
    Ok(())
}

/// Sets `a.b.c` in `map`, creating the mappings on the way.
pub fn set_dotted(map: &mut Mapping, key: &str, value: Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut map = map;
    for part in &parts[..parts.len() - 1] {
        let entry = map
            .entry(Value::from(*part))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        map = entry
            .as_mapping_mut()
            .ok_or_else(|| format!("`{part}` is not a mapping"))?;
    }
    map.insert(Value::from(parts[parts.len() - 1]), value);
    Ok(())
}
