//! Writes that a kill at any instant cannot leave half done: a file is written to a temporary
//! sibling, fsynced and renamed over the old one; a folder is staged beside its target and
//! swapped in by renames, so readers see the old version or the new one, never a mix.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

/// fsync a folder, so the renames inside it are durable.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn tmp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".{name}.{tag}"))
}

/// Replaces `path` with `bytes` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = tmp_sibling(path, &format!("tmp{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Some(parent) = parent {
        sync_dir(parent)?;
    }
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

pub fn write_yaml<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    write_atomic(path, serde_yaml::to_string(value)?.as_bytes())
}

/// fsyncs every file under `dir`, then `dir` itself.
pub fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    sync_dir(dir)
}

/// Swaps the complete folder `staged` in as `target`: `target` (if any) is renamed to
/// `retired`, `staged` to `target`, then `retired` is removed. A kill between the two renames
/// leaves the old folder under `retired`, which [`recover_dir`] puts back.
pub fn replace_dir(staged: &Path, target: &Path, retired: &Path) -> anyhow::Result<()> {
    if retired.exists() {
        std::fs::remove_dir_all(retired)
            .with_context(|| format!("removing {}", retired.display()))?;
    }
    if target.exists() {
        std::fs::rename(target, retired)
            .with_context(|| format!("moving {} aside", target.display()))?;
    }
    std::fs::rename(staged, target)
        .with_context(|| format!("moving {} into place", staged.display()))?;
    if let Some(parent) = target.parent() {
        sync_dir(parent)?;
    }
    if retired.exists() {
        std::fs::remove_dir_all(retired)
            .with_context(|| format!("removing {}", retired.display()))?;
    }
    Ok(())
}

/// After a kill in the middle of [`replace_dir`]: the old folder is put back where it was.
pub fn recover_dir(target: &Path, retired: &Path) -> anyhow::Result<()> {
    if !target.exists() && retired.exists() {
        std::fs::rename(retired, target)
            .with_context(|| format!("restoring {}", target.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_and_recover_restores() {
        let d = tempfile::tempdir().unwrap();
        let (staged, target, retired) =
            (d.path().join("s"), d.path().join("t"), d.path().join("r"));
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("f"), "old").unwrap();
        std::fs::create_dir(&staged).unwrap();
        write_atomic(&staged.join("f"), b"new").unwrap();
        replace_dir(&staged, &target, &retired).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), "new");
        assert!(!staged.exists() && !retired.exists());
        // Killed between the renames: target gone, the old one under retired.
        std::fs::rename(&target, &retired).unwrap();
        recover_dir(&target, &retired).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), "new");
    }
}
