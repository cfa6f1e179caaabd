//! temper: runs an alignment pipeline (tokenizer → pretrain → SFT → reward → PPO → eval)
//! declared as a DAG in one YAML file, skipping stages whose inputs did not change.

mod plan;
mod run;
mod spec;
mod views;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    version,
    about = "Run an LLM alignment pipeline declared in one YAML file",
    long_about = "\
Run an LLM alignment pipeline declared in one YAML file.

Each stage (tokenizer, pretrain, sft, reward, ppo, eval) runs its own binary on a resolved
config; references like ${sft.checkpoint} wire the stages into a DAG. A stage's cache key
hashes its binary, parameters, input files and parents' keys: `temper run` skips what is up
to date, says why it runs the rest, and resumes a failed or interrupted stage from its state.
A stage runs beside its previous outputs and replaces them only when it succeeds.

Exit codes: 0 success, 1 a stage failed, 2 invalid pipeline or stage config (nothing ran),
130 interrupted (the stages saved their state; the next run resumes them)."
)]
struct Cli {
    /// Use this work folder instead of the file's `workdir`.
    #[arg(long, global = true)]
    workdir: Option<PathBuf>,
    /// Override a parameter: -o sft.optim.lr=1e-4 (value parsed as YAML). Repeatable.
    #[arg(
        short = 'o',
        long = "override",
        value_name = "STAGE.KEY=VALUE",
        global = true
    )]
    overrides: Vec<String>,
    #[command(subcommand)]
    command: Cmd,
}

/// `temper run`'s arguments.
#[derive(Args)]
struct RunArgs {
    /// The pipeline YAML.
    file: PathBuf,
    /// Stages to run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    jobs: u64,
    /// Rerun only this stage (its parents must be up to date, unless --with-parents).
    #[arg(long, conflicts_with = "from")]
    stage: Option<String>,
    /// Rerun this stage and everything downstream of it.
    #[arg(long)]
    from: Option<String>,
    /// Run only this stage, and only if it is stale (its parents must be up to date, unless
    /// --with-parents): what each job of `temper export slurm` runs.
    #[arg(long, conflicts_with_all = ["stage", "from"])]
    only: Option<String>,
    /// With --stage, --from or --only: also run the stages upstream of it that are stale.
    #[arg(long)]
    with_parents: bool,
    /// Rerun every stage, up to date or not.
    #[arg(long)]
    force: bool,
    /// With --stage or --from: start over instead of resuming an unfinished run (the way
    /// out of a state that cannot be resumed).
    #[arg(long)]
    fresh: bool,
    /// Print what would run and why; run and write nothing.
    #[arg(long)]
    dry_run: bool,
}

