//! How often a training loop logs, evaluates and saves, and its throughput window.

use std::num::NonZeroU64;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// "Every N steps", N ≥ 1: a zero is rejected when the config is read, with its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "u64")]
pub struct Every(NonZeroU64);

impl<'de> Deserialize<'de> for Every {
    // A visitor rather than `try_from`: an error raised while the number is being read keeps
    // the position of the number, so the message names its line.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Every;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of steps, at least 1")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Every, E> {
                Every::try_from(n).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Every, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom("must be at least 1 (a number of steps)"))
                    .and_then(|n| self.visit_u64(n))
            }
        }
        d.deserialize_u64(V)
    }
}

impl Every {
    pub const fn new(n: u64) -> Self {
        match NonZeroU64::new(n) {
            Some(n) => Every(n),
            None => panic!("Every::new(0)"),
        }
    }

    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// Whether step `step` (1-based, after the update) is one of ours; the last step of a run
    /// always is, so a run ends logged, evaluated and saved.
    pub fn due(self, step: u64, last: u64) -> bool {
        step.is_multiple_of(self.0.get()) || step == last
    }
}

impl TryFrom<u64> for Every {
    type Error = String;
    fn try_from(n: u64) -> Result<Self, String> {
        NonZeroU64::new(n)
            .map(Every)
            .ok_or_else(|| "must be at least 1 (a number of steps)".to_string())
    }
}

impl From<Every> for u64 {
    fn from(e: Every) -> u64 {
        e.get()
    }
}

/// Serde defaults for the cadence keys: `eval_every`/`save_every` 100, `log_every` 10.
pub fn every_100() -> Every {
    Every::new(100)
}
pub fn every_10() -> Every {
    Every::new(10)
}

/// The three cadences of a training stage.
#[derive(Clone, Debug)]
pub struct Cadence {
    pub log: Every,
    pub eval: Every,
    pub save: Every,
    /// The run's last step.
    pub last: u64,
    /// Whether the last [`Cadence::save_due`] saw a stop request: the loop saves, then stops.
    stopping: std::cell::Cell<bool>,
}

impl Cadence {
    pub fn new(log: Every, eval: Every, save: Every, last: u64) -> Self {
        Self {
            log,
            eval,
            save,
            last,
            stopping: std::cell::Cell::new(false),
        }
    }

    pub fn log_due(&self, step: u64) -> bool {
        self.log.due(step, self.last)
    }
    pub fn eval_due(&self, step: u64) -> bool {
        self.eval.due(step, self.last)
    }
    /// Also due when a stop was asked for: the loop saves, then [`Cadence::stop_if_asked`]
    /// ends it. The request is read once here, so no stop slips between the save and the end.
    pub fn save_due(&self, step: u64) -> bool {
        self.stopping.set(crate::signals::stop_requested());
        self.save.due(step, self.last) || self.stopping.get()
    }

    /// Ends the loop (exit 130) when the last `save_due` saw a stop request.
    pub fn stop_if_asked(&self, step: u64) -> Result<(), crate::Interrupted> {
        if self.stopping.get() {
            Err(crate::Interrupted { step })
        } else {
            Ok(())
        }
    }
    /// The last step a save happened at or before `step`: what state/ holds.
    pub fn last_saved(&self, step: u64) -> u64 {
        step / self.save.get() * self.save.get()
    }
}

/// Tokens per second since the last reading.
pub struct Throughput {
    since: Instant,
    tokens: u64,
}

impl Default for Throughput {
    fn default() -> Self {
        Self::new()
    }
}

impl Throughput {
    pub fn new() -> Self {
        Self {
            since: Instant::now(),
            tokens: 0,
        }
    }

    pub fn add(&mut self, tokens: u64) {
        self.tokens += tokens;
    }

    /// The rate over the window, then a new window.
    pub fn take(&mut self) -> f64 {
        let rate = self.tokens as f64 / self.since.elapsed().as_secs_f64().max(1e-9);
        *self = Self::new();
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_rejected_and_the_last_step_is_always_due() {
        assert!(serde_yaml::from_str::<Every>("0").is_err());
        let e: Every = serde_yaml::from_str("10").unwrap();
        assert!(e.due(20, 35) && !e.due(21, 35) && e.due(35, 35));
    }
}
