//! temper: the pipeline orchestrator (placeholder until the orchestrator issue lands).
use clap::Parser;

/// Runs an alignment pipeline (pretrain → SFT → reward → PPO) declared in one YAML file.
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("temper: the orchestrator is not built yet; see `--help`");
    std::process::exit(2);
}
