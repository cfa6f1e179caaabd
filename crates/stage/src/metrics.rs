//! The files every stage writes about itself: `metrics.jsonl` (one JSON object per logged step,
//! the schema in ARCHITECTURE.md), `samples.jsonl` (generations at evaluation points) and
//! `summary.json` (final numbers and status). On resume, rows logged after the saved step are
//! dropped, so a resumed run's files match an uninterrupted run's.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde_json::{Map, Value};

use crate::progress::Progress;

/// Final numbers of a stage, as written to summary.json.
pub type Summary = Map<String, Value>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

pub struct MetricsLog {
    pub out: PathBuf,
    metrics: File,
    samples: Option<File>,
    /// TensorBoard scalars, rebuilt from metrics.jsonl at this process's first row.
    tensorboard: Option<crate::tensorboard::EventFile>,
    started: Instant,
    elapsed_before: f64,
    /// The evaluation rows logged at the step this run resumed from, merged (see
    /// [`MetricsLog::eval_logged_at_resume`]).
    resumed_eval: Summary,
}

fn append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Non-finite numbers have no JSON form; they are logged as null.
pub fn json_number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

impl MetricsLog {
    /// Opens the logs of a stage folder for appending.
    pub fn open(out: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            out: out.into(),
            metrics: append(&out.join("metrics.jsonl"))?,
            samples: None,
            tensorboard: None,
            started: Instant::now(),
            elapsed_before: 0.0,
            resumed_eval: Summary::new(),
        })
    }

    /// Seconds of work so far, across resumes.
    pub fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Continues a run from a saved state: rows after its step are dropped, the clock resumes.
    pub fn resume(&mut self, progress: &Progress) -> anyhow::Result<()> {
        let kept = trim_jsonl(&self.out.join("metrics.jsonl"), progress.step)?;
        self.resumed_eval = kept
            .iter()
            .filter(|row| row["step"].as_u64() == Some(progress.step) && row["split"] == "eval")
            .filter_map(Value::as_object)
            .flat_map(|row| row.iter())
            .filter(|(k, _)| !matches!(k.as_str(), "step" | "split" | "time_s"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        trim_jsonl(&self.out.join("samples.jsonl"), progress.step)?;
        self.metrics = append(&self.out.join("metrics.jsonl"))?;
        self.samples = None;
        self.tensorboard = None;
        self.elapsed_before = progress.elapsed_s;
        self.started = Instant::now();
        Ok(())
    }

    /// Starts from scratch: the metrics and samples of an earlier, unresumable run go.
    pub fn reset(&mut self) -> anyhow::Result<()> {
        for name in ["metrics.jsonl", "samples.jsonl"] {
            let p = self.out.join(name);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        self.metrics = append(&self.out.join("metrics.jsonl"))?;
        self.samples = None;
        self.tensorboard = None;
        self.resumed_eval = Summary::new();
        Ok(())
    }

    /// The numbers of the evaluation logged at the step this run resumed from (every eval row
    /// of that step, merged), empty if none was. A stage stopped after its final evaluation and
    /// save but before its summary resumes at its last step and runs no loop: its summary takes
    /// the final evaluation from here, as the uninterrupted run's took it from the evaluation.
    pub fn eval_logged_at_resume(&self) -> Summary {
        self.resumed_eval.clone()
    }

    /// Appends one row `{"step", "split", "time_s", ...fields}` and flushes it.
    pub fn log<K: AsRef<str>>(
        &mut self,
        step: u64,
        split: Split,
        fields: &[(K, f64)],
    ) -> anyhow::Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), step.into());
        obj.insert("split".into(), split.name().into());
        obj.insert(
            "time_s".into(),
            ((self.elapsed() * 1000.0).round() / 1000.0).into(),
        );
        for (k, v) in fields {
            obj.insert(k.as_ref().into(), json_number(*v));
        }
        let row = Value::Object(obj);
        writeln!(self.metrics, "{row}")
            .and_then(|_| self.metrics.flush())
            .context("writing metrics.jsonl")?;
        match self.tensorboard.as_mut() {
            Some(tb) => tb.row(&row),
            None => {
                // The replay includes the row just written.
                let tb = crate::tensorboard::EventFile::rebuild(&self.out, self.elapsed())?;
                self.tensorboard = Some(tb);
                Ok(())
            }
        }
    }

    /// Logs an evaluation row and says it in one log line.
    pub fn log_eval<K: AsRef<str>>(
        &mut self,
        step: u64,
        fields: &[(K, f64)],
    ) -> anyhow::Result<()> {
        self.log(step, Split::Eval, fields)?;
        tracing::info!("step {step}: eval {}", describe(fields));
        Ok(())
    }

    /// Logs a training row and says it in one log line.
    pub fn log_train<K: AsRef<str>>(
        &mut self,
        step: u64,
        fields: &[(K, f64)],
    ) -> anyhow::Result<()> {
        self.log(step, Split::Train, fields)?;
        tracing::info!("step {step}: {}", describe(fields));
        Ok(())
    }

    /// Appends records to samples.jsonl.
    pub fn log_samples(&mut self, records: &[Value]) -> anyhow::Result<()> {
        if self.samples.is_none() {
            self.samples = Some(append(&self.out.join("samples.jsonl"))?);
        }
        let f = self.samples.as_mut().expect("opened above");
        for r in records {
            writeln!(f, "{r}").context("writing samples.jsonl")?;
        }
        f.flush().context("writing samples.jsonl")
    }

    /// The summary fields every training stage reports: steps, tokens and mean tokens/s.
    pub fn summary_base(&self, progress: &Progress) -> Summary {
        let mut m = Map::new();
        m.insert("steps".into(), progress.step.into());
        m.insert("tokens".into(), progress.tokens_seen.into());
        m.insert(
            "tokens_per_s".into(),
            json_number(progress.tokens_seen as f64 / self.elapsed().max(1e-9)),
        );
        m
    }

    /// Writes summary.json atomically with the stage's final numbers, its status and wall time.
    pub fn write_summary(&self, status: &str, mut fields: Summary) -> anyhow::Result<()> {
        fields.insert("status".into(), status.into());
        fields.insert("wall_time_s".into(), json_number(self.elapsed()));
        // What a run costs besides time: the process's peak memory and the checkpoint's size.
        if let Some(rss) = crate::footprint::peak_rss_bytes() {
            fields.insert("peak_rss_mb".into(), json_number(rss as f64 / 1e6));
        }
        let checkpoint = self.out.join("checkpoint");
        if checkpoint.is_dir() {
            let mb = crate::footprint::dir_bytes(&checkpoint) as f64 / 1e6;
            fields.insert("checkpoint_mb".into(), json_number(mb));
        }
        crate::atomic::write_json(&self.out.join("summary.json"), &Value::Object(fields))
    }
}

