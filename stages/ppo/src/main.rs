//! temper-ppo: ppo (placeholder until the stage-binaries issue lands).
use clap::Parser;

/// RLHF with PPO: actor, critic, frozen reference and reward model.
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("temper-ppo: training is not built yet; see `--help`");
    std::process::exit(2);
}
