//! Rewards a program computes rather than a model: the independent sentiment judge (VADER)
//! used by evaluation.

pub mod vader;

pub use vader::{SentimentJudge, Verdict};
