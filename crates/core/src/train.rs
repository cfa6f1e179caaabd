//! The run of a training stage, around the loop each stage writes inline: [`start`] (config,
//! placement, the stage's own preparation, `--validate`, the process group), [`TrainRun::open`]
//! (the folder, the log, resume or start, ranks that start together, the cadence and the
//! progress shown), and per step the NaN guard, the train row, the save and the stop on a
//! signal, then [`TrainRun::finish`] with the summary. What a step computes stays in the stage.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::nn::VarStore;
use tch::Device;
use temper_stage::{
    check_finite, checked_config, invalid, step_fields, Cadence, ConfigFile, Inputs, MetricsLog,
    Progress, StageArgs, StageError, StageKind, StepProgress, Summary, Throughput,
};

use crate::dist::{GradSync, Placement, Ranks, World};
use crate::optim::AdamW;
use crate::state::{resume_or_start, save_state};
use crate::DeviceSpec;

/// A training stage ready to open its run: its config, what it prepared, its process group.
pub struct Started<C, S> {
    pub cfg: ConfigFile<C>,
    pub setup: S,
    pub world: World,
}

/// Reads and checks the config, places the process (data parallel under torchrun or Slurm: a
/// bad environment is refused before anything is read), prepares the stage's inputs on its
/// device (`prepare`), and joins the process group. None when
/// there is nothing to train: an input is pending, or this is `--validate`, whose resolved
/// config is then printed.
pub fn start<C, S>(
    args: &StageArgs,
    kind: StageKind,
    check: impl FnOnce(&ConfigFile<C>, &mut Inputs) -> Result<(), StageError>,
    device: impl FnOnce(&C) -> DeviceSpec,
    prepare: impl FnOnce(&ConfigFile<C>, Device) -> Result<S, StageError>,
) -> Result<Option<Started<C, S>>, StageError>
where
    C: DeserializeOwned + Serialize,
{
    let Some(cfg) = checked_config::<C>(args, kind, check)? else {
        return Ok(None); // an input is pending: the rest is checked when it exists
    };
    let placement = Placement::from_env().map_err(invalid)?;
    let device = placement.device(device(&cfg.value)).map_err(invalid)?;
    let setup = prepare(&cfg, device)?;
    if args.validate {
        cfg.print_resolved()?;
        return Ok(None);
    }
    let world = World::join_placed(placement, device).map_err(invalid)?;
    Ok(Some(Started { cfg, setup, world }))
}

/// One training run in progress: its ranks and folder, its log, where it stands, its cadence.
pub struct TrainRun {
    pub world: World,
    pub ranks: Ranks,
    pub log: MetricsLog,
    pub progress: Progress,
    pub every: Cadence,
    bar: StepProgress,
    throughput: Throughput,
}

/// What one optimizer step did, for its train row: the mean loss over the whole (global)
/// batch, the learning rate, the gradient norm before clipping, and the tokens it trained on
/// over every rank.
#[derive(Clone, Copy, Debug)]
pub struct Stepped {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
}

impl Stepped {
    pub fn new(loss: f64, lr: f64, grad_norm: f64, tokens: u64) -> Self {
        Self {
            loss,
            lr,
            grad_norm,
            tokens,
        }
    }
}

impl TrainRun {
    /// Claims the stage folder (rank 0; the others log to scratch), saves the resolved config
    /// beside the outputs, opens the log, and resumes `stores` and `opt` from `state/` (or
    /// starts) — then checks that every rank stands at the same step with the same weights.
    /// With the run comes `opt`'s gradient sync: the gradients averaged over the ranks in
    /// buckets, reduced while the last backward runs.
    pub fn open<C: Serialize>(
        world: World,
        out: &Path,
        cfg: &ConfigFile<C>,
        stores: &[&VarStore],
        opt: &mut AdamW,
        every: Cadence,
    ) -> Result<(Self, GradSync), StageError> {
        let run = Self::open_with(world, out, cfg, stores, &mut [&mut *opt], every)?;
        let sync = run.world.grad_sync(&opt.parameters())?;
        Ok((run, sync))
    }

    /// [`TrainRun::open`] for several optimizers (PPO's actor and critic), whose gradient
    /// syncs the caller makes.
    pub fn open_with<C: Serialize>(
        world: World,
        out: &Path,
        cfg: &ConfigFile<C>,
        stores: &[&VarStore],
        opts: &mut [&mut AdamW],
        every: Cadence,
    ) -> Result<Self, StageError> {
        let ranks = Ranks::open(&world, out, cfg.kind.name())?;
        if world.is_main() {
            cfg.write_resolved(&ranks.out)?;
        }
        let mut log = MetricsLog::open(&ranks.log_dir)?;
        let progress = ranks.resume(&world, |out| {
            resume_or_start(out, &mut log, stores, opts, &cfg.hash)
        })?;
        for opt in opts.iter() {
            world.start_together(progress.step, &opt.parameters())?;
        }
        let bar = ranks.progress(every.last, progress.step);
        Ok(Self {
            world,
            ranks,
            log,
            progress,
            every,
            bar,
            throughput: Throughput::new(),
        })
    }

