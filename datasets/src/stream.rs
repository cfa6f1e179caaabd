//! The pretraining token stream: documents from any readable files, split train/validation by
//! a hash of their text (a document, or its duplicate in another file, never lands in both),
//! tokenized in parallel, joined with EOS and cut into fixed blocks. The result is cached on
//! disk under a key of (input contents, tokenizer, settings), so a rerun does not re-tokenize.

use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::read::{read_rows, TextSplit};
use crate::records::{Fields, RecordParser};
use crate::tokenizer::{TextTokenizer, EOS};

/// Bump when the stream's layout or algorithm changes, so old caches are not reused.
const CACHE_FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Tokens per training block (the model's context).
    pub block_size: usize,
    /// Share of documents (by hash) held out for validation.
    pub val_fraction: f64,
    pub text_split: TextSplit,
    pub fields: Fields,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            block_size: 256,
            val_fraction: 0.05,
            text_split: TextSplit::BlankLine,
            fields: Fields::default(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStats {
    pub documents: usize,
    pub train_documents: usize,
    pub val_documents: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Tokens after the last full block of each split, not used.
    pub dropped_tail_tokens: usize,
}

/// Token blocks, flattened: block i is `tokens[i*block_size .. (i+1)*block_size]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenStream {
    pub block_size: usize,
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub stats: StreamStats,
    /// True when this came from the on-disk cache.
    pub from_cache: bool,
}

impl TokenStream {
    pub fn train_blocks(&self) -> usize {
        self.train.len() / self.block_size
    }

    pub fn val_blocks(&self) -> usize {
        self.val.len() / self.block_size
    }

    pub fn block<'a>(&self, tokens: &'a [u32], i: usize) -> &'a [u32] {
        &tokens[i * self.block_size..(i + 1) * self.block_size]
    }
}

/// Whether a document of this text is held out: the first 8 bytes of its BLAKE3 hash as a
/// fraction of 2^64, against `val_fraction`.
pub fn is_validation(text: &str, val_fraction: f64) -> bool {
    held_out(text, val_fraction, "")
}

/// As [`is_validation`], with the hash salted: splits made for different purposes (the demo's
/// held-out snippets, then a stage's validation documents) must be independent, or the second
/// would find nothing left to hold out.
pub fn held_out(text: &str, fraction: f64, salt: &str) -> bool {
    let mut hasher = blake3::Hasher::new();
    hasher.update(salt.as_bytes());
    hasher.update(text.as_bytes());
    let h = hasher.finalize();
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < fraction
}