/// What every supervised step logs: loss, learning rate, gradient norm, tokens seen, and the
/// throughput; a stage adds its own fields (`ppl`, `accuracy`) after these.
pub fn step_fields(
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens: u64,
    tokens_per_s: f64,
) -> Vec<(&'static str, f64)> {
    vec![
        ("loss", loss),
        ("lr", lr),
        ("grad_norm", grad_norm),
        ("tokens", tokens as f64),
        ("tokens_per_s", tokens_per_s),
    ]
}

/// "loss 1.2346, ppl 3.4368" for a log line.
fn describe<K: AsRef<str>>(fields: &[(K, f64)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let k = k.as_ref();
            if v.abs() >= 1000.0 {
                format!("{k} {v:.0}")
            } else if *v != 0.0 && v.abs() < 1e-3 {
                format!("{k} {v:.2e}")
            } else {
                format!("{k} {v:.4}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keeps the rows of `path` at or before `step` (rewritten atomically) and returns them.
fn trim_jsonl(path: &Path, step: u64) -> anyhow::Result<Vec<Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let (lines, rows): (Vec<String>, Vec<Value>) = BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let row = serde_json::from_str::<Value>(&line).ok()?;
            let kept = row
                .get("step")
                .and_then(Value::as_u64)
                .is_some_and(|s| s <= step);
            kept.then_some((line, row))
        })
        .unzip();
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    crate::atomic::write_atomic(path, text.as_bytes())?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_rows_after_the_saved_step() {
        let d = tempfile::tempdir().unwrap();
        let mut m = MetricsLog::open(d.path()).unwrap();
        for s in 1..=5 {
            m.log(
                s,
                Split::Train,
                &[("loss", 1.0 / s as f64), ("x", f64::NAN)],
            )
            .unwrap();
        }
        let p = Progress {
            step: 3,
            ..Progress::start("h")
        };
        m.resume(&p).unwrap();
        m.log(4, Split::Train, &[("loss", 0.25)]).unwrap();
        let text = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        assert!(text.contains("\"x\":null"), "NaN is logged as null");
    }

    #[test]
    fn a_resume_recalls_the_evaluation_logged_at_its_step() {
        let d = tempfile::tempdir().unwrap();
        let mut m = MetricsLog::open(d.path()).unwrap();
        m.log_eval(5, &[("loss", 2.0)]).unwrap();
        m.log_train(10, &[("loss", 1.5)]).unwrap();
        // Two held-out streams evaluated at the last step, as pretraining logs them.
        m.log_eval(10, &[("loss", 1.0), ("ppl", 1f64.exp())])
            .unwrap();
        m.log_eval(10, &[("domain/loss", 3.0)]).unwrap();
        let at = |step| Progress {
            step,
            ..Progress::start("h")
        };
        m.resume(&at(10)).unwrap();
        let recalled = m.eval_logged_at_resume();
        assert_eq!(recalled.len(), 3, "{recalled:?}");
        assert_eq!(recalled["loss"], 1.0);
        assert_eq!(recalled["domain/loss"], 3.0);
        // Resumed where nothing was evaluated: nothing to recall (the loop evaluates later).
        m.resume(&at(7)).unwrap();
        assert!(m.eval_logged_at_resume().is_empty());
    }
}
