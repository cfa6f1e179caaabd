//! Where a data-parallel stage's ranks write.

use std::path::{Path, PathBuf};

use temper_stage::{StageError, StageFolder};

use super::World;

/// Where a data-parallel stage's ranks write: rank 0 claims the stage folder as a single
/// process would; the other ranks read its `state/` to resume from, and send their logs to a
/// scratch folder that is removed when they finish.
pub struct Ranks {
    /// The stage folder (every rank resumes from its `state/`; rank 0 alone writes it).
    pub out: PathBuf,
    /// Where this rank's metrics go: `out` for rank 0, scratch for the others.
    pub log_dir: PathBuf,
    main: bool,
    _folder: Option<StageFolder>,
}

impl Ranks {
    pub fn open(world: &World, out: &Path, kind: &str) -> std::result::Result<Self, StageError> {
        if world.is_main() {
            let folder = StageFolder::claim(out, kind)?;
            return Ok(Self {
                out: folder.path.clone(),
                log_dir: folder.path.clone(),
                main: true,
                _folder: Some(folder),
            });
        }
        let scratch = std::env::temp_dir().join(format!(
            "temper-{kind}-rank{}-{}",
            world.rank(),
            std::process::id()
        ));
        std::fs::create_dir_all(&scratch)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", scratch.display()))?;
        Ok(Self {
            out: out.to_path_buf(),
            log_dir: scratch,
            main: false,
            _folder: None,
        })
    }

    /// Runs `resume` (which reads `out/state/`, or another file rank 0 may write first) on
    /// rank 0 first — it may repair an interrupted save — and on the other ranks once it is
    /// done.
    pub fn resume<T, E: Into<anyhow::Error>>(
        &self,
        world: &World,
        resume: impl FnOnce(&Path) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, StageError> {
        if self.main {
            let out = resume(&self.out)?;
            world.barrier()?;
            Ok(out)
        } else {
            world.barrier()?;
            Ok(resume(&self.out)?)
        }
    }

    /// The loop's progress, shown and reported by rank 0; hidden on the others.
    pub fn progress(&self, total: u64, done: u64) -> temper_stage::StepProgress {
        temper_stage::StepProgress::new(self.main.then_some(self.out.as_path()), total, done)
    }

    /// Ends a rank other than 0: its scratch logs go.
    pub fn finish(self) -> std::result::Result<(), StageError> {
        if !self.main {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        Ok(())
    }
}
