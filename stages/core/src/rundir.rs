//! A stage's output folder (the stage contract in ARCHITECTURE.md):
//!
//! ```text
//! <out>/config.yaml      the resolved config       <out>/metrics.jsonl   one JSON object per log
//! <out>/checkpoint/      the final model           <out>/samples.jsonl   generations at evals
//! <out>/state/           resumable training state  <out>/summary.json    final metrics, status
//! ```
//!
//! `state/` is replaced atomically: written to `state.tmp/`, fsynced, then swapped in by
//! renames, so a kill at any instant leaves a complete state (the new one, or the previous one
//! under `state.old/`). Resuming trims metrics and samples logged after the saved step, so a
//! resumed run's files match an uninterrupted run's.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tch::nn::VarStore;
use tch::Tensor;

use crate::error::{CoreError, Result};
use crate::optim::AdamW;

const STATE_FORMAT: u32 = 1;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CoreError + '_ {
    move |source| CoreError::Io {
        path: path.into(),
        source,
    }
}

/// Progress of a run besides tensors: enough to continue exactly where it stopped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub format: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Wall time spent before this state was written, summed over resumed runs.
    pub elapsed_s: f64,
    /// Hash of the resolved config: a state is only resumed under the config that wrote it.
    pub config_hash: String,
    /// Stage-specific scalars (a KL coefficient, a prompt cursor, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, Value>,
}

pub struct RunDir {
    pub out: PathBuf,
    metrics: File,
    samples: Option<File>,
    started: Instant,
    elapsed_before: f64,
}

impl RunDir {
    pub fn create(out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        let metrics_path = out.join("metrics.jsonl");
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io_err(&metrics_path))?;
        Ok(Self {
            out: out.into(),
            metrics,
            samples: None,
            started: Instant::now(),
            elapsed_before: 0.0,
        })
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    fn state_dir(&self) -> PathBuf {
        self.out.join("state")
    }

