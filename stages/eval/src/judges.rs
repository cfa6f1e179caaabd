//! The evaluation's judges: programs that say which sentiment a reply has, trained by no
//! stage — VADER (`lexicon`), AFINN-165 (`afinn`), or a user's `command` (a local LLM judge,
//! say) — each read by its sign against the sentiment the prompt wants. A judge that labelled
//! a policy's training data is no longer independent of it: `trained_on` says so, and the
//! report marks it.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde_json::Value;
use temper_rewards::{RewardSpec, Scored, TextReward};
use temper_stage::{invalid, ConfigFile, StageError};

use crate::config::Config;

/// The name of the judge `lexicon:` configures (its metrics: `<policy>/judge_agreement`).
pub const LEXICON_JUDGE: &str = "judge";

pub struct Judge {
    pub name: String,
    /// The dead band around 0 inside which a value is neutral: VADER's convention is ±0.05;
    /// AFINN and commands are read by their sign.
    pub band: f64,
    scorer: RefCell<TextReward>,
}

impl Judge {
    /// Every configured judge: `lexicon:` first (as `judge`), then `judges:` in order.
    pub fn load_all(cfg: &ConfigFile<Config>) -> Result<Vec<Judge>, StageError> {
        let c = &cfg.value;
        let legacy = c.lexicon.as_ref().map(|path| RewardSpec::Lexicon {
            path: path.clone(),
            sign_by: None,
            weight: 1.0,
            name: Some(LEXICON_JUDGE.into()),
        });
        let specs = legacy.iter().chain(&c.judges);
        let mut out = Vec::new();
        for (i, spec) in specs.enumerate() {
            let scorer = TextReward::new(spec)
                .map_err(|e| cfg.error(&format!("judges.{i}"), e))?
                .ok_or_else(|| invalid(anyhow::anyhow!("a judge is a program")))?;
            out.push(Judge {
                name: spec.name(),
                band: match spec {
                    RewardSpec::Lexicon { .. } => 0.05,
                    _ => 0.0,
                },
                scorer: RefCell::new(scorer),
            });
        }
        Ok(out)
    }

    /// The judge's value of one reply.
    pub fn score(
        &self,
        prompt: &str,
        reply: &str,
        reply_tokens: usize,
        fields: &BTreeMap<String, Value>,
    ) -> anyhow::Result<f64> {
        let v = self.scorer.borrow_mut().score(&Scored {
            prompt,
            reply,
            reply_tokens,
            fields,
        })?;
        anyhow::ensure!(
            v.is_finite(),
            "judge `{}` gave {v} for {reply:?}; a judge must answer a finite number",
            self.name
        );
        Ok(v)
    }
}

/// What `judges:` may hold, checked before anything loads: sentiment judges only (a lexicon,
/// AFINN, a command), unsigned (the prompt's wanted sentiment is compared, not multiplied),
/// with names unique among themselves and `lexicon:`'s `judge`.
pub fn check(cfg: &ConfigFile<Config>) -> Result<(), StageError> {
    let c = &cfg.value;
    let mut names: Vec<String> = c.lexicon.iter().map(|_| LEXICON_JUDGE.into()).collect();
    for (i, spec) in c.judges.iter().enumerate() {
        let at = |k: &str| format!("judges.{i}.{k}");
        match spec {
            RewardSpec::Lexicon { sign_by, .. } | RewardSpec::Afinn { sign_by, .. } => {
                cfg.ensure(
                    sign_by.is_none(),
                    &at("sign_by"),
                    "a judge is unsigned: its verdict is compared with the prompt's wanted sentiment",
                )?;
            }
            RewardSpec::Command { .. } => {}
            _ => {
                return Err(cfg.error(
                    &at("kind"),
                    "a judge says a reply's sentiment: lexicon, afinn or command",
                ))
            }
        }
        let name = spec.name();
        cfg.ensure(
            !names.contains(&name),
            &format!("judges.{i}"),
            format!("a second judge named `{name}`: give one a `name`"),
        )?;
        names.push(name);
    }
    for (policy, seen) in &c.trained_on {
        let best_of = c.best_of.as_ref().map(|b| b.row_name());
        cfg.ensure(
            c.policies.contains_key(policy) || best_of.as_ref() == Some(policy),
            &format!("trained_on.{policy}"),
            "is neither one of the policies nor the best-of row",
        )?;
        for s in seen {
            cfg.ensure(
                names.contains(s) || s == "reward_model",
                &format!("trained_on.{policy}"),
                format!(
                    "`{s}` is neither a judge ({}) nor `reward_model`",
                    names.join(", ")
                ),
            )?;
        }
    }
    Ok(())
}
