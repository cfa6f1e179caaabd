//! Rewards a program computes from a reply and its prompt's fields: an exact answer, a
//! pattern, a length range, the sentiment lexicon, or a user's own command. (The reward model,
//! which reads tensors, is scored by the RL stage itself.) Each is configured under `rewards:`
//! with a `weight`; the stage logs each as `reward/<name>`.

use std::collections::BTreeMap;
use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use temper_stage::{CommandLine, ConfigFile, InputPath, Inputs, StageError};

use crate::afinn::Afinn;
use crate::command::CommandReward;
use crate::error::{Result, RewardError};
use crate::sign::ScoreSign;
use crate::vader::SentimentJudge;

fn one() -> f64 {
    1.0
}

/// One entry of a stage's `rewards:` list.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// A reward model checkpoint (scored with its own pooling and sign).
    Model {
        path: InputPath,
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        name: Option<String>,
    },
    /// 1 when the reply's final answer equals the example's `field`, numerically when both
    /// parse as numbers; 0 otherwise. The answer is the last match of `pattern` (default: the
    /// last number in the reply).
    ExactMatch {
        #[serde(default = "default_answer_field")]
        field: String,
        #[serde(default)]
        pattern: Option<String>,
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        name: Option<String>,
    },
    /// 1 when the reply matches `pattern` anywhere, else 0 (a format check).
    Regex {
        pattern: String,
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        name: Option<String>,
    },
    /// 0 inside [min, max] reply tokens, −penalty per token outside.
    Length {
        min: usize,
        max: usize,
        #[serde(default = "default_penalty")]
        penalty: f64,
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        name: Option<String>,
    },
    /// The VADER compound score of the reply, times an optional sign from the prompt's label.
    Lexicon {
        path: InputPath,
        #[serde(default)]
        sign_by: Option<ScoreSign>,
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        name: Option<String>,
    },
    /// The AFINN-165 comparative score of the reply (valence sum over tokens), times an
    /// optional sign from the prompt's label: a second lexicon, independent of VADER.
    Afinn {
        path: InputPath,
        #[serde(default)]
        sign_by: Option<ScoreSign>,
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        name: Option<String>,
    },
    /// A user program started once and fed one JSON object per line on stdin
    /// (`{"prompt", "reply", …the example's fields}`); it answers one number per line.
    Command {
        /// The program and its arguments. The program and every argument naming an existing
        /// file or folder are part of the stage's cache key, by content.
        command: CommandLine,
        /// Other files or folders the program reads (a module its script imports, a judge
        /// model, a file an option names): part of the cache key by content, like the command.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        inputs: Vec<InputPath>,
        #[serde(default = "default_timeout")]
        timeout_s: f64,
        #[serde(default = "one")]
        weight: f64,
        #[serde(default)]
        name: Option<String>,
    },
}

fn default_answer_field() -> String {
    "answer".into()
}
fn default_penalty() -> f64 {
    0.01
}
fn default_timeout() -> f64 {
    10.0
}

impl RewardSpec {
    pub fn weight(&self) -> f64 {
        match self {
            RewardSpec::Model { weight, .. }
            | RewardSpec::ExactMatch { weight, .. }
            | RewardSpec::Regex { weight, .. }
            | RewardSpec::Length { weight, .. }
            | RewardSpec::Lexicon { weight, .. }
            | RewardSpec::Afinn { weight, .. }
            | RewardSpec::Command { weight, .. } => *weight,
        }
    }

    /// The name its metrics carry: `name`, else the kind.
    pub fn name(&self) -> String {
        let (name, kind) = match self {
            RewardSpec::Model { name, .. } => (name, "model"),
            RewardSpec::ExactMatch { name, .. } => (name, "exact_match"),
            RewardSpec::Regex { name, .. } => (name, "regex"),
            RewardSpec::Length { name, .. } => (name, "length"),
            RewardSpec::Lexicon { name, .. } => (name, "lexicon"),
            RewardSpec::Afinn { name, .. } => (name, "afinn"),
            RewardSpec::Command { name, .. } => (name, "command"),
        };
        name.clone().unwrap_or_else(|| kind.to_string())
    }
}

/// What a program reward reads of one reply.
pub struct Scored<'a> {
    pub prompt: &'a str,
    pub reply: &'a str,
    pub reply_tokens: usize,
    pub fields: &'a BTreeMap<String, Value>,
}

/// A text reward ready to score.
pub enum TextReward {
    ExactMatch {
        field: String,
        pattern: Regex,
    },
    Regex(Regex),
    Length {
        min: usize,
        max: usize,
        penalty: f64,
    },
    Lexicon {
        judge: SentimentJudge,
        sign: Option<ScoreSign>,
    },
    Afinn {
        lexicon: Afinn,
        sign: Option<ScoreSign>,
    },
    Command(CommandReward),
}

/// The last number in a reply, signs and decimals included.
pub const DEFAULT_ANSWER_PATTERN: &str = r"-?\d+(?:\.\d+)?";

