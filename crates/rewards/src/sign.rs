//! A reward model's sign by prompt: what makes one model that scores a property reward the
//! property each prompt asks for (positive for one prompt, negative for another).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, RewardError};

/// A reward that depends on what the prompt asked for through a sign, not through what the
/// model learned: score × map[prompt's `field`]. E.g. `{field: sentiment, map: {positive: 1,
/// negative: -1}}` turns a model that scores sentiment into a reward for the sentiment each
/// prompt wants. Saved in `config.json` as `temper_score_sign`, so PPO and evaluation apply it
/// as the reward stage did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSign {
    pub field: String,
    pub map: std::collections::BTreeMap<String, f64>,
}

impl ScoreSign {
    /// The multiplier for a record's fields; an error names the value it cannot map.
    pub fn sign(&self, meta: &std::collections::BTreeMap<String, Value>) -> Result<f64> {
        let value = meta
            .get(&self.field)
            .and_then(Value::as_str)
            .ok_or_else(|| {
                RewardError::Invalid(format!(
                    "the reward's sign needs a `{}` field on every prompt",
                    self.field
                ))
            })?;
        self.map.get(value).copied().ok_or_else(|| {
            RewardError::Invalid(format!(
                "the reward's sign maps {} but a prompt has {} `{value}`",
                self.map.keys().cloned().collect::<Vec<_>>().join(", "),
                self.field
            ))
        })
    }
}
