//! temper-data: prepare the demo data, train a tokenizer by hand, inspect a dataset.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
mod arith;
mod demo;

use arith::prepare_arith;
use demo::prepare_demo;
use temper_data::inspect::{inspect, DatasetKind};
use temper_data::TextTokenizer;

#[derive(Parser)]
#[command(
    version,
    about = "temper's data tools: demo data preparation and dataset inspection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert the raw packages fetched by scripts/fetch_data.sh into the demo's parquet files
    /// (general and domain corpora, SFT, preference pairs, PPO and evaluation prompts).
    PrepareDemo {
        /// Folder scripts/fetch_data.sh printed (default: ~/.cache/temper/raw).
        #[arg(long)]
        raw: Option<PathBuf>,
        /// Output folder for the parquet files.
        #[arg(long, default_value = "data/demo")]
        out: PathBuf,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
    },
    /// Generate the arithmetic demo's data (configs/arith.yaml): every `a+b` and `a-b` with
    /// operands up to --max-operand, split by a seeded hash into held-out, pretraining/SFT
    /// and RL sets, as parquet (corpus, SFT, RL prompts and evaluation prompts with answers).
    PrepareArith {
        #[arg(long, default_value = "data/arith")]
        out: PathBuf,
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        #[arg(long, default_value_t = 49)]
        max_operand: i64,
        /// SFT examples (the rest of the pretraining set is only seen as text).
        #[arg(long, default_value_t = 2000)]
        sft_rows: usize,
        /// Write the column-by-column working before each answer, in the corpus and the SFT
        /// replies (`47+38: 7+8+0=15, 4+3+1=8, answer 85`); the answers stay bare numbers.
        #[arg(long)]
        show_work: bool,
    },
    /// Show what a stage will train on: counts, token statistics and one example with its
    /// loss mask («trained» tokens marked).
    Inspect {
        /// A .jsonl, .parquet or .txt dataset.
        file: PathBuf,
        #[arg(long, value_enum)]
        kind: DatasetKind,
        /// tokenizer.json to count tokens with.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Context length to measure over-long examples against.
        #[arg(long, default_value_t = 256)]
        max_len: usize,
        /// Which example to render.
        #[arg(long, default_value_t = 0)]
        example: usize,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("temper-data: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::PrepareDemo { raw, out, seed } => {
            let raw = match raw {
                Some(r) => r,
                None => std::env::var_os("TEMPER_CACHE")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/temper"))
                    })
                    .context("set --raw or HOME")?
                    .join("raw"),
            };
            let counts = prepare_demo(&raw, &out, seed)?;
            println!("wrote {}:", out.display());
            println!("{}", serde_json::to_string_pretty(&counts)?);
        }
        Command::PrepareArith {
            out,
            seed,
            max_operand,
            sft_rows,
            show_work,
        } => {
            anyhow::ensure!(
                (1..=9999).contains(&max_operand),
                "--max-operand must be in 1..=9999"
            );
            let counts = prepare_arith(&out, seed, max_operand, sft_rows, show_work)?;
            println!("wrote {}:", out.display());
            println!("{}", serde_json::to_string_pretty(&counts)?);
        }
        Command::Inspect {
            file,
            kind,
            tokenizer,
            max_len,
            example,
        } => {
            let tok = TextTokenizer::load(&tokenizer)?;
            print!("{}", inspect(&file, kind, &tok, max_len, example)?);
        }
    }
    Ok(())
}
