//! Exit codes and the errors that choose them. Every stage binary (and `temper`) exits with:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success: the checkpoint (or the stage's outputs) are complete |
//! | 1 | failed while running (an I/O error, a libtorch error, an internal error) |
//! | 2 | invalid config or inputs: nothing was trained and nothing was touched |
//! | 3 | stopped by the NaN/inf guard: `state/` holds the last good weights |
//! | 130 | interrupted by a signal: `state/` was saved first, the next run resumes |

use std::fmt;

pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
pub const EXIT_NON_FINITE: i32 = 3;
pub const EXIT_INTERRUPTED: i32 = 130;

/// An error with the exit code it should produce.
#[derive(Debug)]
pub struct StageError {
    pub code: i32,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for StageError {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = if error.downcast_ref::<NonFinite>().is_some() {
            EXIT_NON_FINITE
        } else if error.downcast_ref::<Interrupted>().is_some() {
            EXIT_INTERRUPTED
        } else if error.downcast_ref::<crate::config::FieldError>().is_some() {
            EXIT_INVALID
        } else {
            EXIT_FAILED
        };
        Self { code, error }
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// Marks an error as a config/input problem (exit 2).
pub fn invalid(e: impl Into<anyhow::Error>) -> StageError {
    StageError {
        code: EXIT_INVALID,
        error: e.into(),
    }
}

/// The NaN/inf guard's error: the step and the value, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("loss is {value} at step {step}: training stopped; state/ holds the last good weights (after step {last_good}). Lower optim.lr or raise optim.warmup_steps and run again")]
pub struct NonFinite {
    pub step: u64,
    pub value: f64,
    pub last_good: u64,
}

/// Fails with [`NonFinite`] when `loss` is NaN or infinite.
pub fn check_finite(loss: f64, step: u64, last_good: u64) -> Result<(), NonFinite> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(NonFinite {
            step,
            value: loss,
            last_good,
        })
    }
}

/// A stage stopped by SIGINT, SIGTERM or SIGHUP after saving its state.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal after step {step}; state/ is saved and the next run resumes from it")]
pub struct Interrupted {
    pub step: u64,
}
