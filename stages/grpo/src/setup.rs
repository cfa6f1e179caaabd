//! What GRPO trains with, loaded and checked before anything is written: the policy, its
//! reference when `beta` > 0 (the LoRA policy with its adapters bypassed, else a frozen copy),
//! the rewards, and the prompts rendered in the policy's chat template.

use tch::Device;
use temper_core::chat_model::{load_prompts, PromptSettings};
use temper_core::peft::Reference;
use temper_core::reward_set::RewardSet;
use temper_core::{
    load_checkpoint, load_with_tokenizer, LoadSpec, Loaded, SamplingConfig, Transformer,
};
use temper_data::{ChatTemplate, PromptRecord};
use temper_stage::{invalid, ConfigFile, StageError};

use crate::config::Config;

/// The policy, the reference when one is needed, the rewards and the rendered prompts.
pub struct Setup {
    pub policy: Loaded,
    /// Held when `beta` > 0 and the policy is not LoRA (then: the policy, adapters bypassed).
    pub reference: Option<Transformer>,
    pub rewards: RewardSet,
    pub template: ChatTemplate,
    pub prompts: Vec<(Vec<u32>, PromptRecord)>,
}

impl Setup {
    pub fn reference(&self, c: &Config) -> Option<Reference<'_>> {
        if !c.needs_reference() {
            return None;
        }
        Some(match &self.reference {
            Some(r) => Reference::Model(r),
            None => Reference::Bypassed(&self.policy.model, &self.policy.tuning),
        })
    }
}

pub fn prepare(cfg: &ConfigFile<Config>, device: Device) -> Result<Setup, StageError> {
    let c = &cfg.value;
    tch::manual_seed(c.seed as i64);
    let mut policy =
        load_with_tokenizer(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    policy
        // With dynamic sampling fewer may happen: AdaLoRA's schedule then ends early.
        .tune(c.peft.as_ref(), c.planned_updates())
        .map_err(|e| cfg.error(&e.field, e.message))?;
    let template = ChatTemplate::new(&policy.tokenizer).map_err(invalid)?;
    let reference = match c.needs_reference() && !policy.tuning.is_lora() {
        true => {
            let dir = c.reference.as_ref().unwrap_or(&c.policy);
            let (mut vs, model) =
                load_checkpoint(dir, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
            vs.freeze();
            Some(model)
        }
        false => None,
    };
    let prompt_settings = PromptSettings {
        file: &c.prompts,
        fields: &c.fields,
        max_new_tokens: c.max_new_tokens,
        max_prompt_len: c.max_prompt_len,
    };
    let room = policy.model.token_room();
    let (prompts, _) = load_prompts(cfg, &policy.tokenizer, &template, room, prompt_settings)?;
    let rewards = RewardSet::load(cfg, "rewards", &c.rewards, &policy, device)?;
    rewards.check_prompts(cfg, &c.prompts, &prompts)?;
    tracing::info!(
        "{} × {} replies per iteration",
        c.prompts_per_iteration,
        c.num_generations
    );
    Ok(Setup {
        policy,
        reference,
        rewards,
        template,
        prompts,
    })
}

/// Sampling as configured, stopping at the template's EOS.
pub fn sampling(c: &Config, template: &ChatTemplate) -> SamplingConfig {
    SamplingConfig {
        top_k: c.top_k,
        top_p: c.top_p,
        ..SamplingConfig::chat(template, c.max_new_tokens, c.temperature)
    }
}
