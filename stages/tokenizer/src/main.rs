//! temper-tokenizer: the pipeline's tokenizer stage. Trains a byte-level BPE with the chat
//! template's special tokens on the configured corpus, checks an exact round trip, and writes
//! `<out>/tokenizer.json`. No model, so no libtorch.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use temper_data::tokenizer::save_tokenizer;
use temper_data::{read_rows, train_bpe, Fields, RecordParser, TextSplit, TextTokenizer};
use temper_stage::{
    ConfigFile, InputPath, Inputs, MetricsLog, StageArgs, StageError, StageFolder, StageKind,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Text files (.txt, .jsonl, .parquet) to learn merges from.
    corpus: Vec<InputPath>,
    /// Entries in the vocabulary, special tokens and the 256 byte symbols included.
    vocab_size: usize,
    #[serde(default = "default_min_frequency")]
    min_frequency: u64,
    #[serde(default)]
    text_split: TextSplit,
    #[serde(default)]
    fields: Fields,
    /// Every digit its own token (numbers spelled digit by digit), for arithmetic.
    #[serde(default)]
    split_digits: bool,
    /// Pipeline-wide defaults the orchestrator passes to every stage; unused here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    precision: Option<String>,
}

fn default_min_frequency() -> u64 {
    2
}

fn main() {
    temper_stage::stage_main(
        "temper-tokenizer",
        "Train a byte-level BPE tokenizer (with temper's chat special tokens) on a text corpus.",
        run,
    )
}

fn run(args: &StageArgs) -> Result<(), StageError> {
    let cfg = ConfigFile::<Config>::load(&args.config, StageKind::Tokenizer)?;
    let c = &cfg.value;
    cfg.ensure(!c.corpus.is_empty(), "corpus", "list at least one file")?;
    cfg.ensure(
        c.vocab_size > temper_data::tokenizer::MIN_VOCAB,
        "vocab_size",
        format!(
            "must be above {} (the 256 byte symbols and the special tokens), got {}",
            temper_data::tokenizer::MIN_VOCAB,
            c.vocab_size
        ),
    )?;
    cfg.ensure(
        c.vocab_size <= 1 << 20,
        "vocab_size",
        format!("at most 1048576, got {}", c.vocab_size),
    )?;
    let mut inputs = Inputs::new(&args.pending);
    for f in &c.corpus {
        inputs.file(&cfg, "corpus", f)?;
    }
    temper_stage::folder::check(&args.out)?;
    if args.validate {
        return cfg.print_resolved();
    }

    let folder = StageFolder::claim(&args.out, "tokenizer")?;
    let log = MetricsLog::open(&folder.path)?;
    let start = Instant::now();
    let mut docs = Vec::new();
    for path in &c.corpus {
        let parser = RecordParser {
            path,
            fields: &c.fields,
        };
        for row in read_rows(path, c.text_split).map_err(temper_stage::invalid)? {
            let row = row.map_err(temper_stage::invalid)?;
            docs.push(parser.text(&row).map_err(temper_stage::invalid)?);
        }
    }
    if docs.iter().all(|d| d.trim().is_empty()) {
        return Err(cfg.error("corpus", "the files hold no text"));
    }
    cfg.write_resolved(&folder.path)?;
    let tokenizer = train_bpe(docs.iter(), c.vocab_size, c.min_frequency, c.split_digits)?;
    let path = folder.path.join("tokenizer.json");
    save_tokenizer(&tokenizer, &path)?;
    let summary = summarize(&path, &docs)?;
    log.write_summary("ok", summary)?;
    tracing::info!(
        "tokenizer: {} entries from {} documents in {:.1}s",
        c.vocab_size,
        docs.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Vocabulary size, compression (characters per token) and an exact round-trip check.
fn summarize(path: &Path, docs: &[String]) -> anyhow::Result<temper_stage::Summary> {
    let tok = TextTokenizer::load(path).context("reloading the trained tokenizer")?;
    let (mut chars, mut tokens) = (0usize, 0usize);
    for doc in docs.iter().take(200) {
        let ids = tok.encode(doc)?;
        if tok.decode(&ids)? != *doc {
            bail!("the trained tokenizer does not round-trip a corpus document exactly");
        }
        chars += doc.chars().count();
        tokens += ids.len();
    }
    let mut s = temper_stage::Summary::new();
    s.insert("vocab_size".into(), tok.vocab_size().into());
    s.insert("documents".into(), docs.len().into());
    s.insert(
        "chars_per_token".into(),
        (chars as f64 / tokens.max(1) as f64).into(),
    );
    Ok(s)
}
