//! temper-sft: sft (placeholder until the stage-binaries issue lands).
use clap::Parser;

/// Prompt-masked supervised fine-tuning on chat-templated examples.
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("temper-sft: training is not built yet; see `--help`");
    std::process::exit(2);
}
