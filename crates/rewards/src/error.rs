//! What can go wrong with a program reward: its file, its settings, the program a `command`
//! runs, or a prompt that lacks a field the reward reads. Each names what to fix.

use std::path::PathBuf;

pub type Result<T, E = RewardError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A lexicon file line that is not `word<TAB>valence`.
    #[error("{path}: {at}: {message}")]
    File {
        path: PathBuf,
        at: String,
        message: String,
    },

    /// A reward's settings, a program that failed, or a prompt without a field it reads.
    #[error("{0}")]
    Invalid(String),
}