impl TextReward {
    /// Builds the reward a spec describes; None for a model reward. Errors name the problem.
    pub fn new(spec: &RewardSpec) -> Result<Option<TextReward>> {
        let regex = |p: &str| compile_pattern(p).map_err(RewardError::Invalid);
        Ok(Some(match spec {
            RewardSpec::Model { .. } => return Ok(None),
            RewardSpec::ExactMatch { field, pattern, .. } => TextReward::ExactMatch {
                field: field.clone(),
                pattern: regex(pattern.as_deref().unwrap_or(DEFAULT_ANSWER_PATTERN))?,
            },
            RewardSpec::Regex { pattern, .. } => TextReward::Regex(regex(pattern)?),
            RewardSpec::Length {
                min, max, penalty, ..
            } => {
                if min > max {
                    return Err(RewardError::Invalid(format!(
                        "length: min {min} is above max {max}"
                    )));
                }
                TextReward::Length {
                    min: *min,
                    max: *max,
                    penalty: *penalty,
                }
            }
            RewardSpec::Lexicon { path, sign_by, .. } => TextReward::Lexicon {
                judge: SentimentJudge::load(path)?,
                sign: sign_by.clone(),
            },
            RewardSpec::Afinn { path, sign_by, .. } => TextReward::Afinn {
                lexicon: Afinn::load(path)?,
                sign: sign_by.clone(),
            },
            RewardSpec::Command {
                command, timeout_s, ..
            } => TextReward::Command(CommandReward::start(command, *timeout_s)?),
        }))
    }

    /// Checks that an example has what this reward reads (its answer field, its label).
    pub fn check_fields(
        &self,
        fields: &BTreeMap<String, Value>,
    ) -> std::result::Result<(), String> {
        match self {
            TextReward::ExactMatch { field, .. } if !fields.contains_key(field) => Err(format!(
                "exact_match reads `{field}`, which the example lacks"
            )),
            TextReward::Lexicon { sign: Some(s), .. } | TextReward::Afinn { sign: Some(s), .. } => {
                s.sign(fields).map(|_| ()).map_err(|e| e.to_string())
            }
            _ => Ok(()),
        }
    }

    pub fn score(&mut self, x: &Scored) -> Result<f64> {
        Ok(match self {
            TextReward::ExactMatch { field, pattern } => {
                let answer = pattern.find_iter(x.reply).last().map(|m| m.as_str());
                f64::from(u8::from(
                    answer.is_some_and(|a| same_answer(a, &x.fields[field])),
                ))
            }
            TextReward::Regex(r) => f64::from(u8::from(r.is_match(x.reply))),
            TextReward::Length { min, max, penalty } => {
                let n = x.reply_tokens;
                let outside = n.saturating_sub(*max) + min.saturating_sub(n);
                -(outside as f64) * *penalty
            }
            TextReward::Lexicon { judge, sign } => {
                judge.judge(x.reply).compound * sign_for(sign, x.fields)?
            }
            TextReward::Afinn { lexicon, sign } => {
                lexicon.score(x.reply).comparative * sign_for(sign, x.fields)?
            }
            TextReward::Command(c) => c.score(x)?,
        })
    }
}

/// The prompt's sign under `sign` (1 without one).
fn sign_for(sign: &Option<ScoreSign>, fields: &BTreeMap<String, Value>) -> Result<f64> {
    sign.as_ref().map_or(Ok(1.0), |s| s.sign(fields))
}

/// Whether `got` (text from a reply) is the expected answer: numerically equal when both are
/// numbers, else the same text after trimming.
pub fn same_answer(got: &str, expected: &Value) -> bool {
    let expected_text = match expected {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    };
    match (got.trim().parse::<f64>(), expected_text.parse::<f64>()) {
        (Ok(a), Ok(b)) => (a - b).abs() < 1e-9,
        _ => got.trim() == expected_text,
    }
}

/// The first entry whose metric name an earlier entry already has, with why that is refused:
/// each reward is logged as `reward/<name>`, so two of one name would be one curve.
pub fn repeated_name(specs: &[RewardSpec]) -> Option<(usize, String)> {
    specs.iter().enumerate().find_map(|(i, spec)| {
        let name = spec.name();
        specs[..i].iter().any(|s| s.name() == name).then(|| {
            (
                i,
                format!("a second reward named `{name}`: give one a `name`"),
            )
        })
    })
}

/// A reward's answer or format pattern, compiled; the error quotes it.
pub fn compile_pattern(p: &str) -> std::result::Result<Regex, String> {
    Regex::new(p).map_err(|e| format!("pattern `{p}`: {e}"))
}

