//! What PPO trains with, loaded and checked before anything is written: the actor and its
//! frozen reference (the actor itself with its adapters bypassed when it is LoRA), the reward
//! model when there is one, the critic, and the prompts with each one's reward sign and the
//! fields program rewards read.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tch::nn::VarStore;
use tch::Device;
use temper_core::chat_model::{load_prompts, prompt_signs, same_tokenizer, PromptSettings};
use temper_core::checkpoint::{SaveDtype, ScoreHead};
use temper_core::dist::{GradSync, World};
use temper_core::peft::{Reference, Tuning};
use temper_core::{
    load_checkpoint, load_with_tokenizer, AdamW, LoadSpec, Loaded, Precision, SamplingConfig,
    Transformer,
};
use temper_data::ChatTemplate;
use temper_rewards::ProgramRewards;
use temper_stage::{invalid, ConfigFile, StageError};

use crate::config::{Config, CriticInit, OptimizerMode};
use crate::rollout::Models;

/// The four models and the rendered prompts. Frozen models are loaded with gradients off and
/// only run under no_grad.
pub struct Setup {
    pub actor: Loaded,
    /// The frozen reference, unless the actor is LoRA (then: the actor, adapters bypassed).
    pub reference: Option<Transformer>,
    /// The reward model, unless only program rewards score.
    pub reward: Option<Transformer>,
    pub critic: Critic,
    pub template: ChatTemplate,
    pub prompts: Vec<Vec<u32>>,
    /// Each prompt's reward sign (the reward model's `temper_score_sign`; 1 without one).
    pub signs: Vec<f64>,
    /// Each prompt's other fields, which program rewards read (an answer, a label).
    pub fields: Vec<BTreeMap<String, Value>>,
}

impl Setup {
    /// What the state saves: the actor's trained variables, then the critic's.
    pub fn stores(&self) -> Vec<&VarStore> {
        let critic = self.critic.tuning.stores(&self.critic.vs);
        self.actor.stores().into_iter().chain(critic).collect()
    }

    /// Writes the actor's checkpoint, and the critic's beside it in `critic/` (a LoRA
    /// critic's base is the folder it was loaded from).
    pub fn save_final(&self, c: &Config, out: &Path) -> anyhow::Result<()> {
        self.actor.save_final(out, &c.save)?;
        let from = critic_base(c);
        let base = (!temper_core::peft::is_adapter(from)).then_some(from);
        let write = c.save.resolve(SaveDtype::of_checkpoint(from));
        let (critic, tokenizer) = (&self.critic, &self.actor.tokenizer_path);
        let dir = out.join("critic");
        critic
            .tuning
            .save_into(&dir, &critic.model, &critic.vs, tokenizer, base, write)?;
        Ok(())
    }

    pub fn models(&self, precision: Precision) -> Models<'_> {
        Models {
            actor: &self.actor.model,
            actor_tuning: &self.actor.tuning,
            reference: match &self.reference {
                Some(r) => Reference::Model(r),
                None => Reference::Bypassed(&self.actor.model, &self.actor.tuning),
            },
            reward: self.reward.as_ref(),
            critic: &self.critic.model,
            template: self.template.clone(),
            precision,
        }
    }
}

/// The value model and what of it trains.
pub struct Critic {
    pub vs: VarStore,
    pub model: Transformer,
    pub tuning: Tuning,
}

/// The actor's optimizer and, unless they share one, the critic's.
pub struct Optimizers {
    pub actor: AdamW,
    pub critic: Option<AdamW>,
}

impl Optimizers {
    pub fn new(c: &Config, actor: &Loaded, critic: &Critic) -> Self {
        match c.optimizer {
            OptimizerMode::Separate => Self {
                actor: actor.optimizer(c.optim.adamw()),
                critic: Some(critic.tuning.optimizer(&critic.vs, c.critic_optim.adamw())),
            },
            OptimizerMode::Shared => {
                fn named<'a>(
                    prefix: &str,
                    stores: Vec<&'a VarStore>,
                ) -> Vec<(String, &'a VarStore)> {
                    let names = ["", "adapter."].map(|a| format!("{prefix}{a}"));
                    stores.into_iter().zip(names).map(|(v, n)| (n, v)).collect()
                }
                let mut all = named("actor.", actor.stores());
                all.extend(named("critic.", critic.tuning.stores(&critic.vs)));
                let refs: Vec<(&str, &VarStore)> =
                    all.iter().map(|(n, v)| (n.as_str(), *v)).collect();
                Self {
                    actor: AdamW::over(&refs, c.optim.adamw()),
                    critic: None,
                }
            }
        }
    }

    pub fn all(&self) -> Vec<&AdamW> {
        std::iter::once(&self.actor).chain(&self.critic).collect()
    }

    pub fn all_mut(&mut self) -> Vec<&mut AdamW> {
        std::iter::once(&mut self.actor)
            .chain(self.critic.as_mut())
            .collect()
    }

    /// Each optimizer's gradients averaged over the ranks in buckets, reduced while its
    /// backward runs.
    pub fn grad_syncs(&self, world: &World) -> anyhow::Result<(GradSync, Option<GradSync>)> {
        let actor = world.grad_sync(&self.actor.parameters())?;
        let critic = match &self.critic {
            Some(o) => Some(world.grad_sync(&o.parameters())?),
            None => None,
        };
        Ok((actor, critic))
    }
}

