//! Input paths a stage checks before doing anything. Under `--validate --pending P` a path at
//! or below P is one an upstream stage will produce: it is not required to exist yet, and
//! checks that need its content are skipped (the run checks them again when it starts).

use std::path::{Path, PathBuf};

use crate::config::ConfigFile;
use crate::exit::StageError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Present,
    /// Not there yet; an upstream stage will write it.
    Pending,
}

pub struct Inputs {
    pending: Vec<PathBuf>,
    /// The fields whose paths were pending, in the order checked.
    pending_fields: Vec<String>,
}

impl Inputs {
    pub fn new(pending: &[PathBuf]) -> Self {
        Self {
            pending: pending
                .iter()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                .collect(),
            pending_fields: Vec::new(),
        }
    }

    fn is_pending(&self, path: &Path) -> bool {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let abs = crate::kinds::normalize(&abs);
        self.pending.iter().any(|p| abs.starts_with(p))
    }

    /// Whether some input checked so far is pending: content checks must wait for the run.
    pub fn any_pending(&self) -> bool {
        !self.pending_fields.is_empty()
    }

    /// The fields whose paths an upstream stage will write.
    pub fn pending_fields(&self) -> &[String] {
        &self.pending_fields
    }

    fn pend(&mut self, field: &str) -> Availability {
        if !self.pending_fields.iter().any(|f| f == field) {
            self.pending_fields.push(field.to_string());
        }
        Availability::Pending
    }

    /// A file the stage reads.
    pub fn file<T>(
        &mut self,
        cfg: &ConfigFile<T>,
        field: &str,
        path: &Path,
    ) -> Result<Availability, StageError> {
        self.present(cfg, field, path, Path::is_file, "is not a file")
    }

    /// A file or a folder the stage reads, whichever it is.
    pub fn path<T>(
        &mut self,
        cfg: &ConfigFile<T>,
        field: &str,
        path: &Path,
    ) -> Result<Availability, StageError> {
        self.present(cfg, field, path, Path::exists, "")
    }

    /// Pending, present when `right`, or refused: "not found", or `wrong` when it exists but
    /// is not what the stage reads.
    fn present<T>(
        &mut self,
        cfg: &ConfigFile<T>,
        field: &str,
        path: &Path,
        right: fn(&Path) -> bool,
        wrong: &str,
    ) -> Result<Availability, StageError> {
        // Pending wins over an old copy on disk: the upstream stage is about to replace it.
        if self.is_pending(path) {
            return Ok(self.pend(field));
        }
        if right(path) {
            return Ok(Availability::Present);
        }
        let why = if path.exists() { wrong } else { "not found" };
        Err(cfg.error(field, format!("{} {why}", path.display())))
    }

    /// A folder that must hold `files` (a checkpoint: config.json, model.safetensors, …).
    pub fn folder<T>(
        &mut self,
        cfg: &ConfigFile<T>,
        field: &str,
        path: &Path,
        files: &[&str],
    ) -> Result<Availability, StageError> {
        if self.is_pending(path) {
            return Ok(self.pend(field));
        }
        if !path.is_dir() {
            return Err(cfg.error(field, format!("{} is not a folder", path.display())));
        }
        for f in files {
            if !path.join(f).exists() {
                return Err(cfg.error(field, format!("{} lacks {f}", path.display())));
            }
        }
        Ok(Availability::Present)
    }

    /// A model checkpoint: a full one (config.json, model.safetensors or a sharded index) or a PEFT adapter
    /// (adapter_config.json, adapter_model.safetensors), with tokenizer.json when `tokenizer`.
    pub fn checkpoint<T>(
        &mut self,
        cfg: &ConfigFile<T>,
        field: &str,
        path: &Path,
        tokenizer: bool,
    ) -> Result<Availability, StageError> {
        let weights: &[&str] = if path.join("adapter_config.json").exists() {
            &["adapter_config.json", "adapter_model.safetensors"]
        } else if !path.join("model.safetensors").exists()
            && path.join("model.safetensors.index.json").exists()
        {
            // Sharded: the loader checks the shards the index lists.
            &["config.json", "model.safetensors.index.json"]
        } else {
            &["config.json", "model.safetensors"]
        };
        let tok: &[&str] = if tokenizer { &["tokenizer.json"] } else { &[] };
        let files: Vec<&str> = weights.iter().chain(tok).copied().collect();
        self.folder(cfg, field, path, &files)
    }
}
