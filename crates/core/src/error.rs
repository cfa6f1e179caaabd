//! Errors of the model core. Each variant carries what a user needs to fix the cause: the file,
//! the field, the tensor name and shapes.

use std::path::PathBuf;

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Torch(#[from] tch::TchError),

    #[error(transparent)]
    Data(#[from] temper_data::DataError),

    #[error(transparent)]
    Reward(#[from] temper_rewards::RewardError),

    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    #[error("invalid model shape: {0}")]
    InvalidModel(String),

    #[error("device: {0}")]
    Device(String),

    #[error("{path}: checkpoint does not match the model: {}", describe_mismatch(.missing, .unexpected, .mismatched))]
    CheckpointMismatch {
        path: PathBuf,
        missing: Vec<String>,
        unexpected: Vec<String>,
        /// (name, shape the model expects, shape in the file)
        mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
    },

    /// A training state that cannot be resumed: what is wrong, and how to start over.
    #[error("{path} cannot be resumed: {message}; {}", temper_stage::cli::fresh_hint(.path))]
    State { path: PathBuf, message: String },

    #[error("{path} was written under a different config: restore that config to resume it, or {}", temper_stage::cli::fresh_hint(.path))]
    StateMismatch { path: PathBuf },

    #[error("optimizer state: {0}")]
    OptimizerState(String),

    #[error("{0}")]
    Shape(String),

    #[error("libtorch: {0}")]
    Native(String),
}

fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    mismatched: &[(String, Vec<i64>, Vec<i64>)],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing tensor(s) {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected tensor(s) {}", unexpected.join(", ")));
    }
    for (name, want, got) in mismatched {
        parts.push(format!(
            "{name} has shape {got:?}, the model expects {want:?}"
        ));
    }
    parts.join("; ")
}
