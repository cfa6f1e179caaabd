//! What every stage binary shares: its command line (`--config`, `--out`, `--validate`),
//! logging, the progress bar, the NaN guard, and the one-line error exit.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Exit codes: 0 success (checkpoint complete), 1 failure while running, 2 invalid config or
/// inputs (nothing was trained), 3 stopped by the NaN/inf guard (last good state kept).
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
pub const EXIT_NON_FINITE: i32 = 3;

#[derive(Debug, clap::Args)]
pub struct StageArgs {
    /// The stage's YAML config (see the README for every key and its default).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder: checkpoint/, state/, metrics.jsonl, samples.jsonl, summary.json. A folder
    /// holding a resumable state/ is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// Check the config and its inputs, print the resolved config, and exit without training.
    #[arg(long)]
    pub validate: bool,
}

/// An error with the exit code it should produce.
#[derive(Debug)]
pub struct StageError {
    pub code: i32,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for StageError {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = if error.downcast_ref::<NonFinite>().is_some() {
            EXIT_NON_FINITE
        } else {
            EXIT_FAILED
        };
        Self { code, error }
    }
}

/// Marks an error as a config/input problem (exit 2).
pub fn invalid(e: impl Into<anyhow::Error>) -> StageError {
    StageError {
        code: EXIT_INVALID,
        error: e.into(),
    }
}

/// Runs a stage's main and turns an error into one line on stderr and its exit code.
pub fn main_with(name: &str, run: impl FnOnce() -> Result<(), StageError>) {
    init_tracing();
    if let Err(e) = run() {
        // One line: causes joined by ": ", newlines flattened.
        let msg = format!("{:#}", e.error).replace('\n', " ");
        eprintln!("{name}: error: {msg}");
        std::process::exit(e.code);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TEMPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Reads a stage config, naming the file, key and line on error (exit 2).
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    temper_data::contract::read_config(path).map_err(invalid)
}

pub fn write_resolved<T: Serialize>(out: &Path, config: &T) -> anyhow::Result<()> {
    temper_data::contract::write_yaml(&out.join("config.yaml"), config)?;
    Ok(())
}

/// A progress bar over optimizer steps; it draws only on a terminal (stage logs under the
/// orchestrator get the periodic tracing lines instead).
pub fn progress_bar(total: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.set_position(done);
    bar
}

/// The NaN/inf guard's error: the step and the value, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("loss is {value} at step {step}: training stopped; state/ holds the last good weights (after step {last_good}). Lower optim.lr or raise optim.warmup_steps and run again")]
pub struct NonFinite {
    pub step: u64,
    pub value: f64,
    pub last_good: u64,
}

/// Fails with [`NonFinite`] when `loss` is NaN or infinite.
pub fn check_finite(loss: f64, step: u64, last_good: u64) -> Result<(), NonFinite> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(NonFinite {
            step,
            value: loss,
            last_good,
        })
    }
}

/// Clips gradients (when `max_norm` > 0), takes one AdamW step at `lr` and clears gradients.
/// Returns the gradient norm before clipping.
pub fn optimizer_step(opt: &mut crate::AdamW, max_norm: f64, lr: f64) -> crate::Result<f64> {
    let norm = opt.clip_grad_norm(if max_norm > 0.0 {
        max_norm
    } else {
        f64::INFINITY
    });
    opt.step(lr)?;
    opt.zero_grad();
    Ok(norm)
}

/// The model shape of a stage config's `model:` section, with what the tokenizer decides
/// (vocabulary size, EOS and pad ids) filled in where the section leaves them out.
pub fn model_config_from(
    section: &serde_yaml::Value,
    vocab_size: usize,
    eos: u32,
    pad: u32,
) -> Result<crate::ModelConfig, StageError> {
    let mut section = section.clone();
    let map = section
        .as_mapping_mut()
        .ok_or_else(|| invalid(anyhow::anyhow!("model: expected a mapping of shape fields")))?;
    for (key, value) in [
        ("vocab_size", vocab_size as i64),
        ("eos_token_id", eos as i64),
        ("pad_token_id", pad as i64),
    ] {
        map.entry(key.into()).or_insert(value.into());
    }
    let cfg: crate::ModelConfig =
        serde_yaml::from_value(section).map_err(|e| invalid(anyhow::anyhow!("model: {e}")))?;
    cfg.validate().map_err(invalid)?;
    if (cfg.vocab_size as usize) < vocab_size {
        return Err(invalid(anyhow::anyhow!(
            "model.vocab_size {} is smaller than the tokenizer's {vocab_size}",
            cfg.vocab_size
        )));
    }
    Ok(cfg)
}
