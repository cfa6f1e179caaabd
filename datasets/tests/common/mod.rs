//! Helpers shared by the temper-data integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use temper_data::tokenizer::{save_tokenizer, train_bpe, TextTokenizer};
use temper_data::{read_rows, TextSplit};

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub const CORPUS: &[&str] = &[
    "The film is a delight from start to finish, funny and warm.",
    "A dull, lifeless movie that never finds its footing.",
    "Shall I compare thee to a summer's day? Thou art more lovely.",
    "The jury said the election was conducted fairly in Atlanta.",
    "Émile's café serves crème brûlée — naïve but charming. 日本語も少し。",
];

/// A small trained tokenizer with the chat special tokens.
pub fn tokenizer(dir: &Path) -> TextTokenizer {
    let docs: Vec<String> = CORPUS
        .iter()
        .cycle()
        .take(50)
        .map(|s| s.to_string())
        .collect();
    let tok = train_bpe(docs.iter(), 400, 2, false).unwrap();
    let path = dir.join("tokenizer.json");
    save_tokenizer(&tok, &path).unwrap();
    TextTokenizer::load(&path).unwrap()
}

pub fn rows_of(path: &Path) -> Vec<serde_json::Value> {
    read_rows(path, TextSplit::BlankLine)
        .unwrap()
        .map(|r| r.unwrap().value)
        .collect()
}
