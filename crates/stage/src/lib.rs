//! temper-stage: the contract between the orchestrator and every stage binary, with no tch.
//!
//! A stage binary is `temper-<kind> --config FILE --out DIR [--validate]`. This crate holds
//! what all of them (and the orchestrator) must agree on: the arguments and exit codes
//! ([`cli`], [`exit`]), configs whose errors name the file, line and key ([`config`],
//! [`yaml_lines`]), which keys of each stage kind are input paths ([`kinds`]), the stage folder
//! with its marker and lock ([`folder`]), atomic writes ([`atomic`]), the metrics, samples and
//! summary files ([`metrics`]), training cadences ([`cadence`]) and signal handling
//! ([`signals`]). Tensors, models and optimizer state live in temper-core.

pub mod adapter;
pub mod atomic;
pub mod cadence;
pub mod cli;
pub mod clock;
pub mod config;
pub mod exit;
pub mod folder;
pub mod footprint;
pub mod inputs;
pub mod kinds;
pub mod metrics;
pub mod paths;
pub mod progress;
pub mod signals;
pub mod tensorboard;
pub mod yaml_lines;

pub use cadence::{Cadence, Every, Throughput};
pub use cli::{checked_config, main_with, stage_main, StageArgs};
pub use config::{ConfigFile, FieldError};
pub use exit::{
    check_finite, invalid, Interrupted, NonFinite, StageError, EXIT_FAILED, EXIT_INTERRUPTED,
    EXIT_INVALID, EXIT_NON_FINITE,
};
pub use folder::StageFolder;
pub use inputs::{Availability, Inputs};
pub use kinds::StageKind;
pub use metrics::{step_fields, MetricsLog, Summary};
pub use paths::{CachePath, CommandLine, InputPath};
pub use progress::{progress_bar, Progress, StepProgress};

/// Overrides what `precision: auto` resolves to (`fp32` or `bf16`), whatever the hardware:
/// the test script runs the suite once in the precision auto picks and once in the other.
/// `temper` makes its value part of every stage's cache key, so results of one precision are
/// never taken for the other's.
pub const AUTO_PRECISION_VAR: &str = "TEMPER_AUTO_PRECISION";
