//! A stage folder: the one place a stage writes, marked as temper's and locked while in use.
//!
//! temper only writes into, and only ever deletes, folders that carry its marker
//! (`.temper-stage`, with a format number). A stage claims its `--out`: a new or empty folder
//! becomes a stage folder; a marked one is reused (and resumed); anything else is refused. The
//! claim holds an exclusive lock (flock) on the folder's lock file for the life of the process,
//! so two writers on one folder are impossible, and a process that dies (even by SIGKILL)
//! releases it.

use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exit::{invalid, StageError};

pub const MARKER: &str = ".temper-stage";
pub const LOCK: &str = ".temper-stage.lock";
pub const MARKER_FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    format: u32,
    kind: String,
}

/// A claimed, locked stage folder; the lock is released when this is dropped (or the process
/// ends).
pub struct StageFolder {
    pub path: PathBuf,
    _lock: File,
}

/// Whether `path` carries temper's marker.
pub fn is_stage_folder(path: &Path) -> bool {
    path.join(MARKER).is_file()
}

/// Ok when `path` may become or be used as a stage folder: missing, empty, or marked with a
/// format this temper reads. Writes nothing.
pub fn check(path: &Path) -> Result<(), StageError> {
    if !path.exists() {
        return Ok(());
    }
    if !path.is_dir() {
        return Err(invalid(anyhow::anyhow!(
            "--out {} is a file, not a folder",
            path.display()
        )));
    }
    let marker = path.join(MARKER);
    if !marker.exists() {
        let empty = std::fs::read_dir(path)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if empty {
            return Ok(());
        }
        return Err(invalid(anyhow::anyhow!(
            "{} holds files temper did not write (no {MARKER} marker): temper never writes into such a folder; pass an empty or new folder",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(&marker).unwrap_or_default();
    match serde_json::from_str::<Marker>(&text) {
        Ok(m) if m.format == MARKER_FORMAT => Ok(()),
        Ok(m) => Err(invalid(anyhow::anyhow!(
            "{}: stage folder format {} (this temper reads {MARKER_FORMAT}); use the temper that wrote it, or a new folder",
            marker.display(),
            m.format
        ))),
        Err(e) => Err(invalid(anyhow::anyhow!(
            "{}: unreadable marker ({e}); if this is a temper stage folder, delete the marker's folder by hand or use a new one",
            marker.display()
        ))),
    }
}

/// The pid holding `path`'s lock, if a live process holds it.
pub fn holder(path: &Path) -> Option<u32> {
    let f = File::options()
        .read(true)
        .write(true)
        .open(path.join(LOCK))
        .ok()?;
    match f.try_lock() {
        Ok(()) => None, // released when `f` drops
        Err(TryLockError::WouldBlock) => std::fs::read_to_string(path.join(LOCK))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .or(Some(0)),
        Err(TryLockError::Error(_)) => None,
    }
}

impl StageFolder {
    /// Claims `path` for a stage of `kind`: creates it and its marker if needed, and locks it.
    pub fn claim(path: &Path, kind: &str) -> Result<Self, StageError> {
        check(path)?;
        std::fs::create_dir_all(path)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        let marker = path.join(MARKER);
        if !marker.exists() {
            crate::atomic::write_json(
                &marker,
                &Marker {
                    format: MARKER_FORMAT,
                    kind: kind.into(),
                },
            )?;
        }
        let lock_path = path.join(LOCK);
        let mut lock = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(invalid(anyhow::anyhow!(
                    "{} is in use by another process (pid {}): two runs never write one folder; wait for it or stop it",
                    path.display(),
                    pid.trim()
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(anyhow::anyhow!("locking {}: {e}", lock_path.display()).into())
            }
        }
        lock.set_len(0)
            .and_then(|_| write!(lock, "{}", std::process::id()))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", lock_path.display()))?;
        Ok(Self {
            path: path.into(),
            _lock: lock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_new_and_marked_folders_and_refuses_others() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let f = StageFolder::claim(&out, "sft").unwrap();
        assert!(is_stage_folder(&out));
        // A second claim while the first holds the lock is refused (exit 2).
        let e = StageFolder::claim(&out, "sft").err().unwrap();
        assert_eq!(e.code, crate::EXIT_INVALID);
        assert!(e.to_string().contains("in use by another process"), "{e}");
        assert_eq!(holder(&out), Some(std::process::id()));
        drop(f);
        assert_eq!(holder(&out), None);
        StageFolder::claim(&out, "sft").unwrap();

        let user = d.path().join("mine");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("notes.txt"), "mine").unwrap();
        let e = StageFolder::claim(&user, "sft").err().unwrap();
        assert!(
            e.to_string().contains("holds files temper did not write"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(user.join("notes.txt")).unwrap(),
            "mine"
        );
        assert!(!user.join(MARKER).exists());
    }
}
