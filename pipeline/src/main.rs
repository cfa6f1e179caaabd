//! temper: runs an alignment pipeline (tokenizer → pretrain → SFT → reward → PPO → eval)
//! declared as a DAG in one YAML file, skipping stages whose inputs did not change.

mod exec;
mod hash;
mod html;
mod plan;
mod plot;
mod report;
mod schema;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    version,
    about = "Run an LLM alignment pipeline declared in one YAML file",
    long_about = "\
Run an LLM alignment pipeline declared in one YAML file.

Each stage (tokenizer, pretrain, sft, reward, ppo, eval) runs its own binary on a resolved
config; references like ${sft.checkpoint} wire the stages into a DAG. A stage's cache key
hashes its binary, parameters, input files and parents' keys: `temper run` skips what is up
to date, says why it runs the rest, and resumes a failed or interrupted stage from its state."
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

#[derive(Subcommand)]
enum Cmd {
    /// Run every stale stage in dependency order (independent stages in parallel).
    Run {
        /// The pipeline YAML.
        file: PathBuf,
        /// Stages to run at once.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Rerun only this stage (its parents must be up to date, unless --with-parents).
        #[arg(long, conflicts_with = "from")]
        stage: Option<String>,
        /// Rerun this stage and everything downstream of it.
        #[arg(long)]
        from: Option<String>,
        /// With --stage or --from: also run stale parents.
        #[arg(long)]
        with_parents: bool,
        /// Rerun every stage, up to date or not.
        #[arg(long)]
        force: bool,
        /// Print what would run and why, and run nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the file (keys, kinds, references, cycles) and each stage's config, reporting
    /// every problem at once.
    Validate { file: PathBuf },
    /// Each stage's state (up to date, stale and why, failed, never run), last run, duration
    /// and key metrics.
    Status { file: PathBuf },
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
    /// Write an HTML report: status, graph, and a chart per metric per stage (train and eval
    /// curves), to <workdir>/report.html unless --out says otherwise.
    Report {
        /// The pipeline YAML.
        file: PathBuf,
        /// Where to write the HTML file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the stage graph.
    Dag {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = DagFormat::Mermaid)]
        format: DagFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Split {
    Eval,
    Train,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Mermaid,
    Dot,
}

fn main() {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("temper: error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    let load = |file: &std::path::Path| -> anyhow::Result<schema::Pipeline> {
        let mut p = schema::load(file)?;
        for o in &cli.overrides {
            p.apply_override(o)?;
        }
        if let Some(w) = &cli.workdir {
            p.workdir = schema::normalize(&std::env::current_dir()?.join(w));
        }
        Ok(p)
    };
    match &cli.command {
        Cmd::Run {
            file,
            jobs,
            stage,
            from,
            with_parents,
            force,
            dry_run,
        } => {
            let p = load(file)?;
            let interrupted = Arc::new(AtomicBool::new(false));
            let flag = interrupted.clone();
            ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
            let opts = exec::RunOptions {
                jobs: *jobs,
                stage: stage.clone(),
                from: from.clone(),
                with_parents: *with_parents,
                force: *force,
                dry_run: *dry_run,
            };
            let ok = exec::run(&p, &opts, interrupted.clone())?;
            Ok(if interrupted.load(Ordering::SeqCst) {
                130
            } else if ok {
                0
            } else {
                1
            })
        }
        Cmd::Validate { file } => {
            let p = load(file)?;
            let problems = report::validate_stages(&p)?;
            if problems.is_empty() {
                println!("{}: valid ({} stages)", file.display(), p.stages.len());
                Ok(0)
            } else {
                eprintln!(
                    "temper: error: {}: {} problem(s):",
                    file.display(),
                    problems.len()
                );
                for pr in problems {
                    eprintln!("  {pr}");
                }
                Ok(2)
            }
        }
        Cmd::Status { file } => {
            report::status(&load(file)?)?;
            Ok(0)
        }
        Cmd::Metrics {
            file,
            stage,
            split,
            last,
            json,
        } => {
            let split = match split {
                Split::Eval => "eval",
                Split::Train => "train",
                Split::All => "all",
            };
            report::metrics(&load(file)?, stage.as_deref(), split, *last, *json)?;
            Ok(0)
        }
        Cmd::Report { file, out } => {
            let path = html::write_report(&load(file)?, out.as_deref())?;
            println!("report: {}", path.display());
            Ok(0)
        }
        Cmd::Dag { file, format } => {
            report::dag(
                &load(file)?,
                match format {
                    DagFormat::Mermaid => "mermaid",
                    DagFormat::Dot => "dot",
                },
            );
            Ok(0)
        }
    }
}
