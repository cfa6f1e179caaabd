//! Rewards a program computes rather than a model: the independent sentiment judge (VADER's
//! lexicon) used by evaluation.

pub mod lexicon;

pub use lexicon::{SentimentJudge, Verdict};
