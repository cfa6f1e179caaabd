//! temper-tokenizer: the pipeline's tokenizer stage. Trains a byte-level BPE with the chat
//! template's special tokens on the configured corpus and writes `<out>/tokenizer.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use temper_data::contract::{read_config, write_json, write_yaml};
use temper_data::tokenizer::save_tokenizer;
use temper_data::{read_rows, train_bpe, Fields, RecordParser, TextSplit, TextTokenizer};

/// Train a byte-level BPE tokenizer (with temper's chat special tokens) on a text corpus.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Stage config (YAML): corpus, vocab_size, min_frequency, text_split, fields.
    #[arg(long)]
    config: PathBuf,
    /// Output folder: tokenizer.json, summary.json, config.yaml.
    #[arg(long)]
    out: PathBuf,
    /// Check the config and inputs, then exit without training.
    #[arg(long)]
    validate: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Text files (.txt, .jsonl, .parquet) to learn merges from.
    corpus: Vec<PathBuf>,
    vocab_size: usize,
    #[serde(default = "default_min_frequency")]
    min_frequency: u64,
    #[serde(default)]
    text_split: TextSplit,
    #[serde(default)]
    fields: Fields,
    /// Pipeline-wide defaults the orchestrator passes to every stage; unused here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
}

fn default_min_frequency() -> u64 {
    2
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("temper-tokenizer: error: {e:#}");
        std::process::exit(1);
    }
}

fn validate(cfg: &Config) -> anyhow::Result<()> {
    if cfg.corpus.is_empty() {
        bail!("corpus: list at least one file");
    }
    for f in &cfg.corpus {
        if !f.is_file() {
            bail!("corpus: {} not found", f.display());
        }
    }
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<()> {
    let cfg: Config = read_config(&args.config)?;
    validate(&cfg)?;
    if args.validate {
        return Ok(());
    }
    let start = Instant::now();
    let mut docs = Vec::new();
    for path in &cfg.corpus {
        let parser = RecordParser {
            path,
            fields: &cfg.fields,
        };
        for row in read_rows(path, cfg.text_split)? {
            docs.push(parser.text(&row?)?);
        }
    }
    let tokenizer = train_bpe(docs.iter(), cfg.vocab_size, cfg.min_frequency)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("tokenizer.json");
    save_tokenizer(&tokenizer, &path)?;
    let summary = summarize(&path, &docs, start.elapsed().as_secs_f64())?;
    write_yaml(&args.out.join("config.yaml"), &cfg)?;
    write_json(&args.out.join("summary.json"), &summary)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// Vocabulary size, compression (characters per token) and an exact round-trip check.
fn summarize(path: &Path, docs: &[String], wall_time_s: f64) -> anyhow::Result<serde_json::Value> {
    let tok = TextTokenizer::load(path)?;
    let (mut chars, mut tokens) = (0usize, 0usize);
    for doc in docs.iter().take(200) {
        let ids = tok.encode(doc)?;
        if tok.decode(&ids)? != *doc {
            bail!("the trained tokenizer does not round-trip a corpus document exactly");
        }
        chars += doc.chars().count();
        tokens += ids.len();
    }
    Ok(serde_json::json!({
        "status": "ok",
        "vocab_size": tok.vocab_size(),
        "documents": docs.len(),
        "chars_per_token": chars as f64 / tokens.max(1) as f64,
        "wall_time_s": wall_time_s,
    }))
}