/// The models, the prompts and their signs and fields, checked before anything is written;
/// with the program rewards, which the loop scores (they keep their processes, so they are
/// the loop's to hold mutably).
pub fn prepare(
    cfg: &ConfigFile<Config>,
    device: Device,
) -> Result<(Setup, ProgramRewards), StageError> {
    let c = &cfg.value;
    let program = ProgramRewards::new(&c.rewards)
        .map_err(|(i, e)| cfg.error(&format!("rewards.{i}"), e.to_string()))?;
    tch::manual_seed(c.seed as i64);
    let mut actor = load_with_tokenizer(&c.policy, LoadSpec::CAUSAL_LM, device).map_err(invalid)?;
    let updates =
        c.iterations as usize * c.ppo_epochs * c.batch_size.div_ceil(c.minibatch_size.max(1));
    actor
        .tune(c.peft.as_ref(), updates)
        .map_err(|e| cfg.error(&e.field, e.message))?;
    if let Some(rm) = &c.reward_model {
        cfg.ensure(
            same_tokenizer(&c.policy, rm),
            "reward_model",
            "uses a different tokenizer from the policy; PPO needs them to agree token for token",
        )?;
    }
    let template = ChatTemplate::new(&actor.tokenizer).map_err(invalid)?;
    let reference = match actor.tuning.is_lora() {
        true => {
            tracing::info!("reference: the actor with its adapters bypassed (no second copy)");
            None
        }
        false => Some(frozen(&c.policy, LoadSpec::CAUSAL_LM, device)?),
    };
    let reward = c
        .reward_model
        .as_ref()
        .map(|rm| frozen(rm, REWARD_MODEL, device))
        .transpose()?;
    let critic = load_critic(cfg, device)?;
    let prompt_settings = PromptSettings {
        file: &c.prompts,
        fields: &c.fields,
        max_new_tokens: c.max_new_tokens,
        max_prompt_len: c.max_prompt_len,
    };
    let room = actor.model.token_room();
    let (prompts, _) = load_prompts(cfg, &actor.tokenizer, &template, room, prompt_settings)?;
    let signs = prompt_signs(reward.as_ref(), &prompts).map_err(|e| cfg.error("prompts", e))?;
    for (row, (_, record)) in prompts.iter().enumerate() {
        if let Err(problem) = program.check_fields(&record.meta) {
            let at = format!("{} row {}: {problem}", c.prompts.display(), row + 1);
            return Err(cfg.error("prompts", at));
        }
    }
    let (prompts, fields) = prompts.into_iter().map(|(ids, r)| (ids, r.meta)).unzip();
    let setup = Setup {
        actor,
        reference,
        reward,
        critic,
        template,
        signs,
        prompts,
        fields,
    };
    Ok((setup, program))
}

/// How a reward model (and a critic started from one) is loaded: no LM head, its score head.
const REWARD_MODEL: LoadSpec = LoadSpec {
    lm_head: false,
    score: ScoreHead::Load,
};

/// A model that does not train: loaded with its gradients off.
fn frozen(dir: &Path, spec: LoadSpec, device: Device) -> Result<Transformer, StageError> {
    let (mut vs, model) = load_checkpoint(dir, spec, device).map_err(invalid)?;
    vs.freeze();
    Ok(model)
}

/// The value model, from the reward model or from the policy with a fresh scalar head, with
/// `critic_peft` attached.
fn load_critic(cfg: &ConfigFile<Config>, device: Device) -> Result<Critic, StageError> {
    let c = &cfg.value;
    let critic_from = critic_base(c);
    cfg.ensure(
        !(c.critic_init == CriticInit::Reward
            && temper_core::peft::is_unmergeable_adapter(critic_from)),
        "critic_init",
        "the reward model is a bottleneck-adapter checkpoint, whose adapters cannot be folded into a critic to train; set `critic_init: policy`",
    )?;
    let (mut vs, mut model) = match c.critic_init {
        CriticInit::Reward => load_checkpoint(critic_from, REWARD_MODEL, device),
        CriticInit::Policy => {
            let spec = LoadSpec {
                lm_head: false,
                score: ScoreHead::Fresh,
            };
            load_checkpoint(&c.policy, spec, device)
        }
    }
    .map_err(invalid)?;
    let tuning = temper_core::peft::apply(&mut model, &mut vs, c.critic_peft.as_ref())
        .map_err(|e| cfg.error(&e.field.replacen("peft", "critic_peft", 1), e.message))?;
    Ok(Critic { vs, model, tuning })
}

/// The checkpoint the critic starts from (`check` made sure a reward-model start has one).
pub fn critic_base(c: &Config) -> &std::path::Path {
    match (c.critic_init, &c.reward_model) {
        (CriticInit::Reward, Some(rm)) => rm,
        _ => &c.policy,
    }
}

/// Sampling as configured, stopping at the template's EOS.
pub fn sampling(c: &Config, template: &ChatTemplate) -> SamplingConfig {
    SamplingConfig {
        top_k: c.top_k,
        top_p: c.top_p,
        ..SamplingConfig::chat(template, c.max_new_tokens, c.temperature)
    }
}
