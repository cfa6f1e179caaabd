//! The run's progress besides tensors (what `state/progress.json` holds), and the terminal
//! progress bar.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The format of `state/progress.json`; a state of another format is refused with a message.
pub const STATE_FORMAT: u32 = 2;

/// Enough to continue exactly where a run stopped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub format: u32,
    /// Optimizer steps (or RL iterations) completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Wall time spent before this state was written, summed over resumed runs.
    pub elapsed_s: f64,
    /// The config's hash ([`crate::ConfigFile::hash`]): a state is resumed only under the
    /// config that wrote it.
    pub config_hash: String,
    /// Stage-specific values (a KL coefficient, reward statistics, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, Value>,
}

impl Progress {
    pub fn start(config_hash: &str) -> Self {
        Self {
            format: STATE_FORMAT,
            config_hash: config_hash.into(),
            ..Default::default()
        }
    }
}

/// A progress bar over steps; it draws only on a terminal (stage logs under the orchestrator
/// get the periodic tracing lines instead).
pub fn progress_bar(total: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.set_position(done);
    bar
}
