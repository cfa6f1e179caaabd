//! Exact-match evaluation for verifiable tasks (arithmetic, say): the answer is the last
//! match of `pattern` in the reply (default: the last number), compared with a prompt field
//! numerically when both are numbers. Per policy: `exact_match` of the greedy reply,
//! `pass@k` (some of k sampled replies is right) and `sample_accuracy` (the mean over those k).

use serde::{Deserialize, Serialize};
use temper_core::sample::{generate, SamplingConfig};
use temper_core::scoring::decode_replies;
use temper_core::{with_autocast, Transformer};
use temper_data::{seeds_for, PromptRecord};
use temper_rewards::{RewardSpec, Scored, TextReward};

use crate::config::Config;
use crate::setup::Setup;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactMatchEval {
    /// The prompt field holding the expected answer.
    #[serde(default = "default_field")]
    pub field: String,
    /// A regular expression for the answer in a reply; its last match counts.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Sampled replies per prompt for pass@k.
    #[serde(default = "default_k")]
    pub k: usize,
}

fn default_field() -> String {
    "answer".into()
}
fn default_k() -> usize {
    8
}

pub struct ExactScorer {
    reward: std::cell::RefCell<TextReward>,
    pub k: usize,
}

impl ExactScorer {
    /// Checks every prompt has the answer field.
    pub fn new(e: &ExactMatchEval, prompts: &[(Vec<u32>, PromptRecord)]) -> Result<Self, String> {
        let spec = RewardSpec::ExactMatch {
            field: e.field.clone(),
            pattern: e.pattern.clone(),
            weight: 1.0,
            name: None,
        };
        let reward = TextReward::new(&spec)
            .map_err(|e| e.to_string())?
            .expect("exact_match is a text reward");
        for (row, (_, r)) in prompts.iter().enumerate() {
            reward
                .check_fields(&r.meta)
                .map_err(|m| format!("prompt {}: {m}", row + 1))?;
        }
        Ok(Self {
            reward: std::cell::RefCell::new(reward),
            k: e.k,
        })
    }

    /// 1.0 / 0.0 per prompt for one set of replies.
    fn correct(
        &self,
        s: &Setup,
        model: &Transformer,
        c: &Config,
        temperature: f64,
        seeds: &[u64],
    ) -> anyhow::Result<Vec<f64>> {
        let sampling = SamplingConfig {
            top_p: if temperature > 0.0 { c.top_p } else { None },
            ..SamplingConfig::chat(&s.template, c.max_new_tokens, temperature)
        };
        let ids: Vec<Vec<i64>> = s
            .prompts
            .iter()
            .map(|(p, _)| p.iter().map(|&t| t as i64).collect())
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        let mut reward = self.reward.borrow_mut();
        for (start, (chunk, chunk_seeds)) in ids
            .chunks(c.batch_size)
            .zip(seeds.chunks(c.batch_size))
            .enumerate()
        {
            let g = with_autocast(model.device(), c.precision, || {
                generate(model, chunk, &sampling, chunk_seeds)
            })??;
            let replies = decode_replies(&s.tok, &g.tokens, &g.mask, &s.template.stop_ids())?;
            for (j, r) in replies.iter().enumerate() {
                let i = start * c.batch_size + j;
                out.push(reward.score(&Scored {
                    prompt: "",
                    reply: &r.text,
                    reply_tokens: r.ids.len(),
                    fields: &s.prompts[i].1.meta,
                })?);
            }
        }
        Ok(out)
    }

    pub fn measure(
        &self,
        s: &Setup,
        model: &Transformer,
        c: &Config,
    ) -> anyhow::Result<Vec<(String, f64)>> {
        let n = s.prompts.len();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let greedy = self.correct(s, model, c, 0.0, &vec![0; n])?;
        let mut any = vec![0.0f64; n];
        let mut total = 0.0;
        for round in 0..self.k {
            let seeds = seeds_for(c.seed, "pass-at-k", round as u64, n);
            let hits = self.correct(s, model, c, c.temperature, &seeds)?;
            for (a, h) in any.iter_mut().zip(&hits) {
                *a = a.max(*h);
            }
            total += mean(&hits);
        }
        Ok(vec![
            ("exact_match".into(), mean(&greedy)),
            (format!("pass@{}", self.k), mean(&any)),
            ("sample_accuracy".into(), total / self.k as f64),
        ])
    }
}
