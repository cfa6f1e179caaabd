//! A stage's list of rewards (GRPO's `rewards:`, the feedback stage's `labeller:`), loaded
//! once and applied to every batch of replies: program rewards read the decoded reply and the
//! prompt's fields, reward models read the tokens (with their own pooling and sign). The
//! reward of a reply is the weighted sum; each function's values come back by name.

use std::path::Path;

use tch::{Kind, Tensor};
use temper_data::{PromptRecord, TextTokenizer};
use temper_rewards::program::score_replies;
use temper_rewards::{ReplyText, RewardSpec, TextReward};
use temper_stage::{invalid, ConfigFile, StageError};

use crate::checkpoint::ScoreHead;
use crate::sample::Joined;
use crate::scoring::{decode_prompts, decode_replies, reward_scores};
use crate::{load_checkpoint, LoadSpec, Loaded, Transformer};

enum Scorer {
    /// In a cell: a `command` keeps its process and pipes between calls.
    Text(std::cell::RefCell<TextReward>),
    Model(Box<Transformer>),
}

struct Entry {
    name: String,
    weight: f64,
    scorer: Scorer,
}

pub struct RewardSet {
    entries: Vec<Entry>,
}

/// A batch of replies as the rewards read them: the left-padded prompts, the generated tokens,
/// and both joined (what a reward model reads).
pub struct ReplyBatch<'a> {
    pub joined: &'a Joined,
    /// (B, P) and its mask.
    pub prompt: &'a Tensor,
    pub prompt_mask: &'a Tensor,
    /// (B, N) and its mask (1 on real reply tokens, EOS included).
    pub tokens: &'a Tensor,
    pub mask: &'a Tensor,
}

/// One batch's rewards: the weighted total (B,), each function's values, the replies' text.
pub struct Scored {
    pub total: Tensor,
    /// The same totals in f64, as summed (the tensor holds them in f32).
    pub totals: Vec<f64>,
    pub per_name: Vec<(String, Vec<f64>)>,
    pub replies: Vec<String>,
}

impl Scored {
    pub fn mean(&self) -> f64 {
        self.total.mean(Kind::Float).double_value(&[])
    }
}

impl RewardSet {
    /// Loads `specs`, the config's list at `key`; errors name `<key>.<i>`. A reward model
    /// must share the policy's tokenizer.
    pub fn load<C>(
        cfg: &ConfigFile<C>,
        key: &str,
        specs: &[RewardSpec],
        policy: &Loaded,
        device: tch::Device,
    ) -> Result<Self, StageError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let field = format!("{key}.{i}");
            let scorer = match TextReward::new(spec)
                .map_err(|e| cfg.error(&field, e.to_string()))?
            {
                Some(t) => Scorer::Text(std::cell::RefCell::new(t)),
                None => {
                    let RewardSpec::Model { path, .. } = spec else {
                        unreachable!("only model rewards have no text scorer")
                    };
                    let same = std::fs::read(&policy.tokenizer_path).ok()
                        == std::fs::read(path.join("tokenizer.json")).ok();
                    cfg.ensure(
                        same,
                        &format!("{field}.path"),
                        "uses a different tokenizer from the policy; they must agree token for token",
                    )?;
                    let spec = LoadSpec {
                        lm_head: false,
                        score: ScoreHead::Load,
                    };
                    let (mut vs, model) = load_checkpoint(path, spec, device).map_err(invalid)?;
                    vs.freeze();
                    Scorer::Model(Box::new(model))
                }
            };
            entries.push(Entry {
                name: spec.name(),
                weight: spec.weight(),
                scorer,
            });
        }
        Ok(Self { entries })
    }

    /// Every prompt of `file` has what every reward reads (an `answer` field, a sentiment
    /// label); the error names the row and the reward.
    pub fn check_prompts<C>(
        &self,
        cfg: &ConfigFile<C>,
        file: &Path,
        prompts: &[(Vec<u32>, PromptRecord)],
    ) -> Result<(), StageError> {
        for (row, (_, record)) in prompts.iter().enumerate() {
            for e in &self.entries {
                let problem = match &e.scorer {
                    Scorer::Text(t) => t.borrow().check_fields(&record.meta).err(),
                    Scorer::Model(m) => m
                        .config
                        .score_sign
                        .as_ref()
                        .and_then(|s| s.sign(&record.meta).err().map(|e| e.to_string())),
                };
                if let Some(p) = problem {
                    return Err(cfg.error(
                        "prompts",
                        format!(
                            "{} row {}: reward `{}`: {p}",
                            file.display(),
                            row + 1,
                            e.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The rewards of `ro`'s replies; `records[i]` is the prompt of reply `i`.
    pub fn score(
        &self,
        records: &[&PromptRecord],
        ro: &ReplyBatch,
        tok: &TextTokenizer,
        stops: &[u32],
    ) -> anyhow::Result<Scored> {
        let replies = decode_replies(tok, ro.tokens, ro.mask, stops)?;
        let prompts = decode_prompts(tok, ro.prompt, ro.prompt_mask)?;
        let lengths = Vec::<f64>::try_from(
            ro.mask
                .sum_dim_intlist(1, false, Kind::Float)
                .to_kind(Kind::Double),
        )?;
        let b = replies.len();
        let texts: Vec<ReplyText> = (0..b)
            .map(|i| ReplyText {
                prompt: &prompts[i],
                reply: &replies[i].text,
                reply_tokens: lengths[i] as usize,
                fields: &records[i].meta,
            })
            .collect();
        let mut total = vec![0.0; b];
        let mut per_name = Vec::new();
        for e in &self.entries {
            let values: Vec<f64> = match &e.scorer {
                Scorer::Text(t) => score_replies(&mut t.borrow_mut(), &e.name, &texts)?,
                Scorer::Model(m) => {
                    let scores = tch::no_grad(|| reward_scores(m, ro.joined))?;
                    let mut v = Vec::<f64>::try_from(scores.to_kind(Kind::Double))?;
                    if let Some(sign) = &m.config.score_sign {
                        for (x, r) in v.iter_mut().zip(records) {
                            *x *= sign.sign(&r.meta)?;
                        }
                    }
                    // Program rewards are checked by `score_replies`; a model's here.
                    if let Some(i) = v.iter().position(|v| !v.is_finite()) {
                        anyhow::bail!(
                            "reward `{}` gave {} for reply {i} ({:?}); a reward must be a finite number",
                            e.name,
                            v[i],
                            replies[i].text
                        );
                    }
                    v
                }
            };
            for (t, v) in total.iter_mut().zip(&values) {
                *t += e.weight * v;
            }
            per_name.push((e.name.clone(), values));
        }
        Ok(Scored {
            total: Tensor::from_slice(&total)
                .to_kind(Kind::Float)
                .to_device(ro.mask.device()),
            totals: total,
            per_name,
            replies: replies.into_iter().map(|r| r.text).collect(),
        })
    }
}
