//! temper-pretrain: next-token training (placeholder until the stage-binaries issue lands).
use clap::Parser;

/// Next-token training from scratch or from a checkpoint (continued pretraining).
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("temper-pretrain: training is not built yet; see `--help`");
    std::process::exit(2);
}
