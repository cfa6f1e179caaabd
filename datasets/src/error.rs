//! Data errors name the file, the line (JSONL, text) or row (parquet), and the field, so the
//! one line a user sees says where to look and what to fix.

use std::fmt;
use std::path::PathBuf;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Where in a file a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a JSONL or text file.
    Line(usize),
    /// 0-based row of a parquet file.
    Row(usize),
    /// 1-based document of a text file.
    Document(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Row(n) => write!(f, "row {n}"),
            Location::Document(n) => write!(f, "document {n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}:{line}: malformed JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{path}: {location}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        location: Location,
        field: String,
        message: String,
    },

    #[error("{path}: no records: the file is empty")]
    Empty { path: PathBuf },

    #[error("{path}: unreadable parquet: {message}")]
    Parquet { path: PathBuf, message: String },

    #[error("{path}: {location}: example has {len} tokens, over the limit of {max}; set `overlong: truncate` or `skip`, or raise the limit")]
    TooLong {
        path: PathBuf,
        location: Location,
        len: usize,
        max: usize,
    },

    #[error("{path}: unsupported file type: use .txt, .jsonl or .parquet")]
    UnsupportedFormat { path: PathBuf },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
        let path = path.into();
        move |source| DataError::Io { path, source }
    }
}