/// What a list of rewards at `key` (`rewards:`, `labeller:`) must satisfy before anything
/// loads, each problem named at its key (`rewards.1.pattern`): finite weights, patterns that compile, a length range that is one,
/// a command with a program that exists and a positive timeout, and every file present
/// (pending where an upstream stage writes it). A `model` reward is refused with the reason
/// `refuse_models` gives, where it gives one.
pub fn check_rewards<T>(
    cfg: &ConfigFile<T>,
    inputs: &mut Inputs,
    key: &str,
    rewards: &[RewardSpec],
    refuse_models: Option<&str>,
) -> std::result::Result<(), StageError> {
    for (i, r) in rewards.iter().enumerate() {
        let at = |field: &str| format!("{key}.{i}.{field}");
        cfg.ensure(
            r.weight().is_finite(),
            &at("weight"),
            "must be a finite number",
        )?;
        match r {
            RewardSpec::Model { path, .. } => {
                if let Some(why) = refuse_models {
                    return Err(cfg.error(&at("kind"), why));
                }
                inputs.checkpoint(cfg, &at("path"), path, true)?;
            }
            RewardSpec::ExactMatch {
                pattern: Some(p), ..
            }
            | RewardSpec::Regex { pattern: p, .. } => {
                compile_pattern(p).map_err(|e| cfg.error(&at("pattern"), e))?;
            }
            RewardSpec::ExactMatch { pattern: None, .. } => {}
            RewardSpec::Length {
                min, max, penalty, ..
            } => {
                cfg.ensure(min <= max, &at("min"), format!("{min} is above max {max}"))?;
                cfg.ensure(
                    penalty.is_finite() && *penalty >= 0.0,
                    &at("penalty"),
                    "must be ≥ 0",
                )?;
            }
            RewardSpec::Lexicon { path, .. } | RewardSpec::Afinn { path, .. } => {
                inputs.file(cfg, &at("path"), path)?;
            }
            RewardSpec::Command {
                command,
                timeout_s,
                inputs: read,
                ..
            } => {
                let Some(program) = command.first() else {
                    return Err(cfg.error(
                        &at("command"),
                        "is empty: give the program and its arguments",
                    ));
                };
                cfg.ensure(
                    timeout_s.is_finite() && *timeout_s > 0.0,
                    &at("timeout_s"),
                    format!("must be positive, got {timeout_s}"),
                )?;
                if program.contains('/') {
                    inputs.file(cfg, &at("command"), Path::new(program))?;
                } else {
                    cfg.ensure(
                        temper_stage::kinds::find_on_path(program).is_some(),
                        &at("command"),
                        format!("program `{program}` is not on PATH"),
                    )?;
                }
                for path in read {
                    inputs.path(cfg, &at("inputs"), path)?;
                }
            }
        }
    }
    if let Some((i, why)) = repeated_name(rewards) {
        return Err(cfg.error(&format!("{key}.{i}"), why));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn score(r: &mut TextReward, reply: &str, fields: &BTreeMap<String, Value>) -> f64 {
        let tokens = reply.split_whitespace().count();
        r.score(&Scored {
            prompt: "",
            reply,
            reply_tokens: tokens,
            fields,
        })
        .unwrap()
    }

    #[test]
    fn exact_match_reads_the_last_number_numerically() {
        let spec: RewardSpec = serde_yaml::from_str("{kind: exact_match}").unwrap();
        let mut r = TextReward::new(&spec).unwrap().unwrap();
        let f: BTreeMap<String, Value> = [("answer".to_string(), json!(85))].into();
        assert_eq!(score(&mut r, "47 + 38 = 85", &f), 1.0);
        assert_eq!(score(&mut r, "The answer is 85.0", &f), 1.0);
        assert_eq!(
            score(&mut r, "85 or maybe 84", &f),
            0.0,
            "the last number counts"
        );
        assert_eq!(score(&mut r, "no idea", &f), 0.0);
        let text: BTreeMap<String, Value> = [("answer".to_string(), json!("-7"))].into();
        assert_eq!(score(&mut r, "It is -7", &text), 1.0);
        assert!(r
            .check_fields(&BTreeMap::new())
            .unwrap_err()
            .contains("reads `answer`"));
    }

    #[test]
    fn regex_and_length_by_hand() {
        let spec: RewardSpec =
            serde_yaml::from_str("{kind: regex, pattern: '^The answer is \\d+\\.$'}").unwrap();
        let mut r = TextReward::new(&spec).unwrap().unwrap();
        let none = BTreeMap::new();
        assert_eq!(score(&mut r, "The answer is 12.", &none), 1.0);
        assert_eq!(score(&mut r, "answer: 12", &none), 0.0);
        let spec: RewardSpec =
            serde_yaml::from_str("{kind: length, min: 2, max: 4, penalty: 0.5}").unwrap();
        let mut r = TextReward::new(&spec).unwrap().unwrap();
        assert_eq!(score(&mut r, "a b c", &none), 0.0);
        assert_eq!(score(&mut r, "a b c d e f", &none), -1.0, "two tokens over");
        assert_eq!(score(&mut r, "a", &none), -0.5);
        assert!(serde_yaml::from_str::<RewardSpec>("{kind: regex, patern: x}").is_err());
        assert_eq!(spec.name(), "length");
    }
}