impl RunArgs {
    fn options(&self) -> anyhow::Result<run::RunOptions> {
        anyhow::ensure!(
            !self.fresh || self.stage.is_some() || self.from.is_some(),
            "--fresh applies to the stages named by --stage or --from"
        );
        Ok(run::RunOptions {
            jobs: self.jobs as usize,
            stage: self.stage.clone(),
            from: self.from.clone(),
            only: self.only.clone(),
            with_parents: self.with_parents,
            force: self.force,
            fresh: self.fresh,
            dry_run: self.dry_run,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every stale stage in dependency order (independent stages in parallel).
    Run(RunArgs),
    /// Check the file (keys, kinds, references, cycles) and every stage's config with the
    /// stage's own parser, reporting every problem at once with its line.
    Validate { file: PathBuf },
    /// Each stage's state (up to date, stale and why, failed, never run), last run, duration
    /// and key metrics.
    Status { file: PathBuf },
    /// What each stage achieved, one line each: held-out loss before → after, reward-model
    /// accuracy, pairs labelled, RL reward and KL, every policy against the evaluation's
    /// baseline under each judge with KL and length, ✓/✗ per gate (`temper run` ends with it).
    Summary { file: PathBuf },
    /// Per-stage metrics tables from metrics.jsonl (evaluation rows by default).
    Metrics {
        file: PathBuf,
        /// Only this stage.
        stage: Option<String>,
        #[arg(long, value_enum, default_value_t = Split::Eval)]
        split: Split,
        /// Only the last N rows of each stage.
        #[arg(long)]
        last: Option<usize>,
        /// One JSON object per row instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// The branches of every swept stage (`matrix:`) side by side: each final metric as mean ±
    /// std over the branches, and each branch's value.
    Compare {
        file: PathBuf,
        /// One JSON object per swept stage instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Write an HTML report: status, graph, and a chart per metric per stage (train and eval
    /// curves), to <workdir>/report.html unless --out says otherwise.
    Report {
        /// The pipeline YAML.
        file: PathBuf,
        /// Where to write the HTML file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// What changed between two runs and what it did: per stage, the parameters that differ,
    /// the inputs whose content differs and the final metrics with their deltas. Compared with
    /// each stage's previous different result in manifests/, or with --against (a manifest
    /// file or another workdir of the same pipeline).
    Diff {
        file: PathBuf,
        #[arg(long)]
        against: Option<PathBuf>,
        /// One JSON object: stage → {params, inputs, metrics}.
        #[arg(long)]
        json: bool,
    },
    /// Print the `tensorboard` command that shows every stage's metrics (each stage a run;
    /// stages write `tb/` event files beside metrics.jsonl).
    Tensorboard { file: PathBuf },
    /// Write the pipeline as Slurm batch scripts (one per stage, in <workdir>/slurm unless
    /// --out says otherwise) and a submit.sh that submits them in dependency order, each after
    /// the one before succeeded (afterok). Each job runs `temper run FILE --only STAGE` (so it
    /// skips what is up to date), with `resources: {nproc, nnodes}` as its tasks; temper starts
    /// a data-parallel stage's ranks with srun. Submit with `bash <out>/submit.sh`.
    Export {
        #[arg(value_enum)]
        target: ExportTarget,
        /// The pipeline YAML.
        file: PathBuf,
        /// The folder for the scripts.
        #[arg(long)]
        out: Option<PathBuf>,
        /// An extra #SBATCH option for every job, e.g. --sbatch=--partition=gpu. Repeatable.
        #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
        sbatch: Vec<String>,
    },
    /// Print the stage graph.
    Dag {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = DagFormat::Mermaid)]
        format: DagFormat,
    },
}

/// Which rows of metrics.jsonl.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Split {
    Eval,
    Train,
    All,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Eval => "eval",
            Split::Train => "train",
            Split::All => "all",
        }
    }

    /// Whether a row of split `row` belongs.
    pub fn admits(self, row: &str) -> bool {
        self == Split::All || row == self.name()
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportTarget {
    Slurm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DagFormat {
    Mermaid,
    Dot,
}

fn main() {
    temper_stage::cli::install_panic_hook("temper");
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "temper: error: {}",
                temper_stage::cli::one_line(&format!("{e:#}"))
            );
            run::EXIT_INVALID
        }
    };
    std::process::exit(code);
}

/// The pipeline in `file`, with the command line's overrides and --workdir applied.
fn load(cli: &Cli, file: &std::path::Path) -> anyhow::Result<spec::Pipeline> {
    let mut p = spec::load_with(file, &cli.overrides)?;
    if let Some(w) = &cli.workdir {
        p.workdir = spec::normalize(&std::env::current_dir()?.join(w));
        if let Some(problem) = spec::workdir_problem(&p.workdir, &p.base) {
            anyhow::bail!("--workdir: {problem}");
        }
    }
    Ok(p)
}

fn run() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    let load = |file: &std::path::Path| load(&cli, file);
    match &cli.command {
        Cmd::Run(args) => {
            let opts = args.options()?;
            let p = load(&args.file)?;
            temper_stage::signals::install();
            let code = run::run(&p, &opts)?;
            // What the run achieved, unless it ran nothing or one job of a batch system.
            let whole_run = !opts.dry_run && opts.only.is_none();
            if whole_run && code != run::EXIT_INVALID {
                println!();
                views::summary::print(&p, &args.file);
            }
            Ok(code)
        }
        Cmd::Validate { file } => plan::validate::validate_all(&load(file)?),
        Cmd::Status { file } => views::status::status(&load(file)?).map(|_| 0),
        Cmd::Summary { file } => {
            views::summary::print(&load(file)?, file);
            Ok(0)
        }
        Cmd::Metrics {
            file,
            stage,
            split,
            last,
            json,
        } => {
            views::metrics::metrics(&load(file)?, stage.as_deref(), *split, *last, *json).map(|_| 0)
        }
        Cmd::Compare { file, json } => {
            views::compare::print(&load(file)?, *json);
            Ok(0)
        }
        Cmd::Report { file, out } => {
            let path = views::report::write_report(&load(file)?, out.as_deref())?;
            println!("report: {}", path.display());
            Ok(0)
        }
        Cmd::Diff {
            file,
            against,
            json,
        } => views::diff::diff(&load(file)?, against.as_deref(), *json).map(|_| 0),
        Cmd::Tensorboard { file } => {
            views::metrics::tensorboard(&load(file)?);
            Ok(0)
        }
        Cmd::Export {
            target: ExportTarget::Slurm,
            file,
            out,
            sbatch,
        } => export_slurm(&cli, &load(file)?, out.as_deref(), sbatch).map(|_| 0),
        Cmd::Dag { file, format } => {
            views::graph::dag(&load(file)?, *format);
            Ok(0)
        }
    }
}

/// `temper export slurm`: the job scripts and submit.sh, and how to submit them.
fn export_slurm(
    cli: &Cli,
    p: &spec::Pipeline,
    out: Option<&std::path::Path>,
    sbatch: &[String],
) -> anyhow::Result<()> {
    let how = run::slurm::Invocation {
        temper: std::env::current_exe()?,
        workdir: cli.workdir.as_deref(),
        overrides: &cli.overrides,
        sbatch,
    };
    let out = run::slurm::export(p, &how, out)?;
    println!(
        "wrote {} Slurm job scripts and submit.sh to {}; submit with: bash {}/submit.sh",
        p.stages.len(),
        out.display(),
        out.display()
    );
    Ok(())
}