    /// The folder the stage writes (rank 0) or resumes from (the others).
    pub fn out(&self) -> &Path {
        &self.ranks.out
    }

    /// The NaN guard: a loss that is not finite stops the run (exit 3) with the last good
    /// state saved by rank 0 and readable, so the run can be inspected or resumed.
    pub fn guard(
        &self,
        loss: f64,
        stores: &[&VarStore],
        opts: &[&AdamW],
    ) -> Result<(), StageError> {
        let step = self.progress.step;
        if let Err(e) = check_finite(loss, step + 1, step) {
            self.save_now(stores, opts)?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Counts a finished optimizer step: the step, its tokens, the progress shown, and its
    /// train row (the shared fields, then `extra`) when the cadence logs it. Returns the step.
    pub fn stepped(
        &mut self,
        s: Stepped,
        extra: &[(&str, f64)],
        shown: String,
    ) -> anyhow::Result<u64> {
        self.progress.step += 1;
        self.progress.tokens_seen += s.tokens;
        self.throughput.add(s.tokens);
        let step = self.progress.step;
        self.bar.set(step, shown);
        if self.every.log_due(step) {
            let rate = self.throughput.take();
            let mut fields =
                step_fields(s.loss, s.lr, s.grad_norm, self.progress.tokens_seen, rate);
            fields.extend_from_slice(extra);
            self.log.log_train(step, &fields)?;
        }
        Ok(step)
    }

    /// An RL iteration's count and progress, for loops that log their own rows.
    pub fn iterated(&mut self, tokens: u64, shown: String) -> u64 {
        self.progress.step += 1;
        self.progress.tokens_seen += tokens;
        self.bar.set(self.progress.step, shown);
        self.progress.step
    }

    /// Saves `state/` (rank 0) when the cadence says — or a stop was asked for, in which case
    /// the run then ends with exit 130 after the save.
    pub fn save_when_due(&self, stores: &[&VarStore], opts: &[&AdamW]) -> Result<(), StageError> {
        let step = self.progress.step;
        if self.every.save_due(step) {
            self.save_now(stores, opts)?;
        }
        Ok(self.every.stop_if_asked(step)?)
    }

    fn save_now(&self, stores: &[&VarStore], opts: &[&AdamW]) -> Result<(), StageError> {
        if self.world.is_main() {
            save_state(&self.ranks.out, &self.log, stores, opts, &self.progress)?;
        }
        Ok(())
    }

    /// The loop is over: the other ranks clean up and are done (None); rank 0 gets what it
    /// needs to write the final checkpoint and summary.
    pub fn finish(self) -> Result<Option<Finished>, StageError> {
        self.bar.finish();
        if !self.world.is_main() {
            self.ranks.finish()?;
            return Ok(None);
        }
        Ok(Some(Finished {
            out: self.ranks.out.clone(),
            log: self.log,
            progress: self.progress,
            _ranks: self.ranks,
        }))
    }
}

/// Rank 0 after its loop: where to write, the log, the final progress.
pub struct Finished {
    pub out: PathBuf,
    pub log: MetricsLog,
    pub progress: Progress,
    /// Held so the stage folder stays locked until the summary is written.
    _ranks: Ranks,
}

impl Finished {
    /// The summary every training stage starts from: steps, tokens, tokens/s, and `fields`
    /// (a model's parameter counts, say), then the final evaluation's numbers — `last_eval`,
    /// or, when the run resumed after its final evaluation and save (stopped before the
    /// summary) so no loop ran, the evaluation logged then.
    pub fn summary<K: Into<String>, V: Into<serde_json::Value>>(
        &self,
        fields: impl IntoIterator<Item = (K, V)>,
        last_eval: Option<Summary>,
    ) -> Summary {
        let mut summary = self.log.summary_base(&self.progress);
        for (k, v) in fields {
            summary.insert(k.into(), v.into());
        }
        summary.extend(last_eval.unwrap_or_else(|| self.log.eval_logged_at_resume()));
        summary
    }

    /// An RL stage's summary: the numbers of its last iteration that `keep` selects (reward,
    /// KL, lengths), the iterations and tokens, and `fields`.
    pub fn iterations_summary<K: Into<String>, V: Into<serde_json::Value>>(
        &self,
        keep: impl Fn(&str) -> bool,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> anyhow::Result<Summary> {
        let path = self.out.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let last: Option<Summary> = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok());
        let mut summary: Summary = last
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| keep(k))
            .collect();
        summary.insert("iterations".into(), self.progress.step.into());
        summary.insert("tokens".into(), self.progress.tokens_seen.into());
        for (k, v) in fields {
            summary.insert(k.into(), v.into());
        }
        Ok(summary)
    }

    /// Writes `summary.json` with status ok: the stage is done.
    pub fn write(self, summary: Summary) -> Result<(), StageError> {
        self.log.write_summary("ok", summary)?;
        Ok(())
    }
}
