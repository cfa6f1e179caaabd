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
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(done);
    bar
}

/// Where a running stage says how far it is: `<out>/.progress.json`, read by `temper status`
/// while the stage holds its folder's lock. A dot-file, so never an output.
pub const PROGRESS_FILE: &str = ".progress.json";

/// What [`PROGRESS_FILE`] holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Running {
    pub step: u64,
    pub total: u64,
    /// Steps per second since this process started (a resumed run counts from its resume).
    pub steps_per_s: f64,
    /// Seconds until the last step at that rate; None before the first step is done.
    pub eta_s: Option<f64>,
}

impl Running {
    pub fn read(out: &std::path::Path) -> Option<Running> {
        serde_json::from_str(&std::fs::read_to_string(out.join(PROGRESS_FILE)).ok()?).ok()
    }
}

/// A training loop's progress: the bar on a terminal, and [`PROGRESS_FILE`] for
/// `temper status` (rank 0 only: the others pass no folder).
pub struct StepProgress {
    bar: ProgressBar,
    file: Option<std::path::PathBuf>,
    total: u64,
    first: u64,
    started: std::time::Instant,
    written: Option<std::time::Instant>,
}

impl StepProgress {
    /// `out`: the stage folder to report into, or None for a hidden, file-less progress.
    pub fn new(out: Option<&std::path::Path>, total: u64, done: u64) -> Self {
        let bar = match out {
            Some(_) => progress_bar(total, done),
            None => ProgressBar::hidden(),
        };
        Self {
            bar,
            file: out.map(|o| o.join(PROGRESS_FILE)),
            total,
            first: done,
            started: std::time::Instant::now(),
            written: None,
        }
    }

    /// Step `step` is done; `message` is the bar's text (the loss, say).
    pub fn set(&mut self, step: u64, message: impl Into<std::borrow::Cow<'static, str>>) {
        self.bar.set_position(step);
        self.bar.set_message(message);
        // Every few seconds is enough for a person, and costs nothing beside a step.
        let due = self
            .written
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(2));
        if let (Some(file), true) = (&self.file, due || step == self.total) {
            let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
            let steps_per_s = step.saturating_sub(self.first) as f64 / elapsed;
            let running = Running {
                step,
                total: self.total,
                steps_per_s,
                eta_s: (steps_per_s > 0.0)
                    .then(|| self.total.saturating_sub(step) as f64 / steps_per_s),
            };
            // Not fsynced: a torn file after a crash only means status shows no step.
            let tmp = file.with_extension("json.tmp");
            let written = serde_json::to_vec(&running)
                .ok()
                .and_then(|b| std::fs::write(&tmp, b).ok())
                .and_then(|_| std::fs::rename(&tmp, file).ok());
            if written.is_some() {
                self.written = Some(std::time::Instant::now());
            }
        }
    }

    /// The loop is over: the bar goes, and so does the file (the stage is no longer running).
    pub fn finish(self) {
        self.bar.finish_and_clear();
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_file_gives_step_rate_and_eta_and_goes_at_the_end() {
        let d = tempfile::tempdir().unwrap();
        let mut p = StepProgress::new(Some(d.path()), 10, 4);
        assert_eq!(Running::read(d.path()), None, "nothing before a step");
        std::thread::sleep(std::time::Duration::from_millis(50));
        p.set(6, "loss 1.0");
        let r = Running::read(d.path()).unwrap();
        assert_eq!((r.step, r.total), (6, 10));
        // Two steps in about 50 ms since the resume at step 4.
        assert!(r.steps_per_s > 0.0 && r.steps_per_s <= 2.0 / 0.05, "{r:?}");
        let eta = r.eta_s.unwrap();
        assert!((eta - 4.0 / r.steps_per_s).abs() < 1e-9, "{r:?}");
        p.finish();
        assert!(!d.path().join(PROGRESS_FILE).exists());
        let mut hidden = StepProgress::new(None, 10, 0);
        hidden.set(10, "");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
