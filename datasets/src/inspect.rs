//! `temper-data inspect`: what a stage will train on — row count, token statistics, the share
//! over the context, and one example rendered with its loss mask visible.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::batch::Overlong;
use crate::chat::{ChatTemplate, Example};
use crate::error::Result;
use crate::load::LoadOptions;
use crate::read::{read_rows, TextSplit};
use crate::records::{Fields, RecordParser};
use crate::tokenizer::TextTokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Text,
    Sft,
    Pairs,
    Prompts,
}

/// Renders `ex` with trained tokens inside «…»; context tokens are shown plain.
pub fn render_with_mask(tok: &TextTokenizer, ex: &Example) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < ex.len() {
        let trained = ex.loss_mask[i] == 1;
        let start = i;
        while i < ex.len() && (ex.loss_mask[i] == 1) == trained {
            i += 1;
        }
        let text = tok.decode(&ex.ids[start..i])?;
        if trained {
            let _ = write!(out, "«{text}»");
        } else {
            out.push_str(&text);
        }
    }
    Ok(out)
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The report as text.
pub fn inspect(
    path: &Path,
    kind: DatasetKind,
    tok: &TextTokenizer,
    max_len: usize,
    example: usize,
) -> Result<String> {
    let fields = Fields::default();
    // Over-long examples are counted here, not fatal: inspection is how a user finds them.
    let examples: Vec<Example> = match kind {
        DatasetKind::Text => {
            let parser = RecordParser {
                path,
                fields: &fields,
            };
            let mut v = Vec::new();
            for row in read_rows(path, TextSplit::File)? {
                let ids = tok.encode(&parser.text(&row?)?)?;
                v.push(Example {
                    loss_mask: vec![1; ids.len()],
                    ids,
                });
            }
            v
        }
        _ => {
            let opts = LoadOptions {
                tokenizer: tok,
                template: ChatTemplate::new(tok)?,
                fields: &fields,
                max_len: usize::MAX,
                overlong: Overlong::Error,
                train_on_prompt: false,
            };
            match kind {
                DatasetKind::Sft => opts.sft(path)?.0,
                DatasetKind::Pairs => opts
                    .pairs(path)?
                    .0
                    .into_iter()
                    .flat_map(|p| [p.chosen, p.rejected])
                    .collect(),
                _ => opts
                    .prompts(path)?
                    .0
                    .into_iter()
                    .map(|(ids, _)| Example {
                        loss_mask: vec![0; ids.len()],
                        ids,
                    })
                    .collect(),
            }
        }
    };
    let mut lengths: Vec<usize> = examples.iter().map(Example::len).collect();
    lengths.sort_unstable();
    let over = lengths.iter().filter(|&&l| l > max_len).count();
    let trained: usize = examples
        .iter()
        .map(|e| e.loss_mask.iter().map(|&m| m as usize).sum::<usize>())
        .sum();
    let total: usize = lengths.iter().sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} {:?} examples",
        path.display(),
        examples.len(),
        kind
    );
    let _ = writeln!(
        out,
        "tokens per example: mean {:.1}, median {}, p95 {}, max {}",
        total as f64 / examples.len() as f64,
        percentile(&lengths, 0.5),
        percentile(&lengths, 0.95),
        lengths[lengths.len() - 1]
    );
    let _ = writeln!(
        out,
        "over the context of {max_len}: {over} ({:.1} %); trained tokens: {trained} of {total} ({:.1} %)",
        100.0 * over as f64 / examples.len() as f64,
        100.0 * trained as f64 / total.max(1) as f64
    );
    let i = example.min(examples.len() - 1);
    let _ = writeln!(
        out,
        "\nexample {i} ({} tokens; «trained»):\n{}",
        examples[i].len(),
        render_with_mask(tok, &examples[i])?
    );
    Ok(out)
}
