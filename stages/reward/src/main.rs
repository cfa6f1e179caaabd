//! temper-reward: reward (placeholder until the stage-binaries issue lands).
use clap::Parser;

/// Bradley–Terry reward model on preference pairs.
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("temper-reward: training is not built yet; see `--help`");
    std::process::exit(2);
}
