//! The resumable training state in a stage folder (the stage contract in ARCHITECTURE.md):
//!
//! ```text
//! <out>/state/model0.safetensors …      every trained model's trainable variables (PPO: actor,
//!                                       critic; PEFT: base, adapters)
//! <out>/state/optimizer0.safetensors …  each optimizer's moments and step counts
//! <out>/state/progress.json             step, tokens, elapsed time, config hash, stage extras
//! ```
//!
//! A save is written to `state.tmp/`, fsynced, and swapped in by renames, so a kill at any
//! instant leaves a complete state: the new one, or the previous one (restored from
//! `state.old/` if the kill fell between the renames). A state is resumed only under the config
//! that wrote it; one that cannot be read names the way to start over.

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::Tensor;
use temper_stage::atomic::{recover_dir, replace_dir, sync_tree};
use temper_stage::progress::STATE_FORMAT;
use temper_stage::{MetricsLog, Progress};

use crate::error::{CoreError, Result};
use crate::optim::AdamW;

fn state_error(dir: &Path, message: impl std::fmt::Display) -> CoreError {
    CoreError::State {
        path: dir.into(),
        message: message.to_string(),
    }
}

/// Writes the state atomically; `log` supplies the elapsed time.
pub fn save_state(
    out: &Path,
    log: &MetricsLog,
    models: &[&VarStore],
    opts: &[&AdamW],
    progress: &Progress,
) -> Result<()> {
    let tmp = out.join("state.tmp");
    let io = |e: anyhow::Error| state_error(&tmp, format!("{e:#}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| state_error(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| state_error(&tmp, e))?;
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
        elapsed_s: log.elapsed(),
        ..progress.clone()
    };
    let text = serde_json::to_vec_pretty(&progress).expect("progress serialises");
    std::fs::write(tmp.join("progress.json"), text).map_err(|e| state_error(&tmp, e))?;
    sync_tree(&tmp).map_err(io)?;
    replace_dir(&tmp, &out.join("state"), &out.join("state.old")).map_err(io)
}

/// The progress to continue from: the saved state's (loaded into `models` and `opts`, and the
/// logs trimmed to it), or a fresh start, which drops the logs of an earlier, unresumable run.
pub fn resume_or_start(
    out: &Path,
    log: &mut MetricsLog,
    models: &[&VarStore],
    opts: &mut [&mut AdamW],
    config_hash: &str,
) -> Result<Progress> {
    match load_state(out, models, opts, config_hash)? {
        Some(p) => {
            tracing::info!("resuming from step {}", p.step);
            log.resume(&p)
                .map_err(|e| state_error(out, format!("{e:#}")))?;
            Ok(p)
        }
        None => {
            log.reset()
                .map_err(|e| state_error(out, format!("{e:#}")))?;
            Ok(Progress::start(config_hash))
        }
    }
}

/// Loads the last complete state, if there is one.
fn load_state(
    out: &Path,
    models: &[&VarStore],
    opts: &mut [&mut AdamW],
    config_hash: &str,
) -> Result<Option<Progress>> {
    let dir = out.join("state");
    recover_dir(&dir, &out.join("state.old")).map_err(|e| state_error(&dir, format!("{e:#}")))?;
    let path = dir.join("progress.json");
    if !path.exists() {
        return Ok(None);
    }
    let bad = |what: String| state_error(&dir, what);
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let progress: Progress =
        serde_json::from_slice(&text).map_err(|e| bad(format!("progress.json: {e}")))?;
    if progress.format != STATE_FORMAT {
        return Err(bad(format!(
            "format {} (this temper reads {STATE_FORMAT})",
            progress.format
        )));
    }
    if progress.config_hash != config_hash {
        return Err(CoreError::StateMismatch { path: dir });
    }
    for (i, vs) in models.iter().enumerate() {
        let file = dir.join(format!("model{i}.safetensors"));
        let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(&file)
            .map_err(|e| bad(format!("model{i}.safetensors: {e}")))?
            .into_iter()
            .collect();
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in vs.variables() {
                if !persisted(&name, &var) {
                    continue;
                }
                let src = saved
                    .get(&name)
                    .ok_or_else(|| bad(format!("model{i}.safetensors lacks `{name}`")))?;
                var.f_copy_(src)
                    .map_err(|e| bad(format!("model{i}.safetensors: `{name}`: {e}")))?;
            }
            Ok(())
        })?;
    }
    for (i, opt) in opts.iter_mut().enumerate() {
        let file = dir.join(format!("optimizer{i}.safetensors"));
        let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(&file)
            .map_err(|e| bad(format!("optimizer{i}.safetensors: {e}")))?
            .into_iter()
            .collect();
        opt.load_state(&saved)
            .map_err(|e| bad(format!("optimizer{i}.safetensors: {e}")))?;
    }
    Ok(Some(progress))
}

/// Whether the state keeps a variable: what training changes — the trainable ones and the
/// running statistics (AdaLoRA's, under `running.`); frozen ones (a PEFT base) come back from
/// `init`, so the state does not copy them at every save.
fn persisted(name: &str, var: &Tensor) -> bool {
    var.requires_grad()
        || name
            .strip_prefix(crate::peft::RUNNING)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn sorted_vars(vs: &VarStore) -> Vec<(String, Tensor)> {
    let vars: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(name, t)| persisted(name, t))
        .collect();
    vars.into_iter()
        .map(|(k, t)| (k, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect()
}