/// Builds (or loads from `cache_dir`) the stream of `files`.
pub fn build_stream<P: AsRef<Path>>(
    files: &[P],
    tok: &TextTokenizer,
    settings: &StreamSettings,
    cache_dir: Option<&Path>,
) -> Result<TokenStream> {
    if settings.block_size < 2 {
        return Err(DataError::Invalid(format!(
            "block_size must be at least 2, got {}",
            settings.block_size
        )));
    }
    if !(0.0..1.0).contains(&settings.val_fraction) {
        return Err(DataError::Invalid(format!(
            "val_fraction must be in [0, 1), got {}",
            settings.val_fraction
        )));
    }
    let key = cache_key(files, tok, settings)?;
    if let Some(dir) = cache_dir {
        if let Some(stream) = read_cache(&dir.join(&key), settings.block_size, tok.vocab_size()) {
            return Ok(stream);
        }
    }
    let eos = tok.require(EOS)?;
    let mut docs = Vec::new();
    for path in files {
        let path = path.as_ref();
        let parser = RecordParser {
            path,
            fields: &settings.fields,
        };
        for row in read_rows(path, settings.text_split)? {
            let row = row?;
            docs.push(parser.text(&row)?);
        }
    }
    let encoded: Vec<Result<Vec<u32>>> = docs.par_iter().map(|d| tok.encode(d)).collect();
    let mut stats = StreamStats {
        documents: docs.len(),
        ..Default::default()
    };
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (doc, ids) in docs.iter().zip(encoded) {
        let ids = ids?;
        let (dst, count) = if is_validation(doc, settings.val_fraction) {
            (&mut val, &mut stats.val_documents)
        } else {
            (&mut train, &mut stats.train_documents)
        };
        *count += 1;
        dst.extend_from_slice(&ids);
        dst.push(eos);
    }
    for split in [&mut train, &mut val] {
        let keep = split.len() / settings.block_size * settings.block_size;
        stats.dropped_tail_tokens += split.len() - keep;
        split.truncate(keep);
    }
    stats.train_tokens = train.len();
    stats.val_tokens = val.len();
    if train.is_empty() {
        return Err(DataError::Invalid(format!(
            "the training split of {} holds less than one block of {} tokens",
            files
                .iter()
                .map(|f| f.as_ref().display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            settings.block_size
        )));
    }
    let stream = TokenStream {
        block_size: settings.block_size,
        train,
        val,
        stats,
        from_cache: false,
    };
    if let Some(dir) = cache_dir {
        write_cache(&dir.join(&key), &stream)?;
    }
    Ok(stream)
}

fn cache_key<P: AsRef<Path>>(
    files: &[P],
    tok: &TextTokenizer,
    settings: &StreamSettings,
) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(&CACHE_FORMAT.to_le_bytes());
    h.update(
        serde_json::to_string(settings)
            .expect("settings serialise")
            .as_bytes(),
    );
    for path in std::iter::once(tok.path.as_path()).chain(files.iter().map(AsRef::as_ref)) {
        let mut file = std::fs::File::open(path).map_err(DataError::io(path))?;
        let mut fh = blake3::Hasher::new();
        std::io::copy(&mut file, &mut fh).map_err(DataError::io(path))?;
        h.update(fh.finalize().as_bytes());
    }
    Ok(h.finalize().to_hex()[..32].to_string())
}

/// A cached stream, if a complete and consistent entry exists. An entry that is damaged (cut
/// short, edited, or from a tokenizer with fewer tokens) is a miss: it is removed, with a
/// warning, and the stream is built again.
fn read_cache(dir: &Path, block_size: usize, vocab: usize) -> Option<TokenStream> {
    let meta = dir.join("stats.json");
    if !meta.exists() {
        return None;
    }
    let read = |name: &str| -> Option<Vec<u32>> {
        let bytes = std::fs::read(dir.join(name)).ok()?;
        (bytes.len() % 4 == 0).then(|| {
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    };
    let entry = (|| {
        let stats: StreamStats = serde_json::from_slice(&std::fs::read(&meta).ok()?).ok()?;
        let (train, val) = (read("train.u32")?, read("val.u32")?);
        let consistent = train.len() == stats.train_tokens
            && val.len() == stats.val_tokens
            && train.len() % block_size == 0
            && val.len() % block_size == 0
            && !train.is_empty()
            && train.iter().chain(&val).all(|&t| (t as usize) < vocab);
        consistent.then_some(TokenStream {
            block_size,
            train,
            val,
            stats,
            from_cache: true,
        })
    })();
    if entry.is_none() {
        tracing::warn!("token cache {} is damaged; rebuilding it", dir.display());
        let _ = std::fs::remove_dir_all(dir);
    }
    entry
}

/// Writes the entry into a temporary folder and renames it into place, so a reader never sees a
/// half-written entry.
fn write_cache(dir: &Path, stream: &TokenStream) -> Result<()> {
    let parent = dir.parent().expect("cache entry has a parent");
    std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("entry")
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(DataError::io(&tmp))?;
    for (name, tokens) in [("train.u32", &stream.train), ("val.u32", &stream.val)] {
        let p = tmp.join(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(DataError::io(&p))?);
        for t in tokens {
            f.write_all(&t.to_le_bytes()).map_err(DataError::io(&p))?;
        }
        f.flush().map_err(DataError::io(&p))?;
    }
    let meta = tmp.join("stats.json");
    std::fs::write(
        &meta,
        serde_json::to_vec_pretty(&stream.stats).expect("stats serialise"),
    )
    .map_err(DataError::io(&meta))?;
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process finished the same entry first; theirs is identical.
        Err(_) if dir.join("stats.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(DataError::io(dir)(e)),
    }
}
