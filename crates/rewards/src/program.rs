//! The program rewards of a stage's `rewards:` list, scored together over a batch of decoded
//! replies: temper-ppo adds their weighted sum to its reward model's score (a `length` range
//! against replies too short to judge, a format check); temper-grpo scores the same kinds
//! beside its reward models.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{Result, RewardError};
use crate::functions::{RewardSpec, Scored, TextReward};

struct Entry {
    name: String,
    weight: f64,
    reward: TextReward,
}

/// Program rewards, ready to score.
#[derive(Default)]
pub struct ProgramRewards {
    entries: Vec<Entry>,
}

/// A batch's program rewards: the weighted total per reply and each reward's values.
pub struct ProgramScores {
    pub total: Vec<f64>,
    pub per_name: Vec<(String, Vec<f64>)>,
}

/// One reply as the rewards read it.
pub struct ReplyText<'a> {
    pub prompt: &'a str,
    pub reply: &'a str,
    pub reply_tokens: usize,
    pub fields: &'a BTreeMap<String, Value>,
}

impl ProgramRewards {
    /// Builds every entry; `model` entries are refused (the caller scores models). An error
    /// comes with the entry's index, so the stage can name `rewards.<i>`.
    pub fn new(specs: &[RewardSpec]) -> std::result::Result<Self, (usize, RewardError)> {
        if let Some((i, why)) = super::functions::repeated_name(specs) {
            return Err((i, RewardError::Invalid(why)));
        }
        let mut entries: Vec<Entry> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let reward = TextReward::new(spec).map_err(|e| (i, e))?.ok_or_else(|| {
                (
                    i,
                    RewardError::Invalid("a reward model is not a program reward".into()),
                )
            })?;
            entries.push(Entry {
                name: spec.name(),
                weight: spec.weight(),
                reward,
            });
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks that an example has what every reward reads; the error names the reward.
    pub fn check_fields(
        &self,
        fields: &BTreeMap<String, Value>,
    ) -> std::result::Result<(), String> {
        for e in &self.entries {
            e.reward
                .check_fields(fields)
                .map_err(|p| format!("reward `{}`: {p}", e.name))?;
        }
        Ok(())
    }

    pub fn score(&mut self, batch: &[ReplyText]) -> Result<ProgramScores> {
        let mut total = vec![0.0; batch.len()];
        let mut per_name = Vec::with_capacity(self.entries.len());
        for e in &mut self.entries {
            let values = score_replies(&mut e.reward, &e.name, batch)?;
            for (t, v) in total.iter_mut().zip(&values) {
                *t += e.weight * v;
            }
            per_name.push((e.name.clone(), values));
        }
        Ok(ProgramScores { total, per_name })
    }
}

/// One reward over a batch; a value that is not a finite number is an error naming the reward
/// and the reply.
pub fn score_replies(reward: &mut TextReward, name: &str, batch: &[ReplyText]) -> Result<Vec<f64>> {
    batch
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let v = reward.score(&Scored {
                prompt: x.prompt,
                reply: x.reply,
                reply_tokens: x.reply_tokens,
                fields: x.fields,
            })?;
            match v.is_finite() {
                true => Ok(v),
                false => Err(RewardError::Invalid(format!(
                    "reward `{name}` gave {v} for reply {i} ({:?}); a reward must be a finite number",
                    x.reply
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn specs(yaml: &str) -> Vec<RewardSpec> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn weighted_sum_by_hand() {
        let mut r = ProgramRewards::new(&specs(
            "[{kind: length, min: 3, max: 5, penalty: 0.5, weight: 2.0},
              {kind: regex, pattern: 'good', weight: -1.0}]",
        ))
        .unwrap();
        let fields = BTreeMap::new();
        let reply = |reply, reply_tokens| ReplyText {
            prompt: "p",
            reply,
            reply_tokens,
            fields: &fields,
        };
        let s = r
            .score(&[reply("good", 1), reply("fine", 4), reply("good", 7)])
            .unwrap();
        // length: 2 short → −1.0 (×2), inside → 0, 2 over → −1.0 (×2); regex −1 on "good".
        assert_eq!(s.total, vec![-3.0, 0.0, -3.0]);
        assert_eq!(s.per_name[0], ("length".to_string(), vec![-1.0, 0.0, -1.0]));
        assert_eq!(s.per_name[1], ("regex".to_string(), vec![1.0, 0.0, 1.0]));
    }

    #[test]
    fn refuses_models_duplicates_and_missing_fields() {
        let (i, e) = ProgramRewards::new(&specs(
            "[{kind: regex, pattern: a}, {kind: model, path: rm}]",
        ))
        .err()
        .unwrap();
        assert_eq!(i, 1);
        assert!(e.to_string().contains("not a program reward"), "{e}");
        let (i, e) = ProgramRewards::new(&specs(
            "[{kind: length, min: 1, max: 2}, {kind: length, min: 3, max: 4}]",
        ))
        .err()
        .unwrap();
        assert_eq!(i, 1);
        assert!(e.to_string().contains("give one a `name`"), "{e}");
        let r = ProgramRewards::new(&specs("[{kind: exact_match, name: answer}]")).unwrap();
        let problem = r.check_fields(&BTreeMap::new()).unwrap_err();
        assert!(
            problem.starts_with("reward `answer`: exact_match reads `answer`"),
            "{problem}"
        );
        let ok: BTreeMap<String, Value> = [("answer".to_string(), json!(3))].into();
        assert!(r.check_fields(&ok).is_ok());
        assert!(ProgramRewards::new(&[]).unwrap().is_empty());
    }
}
