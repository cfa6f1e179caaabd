//! What an evaluation compares policies with, loaded and checked before anything is
//! written: the shared tokenizer and template, the reference, the reward model and the
//! judges, and the held-out prompts. Policies themselves are loaded one at a time.

use std::path::Path;

use temper_core::chat_model::{load_prompts, prompt_signs, same_tokenizer, PromptSettings};
use temper_core::checkpoint::{check_vocab, ScoreHead};
use temper_core::reward_set::RewardSet;
use temper_core::{load_checkpoint, load_with_tokenizer, resolve_device, LoadSpec, Transformer};
use temper_data::{ChatTemplate, PromptRecord, TextTokenizer};
use temper_stage::{invalid, ConfigFile, StageError};

use crate::config::Config;
use crate::judges::Judge;
use crate::{best_of, exact};

/// The shared pieces: tokenizer, reference, reward model, judges, the best-of labeller and
/// prompts. Policies are
/// loaded one at a time, so memory holds one policy besides these.
pub struct Setup {
    pub tok: TextTokenizer,
    pub template: ChatTemplate,
    pub reference: Transformer,
    pub reward: Option<Transformer>,
    pub exact: Option<exact::ExactScorer>,
    pub judges: Vec<Judge>,
    /// What picks the best-of row's replies, when there is one.
    pub labeller: Option<RewardSet>,
    pub prompts: Vec<(Vec<u32>, PromptRecord)>,
    pub labels: Vec<Option<String>>,
    /// Each prompt's reward sign (the reward model's `temper_score_sign`; 1 without one).
    pub signs: Vec<f64>,
}

pub fn prepare(cfg: &ConfigFile<Config>) -> Result<Setup, StageError> {
    let c = &cfg.value;
    let device = resolve_device(c.device).map_err(invalid)?;
    let base_dir = &c.policies[&c.baseline];
    let tok = TextTokenizer::load(&base_dir.join("tokenizer.json")).map_err(invalid)?;
    for (name, dir) in &c.policies {
        cfg.ensure(
            same_tokenizer(dir, base_dir),
            &format!("policies.{name}"),
            "uses a different tokenizer from the baseline; the policies must agree token for token",
        )?;
    }
    let room = policy_room(cfg, tok.vocab_size())?;
    let template = ChatTemplate::new(&tok).map_err(invalid)?;
    let load = |dir: &Path, spec| -> Result<Transformer, StageError> {
        let (_, model) = load_checkpoint(dir, spec, device).map_err(invalid)?;
        check_vocab(tok.vocab_size(), &model.config, dir).map_err(invalid)?;
        Ok(model)
    };
    let ref_dir = c.reference.as_deref().unwrap_or(base_dir);
    // The best-of row samples the reference; its labeller (a model one must share the
    // tokenizer) is loaded beside it.
    let (reference, labeller) = if c.best_of.is_some() {
        let loaded = load_with_tokenizer(ref_dir, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
        let labeller = best_of::load_labeller(cfg, &loaded)?;
        (loaded.model, labeller)
    } else {
        (load(ref_dir, LoadSpec::CAUSAL_LM)?, None)
    };
    let rm_spec = LoadSpec {
        lm_head: false,
        score: ScoreHead::Load,
    };
    let reward = c
        .reward_model
        .as_deref()
        .map(|r| load(r, rm_spec))
        .transpose()?;
    let judges = Judge::load_all(cfg)?;
    let room = reference.config.max_position.min(room);
    let settings = PromptSettings {
        file: &c.prompts,
        fields: &c.fields,
        max_new_tokens: c.max_new_tokens,
        max_prompt_len: None,
    };
    let (mut prompts, _) = load_prompts(cfg, &tok, &template, room, settings)?;
    prompts.truncate(c.max_prompts);
    if let Some(l) = &labeller {
        l.check_prompts(cfg, &c.prompts, &prompts)?;
    }
    let exact = c
        .exact_match
        .as_ref()
        .map(|e| exact::ExactScorer::new(e, &prompts))
        .transpose()
        .map_err(|e| cfg.error("exact_match", e))?;
    let signs = prompt_signs(reward.as_ref(), &prompts).map_err(|e| cfg.error("prompts", e))?;
    let labels = prompts
        .iter()
        .map(|(_, r)| {
            r.meta
                .get(&c.label_field)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    Ok(Setup {
        tok,
        template,
        reference,
        reward,
        exact,
        judges,
        labeller,
        prompts,
        labels,
        signs,
    })
}

/// The positions every policy has for prompt and reply (prompt tuning's virtual tokens take
/// some), each checked to leave room for a prompt; from configs and vocabularies only, the
/// weights are read when a policy's turn comes.
fn policy_room(cfg: &ConfigFile<Config>, vocab: usize) -> Result<i64, StageError> {
    let c = &cfg.value;
    let mut room = i64::MAX;
    for dir in c.policies.values() {
        let config = temper_core::checkpoint::model_config(dir).map_err(invalid)?;
        check_vocab(vocab, &config, dir).map_err(invalid)?;
        let positions = config.max_position - temper_core::peft::virtual_tokens_of(dir);
        cfg.ensure(
            c.max_new_tokens < positions,
            "max_new_tokens",
            format!(
                "must leave room for a prompt in {}'s {positions} positions",
                dir.display(),
            ),
        )?;
        room = room.min(positions);
    }
    Ok(room)
}