    /// Seconds of training so far, across resumes.
    pub fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Appends one metrics line `{"step", "split", "time_s", ...fields}` and flushes it.
    pub fn log(&mut self, step: u64, split: &str, fields: &[(&str, f64)]) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), step.into());
        obj.insert("split".into(), split.into());
        obj.insert(
            "time_s".into(),
            ((self.elapsed() * 1000.0).round() / 1000.0).into(),
        );
        for (k, v) in fields {
            obj.insert((*k).into(), json_number(*v));
        }
        let path = self.out.join("metrics.jsonl");
        writeln!(self.metrics, "{}", Value::Object(obj)).map_err(io_err(&path))?;
        self.metrics.flush().map_err(io_err(&path))
    }

    /// Appends records to samples.jsonl.
    pub fn log_samples(&mut self, records: &[Value]) -> Result<()> {
        let path = self.out.join("samples.jsonl");
        if self.samples.is_none() {
            self.samples = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io_err(&path))?,
            );
        }
        let f = self.samples.as_mut().expect("opened above");
        for r in records {
            writeln!(f, "{r}").map_err(io_err(&path))?;
        }
        f.flush().map_err(io_err(&path))
    }

    /// Writes the resumable state atomically. `models` are saved as model0.safetensors,
    /// model1… (PPO passes actor and critic), optimizers likewise.
    pub fn save_state(
        &self,
        models: &[&VarStore],
        opts: &[&AdamW],
        progress: &Progress,
    ) -> Result<()> {
        let tmp = self.out.join("state.tmp");
        let old = self.out.join("state.old");
        let state = self.state_dir();
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        for (i, vs) in models.iter().enumerate() {
            Tensor::write_safetensors(&sorted_vars(vs), tmp.join(format!("model{i}.safetensors")))?;
        }
        for (i, opt) in opts.iter().enumerate() {
            Tensor::write_safetensors(
                &opt.state_tensors(),
                tmp.join(format!("optimizer{i}.safetensors")),
            )?;
        }
        let progress = Progress {
            format: STATE_FORMAT,
            elapsed_s: self.elapsed(),
            ..progress.clone()
        };
        let text = serde_json::to_vec_pretty(&progress).expect("progress serialises");
        std::fs::write(tmp.join("progress.json"), text).map_err(io_err(&tmp))?;
        for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
        }
        let _ = std::fs::remove_dir_all(&old);
        if state.exists() {
            std::fs::rename(&state, &old).map_err(io_err(&state))?;
        }
        std::fs::rename(&tmp, &state).map_err(io_err(&state))?;
        File::open(&self.out)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.out))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Loads the last complete state into `models` and `opts`, if there is one. A state written
    /// under another config is refused rather than silently mixed with this one.
    pub fn load_state(
        &mut self,
        models: &[&VarStore],
        opts: &mut [&mut AdamW],
        config_hash: &str,
    ) -> Result<Option<Progress>> {
        let mut dir = self.state_dir();
        if !dir.join("progress.json").exists() {
            dir = self.out.join("state.old"); // killed between the two renames
            if !dir.join("progress.json").exists() {
                return Ok(None);
            }
        }
        let path = dir.join("progress.json");
        let progress: Progress = serde_json::from_slice(
            &std::fs::read(&path).map_err(io_err(&path))?,
        )
        .map_err(|source| CoreError::Json {
            path: path.clone(),
            source,
        })?;
        if progress.config_hash != config_hash {
            return Err(CoreError::InvalidModel(format!(
                "{} was written under a different config; delete it to start over, or restore that config to resume",
                dir.display()
            )));
        }
        for (i, vs) in models.iter().enumerate() {
            let file = dir.join(format!("model{i}.safetensors"));
            let saved: BTreeMap<String, Tensor> =
                Tensor::read_safetensors(&file)?.into_iter().collect();
            tch::no_grad(|| -> Result<()> {
                for (name, mut var) in vs.variables() {
                    let src = saved.get(&name).ok_or_else(|| {
                        CoreError::InvalidModel(format!("{}: state lacks `{name}`", file.display()))
                    })?;
                    var.f_copy_(src)?;
                }
                Ok(())
            })?;
        }
        for (i, opt) in opts.iter_mut().enumerate() {
            let saved: BTreeMap<String, Tensor> =
                Tensor::read_safetensors(dir.join(format!("optimizer{i}.safetensors")))?
                    .into_iter()
                    .collect();
            opt.load_state(&saved)?;
        }
        self.elapsed_before = progress.elapsed_s;
        self.started = Instant::now();
        trim_jsonl(&self.out.join("metrics.jsonl"), progress.step)?;
        trim_jsonl(&self.out.join("samples.jsonl"), progress.step)?;
        let metrics_path = self.out.join("metrics.jsonl");
        self.metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io_err(&metrics_path))?;
        self.samples = None;
        Ok(Some(progress))
    }

    /// The progress to continue from: the saved state's (loaded into `models` and `opts`), or a
    /// fresh start, which drops the metrics and samples of an earlier, unresumable run.
    pub fn resume_or_start(
        &mut self,
        models: &[&VarStore],
        opts: &mut [&mut AdamW],
        config_hash: &str,
    ) -> Result<Progress> {
        match self.load_state(models, opts, config_hash)? {
            Some(p) => {
                tracing::info!("resuming from step {}", p.step);
                Ok(p)
            }
            None => {
                self.reset_logs()?;
                Ok(Progress {
                    config_hash: config_hash.into(),
                    ..Default::default()
                })
            }
        }
    }

    /// Starts a run from scratch: drops metrics and samples of an earlier, unresumable run.
    pub fn reset_logs(&mut self) -> Result<()> {
        for name in ["metrics.jsonl", "samples.jsonl"] {
            let p = self.out.join(name);
            if p.exists() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        let metrics_path = self.out.join("metrics.jsonl");
        self.metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io_err(&metrics_path))?;
        self.samples = None;
        Ok(())
    }

    /// Writes the final model to `checkpoint/` with the tokenizer it was trained with, so the
    /// folder is a complete Hugging Face checkpoint for the next stage.
    pub fn save_final(
        &self,
        model: &crate::Transformer,
        vs: &VarStore,
        tokenizer: &Path,
    ) -> Result<PathBuf> {
        let dir = self.checkpoint_dir();
        crate::save_checkpoint(model, vs, &dir)?;
        let dst = dir.join("tokenizer.json");
        std::fs::copy(tokenizer, &dst).map_err(io_err(&dst))?;
        Ok(dir)
    }

    /// The summary fields every training stage reports: steps, tokens and mean tokens/s.
    pub fn summary_base(&self, progress: &Progress) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("steps".into(), progress.step.into());
        m.insert("tokens".into(), progress.tokens_seen.into());
        m.insert(
            "tokens_per_s".into(),
            (progress.tokens_seen as f64 / self.elapsed()).into(),
        );
        m
    }

    /// Writes summary.json (atomically) with the stage's final numbers.
    pub fn write_summary(&self, status: &str, fields: Map<String, Value>) -> Result<()> {
        let mut obj = fields;
        obj.insert("status".into(), status.into());
        obj.insert("wall_time_s".into(), self.elapsed().into());
        let path = self.out.join("summary.json");
        let tmp = self.out.join(".summary.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&Value::Object(obj)).expect("summary serialises"),
        )
        .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}

fn sorted_vars(vs: &VarStore) -> Vec<(String, Tensor)> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    vars.into_iter()
        .map(|(k, t)| (k, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect()
}

/// Non-finite numbers have no JSON form; they are logged as null.
fn json_number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Keeps the lines of a JSONL file whose `step` is at most `step`.
fn trim_jsonl(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let file = File::open(path).map_err(io_err(path))?;
    let kept: Vec<String> = BufReader::new(file)
        .lines()
        .map_while(std::result::Result::ok)
        .filter(|line| {
            serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A stable hash of a resolved config, for [`Progress::config_hash`].
pub fn config_hash<T: Serialize>(config: &T) -> String {
    let text = serde_json::to_string(config).expect("configs serialise");
    // FNV-1a: stable across builds and platforms, and plenty to tell configs apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
