//! A chat model ready to fine-tune on rendered conversations — what SFT, the reward model and
//! DPO start from: the checkpoint with its tokenizer, its PEFT method attached, its chat
//! template, and the longest example it takes, checked against the model's positions and,
//! for a batch of that length, against memory, before anything is written. And the prompts a
//! policy answers (RL, evaluation), rendered in its template with room left for the reply.

use std::path::Path;

use tch::Device;
use temper_data::{
    ChatTemplate, Fields, LoadOptions, LoadReport, Overlong, PromptRecord, TextTokenizer,
};
use temper_stage::{invalid, ConfigFile, StageError};

use crate::checkpoint::{load_with_tokenizer, LoadSpec, Loaded};
use crate::peft::PeftConfig;

/// What [`ChatModel::load`] reads from a stage's config.
pub struct ChatSettings<'a> {
    /// The checkpoint folder (with its tokenizer.json).
    pub init: &'a Path,
    pub spec: LoadSpec,
    pub peft: Option<&'a PeftConfig>,
    /// Optimizer updates the run will make (AdaLoRA's rank schedule needs them).
    pub steps: u64,
    /// `max_len` as configured; None means every position the model has for tokens.
    pub max_len: Option<usize>,
    /// Sequences one forward pass holds (a batch of pairs is two sequences a pair).
    pub rows_per_batch: usize,
}

pub struct ChatModel {
    pub m: Loaded,
    pub template: ChatTemplate,
    /// The longest example in tokens.
    pub max_len: usize,
}

impl ChatModel {
    /// Loads and checks the model as `s` says; errors name the config key to change.
    pub fn load<C>(
        cfg: &ConfigFile<C>,
        s: ChatSettings,
        device: Device,
    ) -> Result<Self, StageError> {
        let mut m = load_with_tokenizer(s.init, s.spec, device).map_err(invalid)?;
        m.tune(s.peft, s.steps as usize)
            .map_err(|e| cfg.error(&e.field, e.message))?;
        let template = ChatTemplate::new(&m.tokenizer).map_err(invalid)?;
        let room = m.model.token_room();
        let max_len = s.max_len.unwrap_or(room as usize);
        cfg.ensure(
            max_len as i64 <= room,
            "max_len",
            format!("exceeds the {room} positions the model has for tokens"),
        )?;
        let estimate = m
            .model
            .config
            .training_bytes(s.rows_per_batch as i64, max_len as i64);
        crate::device::check_memory(device, estimate, "training at this batch_size and max_len")
            .map_err(|msg| cfg.error("batch_size", msg))?;
        Ok(Self {
            m,
            template,
            max_len,
        })
    }

    /// How the stage's data files are rendered and fitted for this model.
    pub fn load_options<'a>(
        &'a self,
        fields: &'a Fields,
        overlong: Overlong,
        train_on_prompt: bool,
    ) -> LoadOptions<'a> {
        LoadOptions {
            tokenizer: &self.m.tokenizer,
            template: self.template.clone(),
            fields,
            max_len: self.max_len,
            overlong,
            train_on_prompt,
        }
    }
}

/// Where a stage's prompts come from and how long they may be.
pub struct PromptSettings<'a> {
    pub file: &'a Path,
    pub fields: &'a Fields,
    /// The reply's length: every prompt leaves this many positions.
    pub max_new_tokens: i64,
    /// A tighter cap on a prompt's tokens, if set.
    pub max_prompt_len: Option<usize>,
}

/// Prompts with their records (the fields rewards and judges read).
pub type Prompts = Vec<(Vec<u32>, PromptRecord)>;

/// The prompts of `s.file` rendered in `template`, for a model with `room` positions: the
/// reply's `max_new_tokens` must fit (refused at that key otherwise), and prompts longer than
/// the rest (or `max_prompt_len`) are skipped and counted in the report.
pub fn load_prompts<C>(
    cfg: &ConfigFile<C>,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    room: i64,
    s: PromptSettings,
) -> Result<(Prompts, LoadReport), StageError> {
    cfg.ensure(
        s.max_new_tokens < room,
        "max_new_tokens",
        format!("must leave room for a prompt in the model's {room} positions"),
    )?;
    let max_len = s
        .max_prompt_len
        .unwrap_or((room - s.max_new_tokens) as usize);
    let opts = LoadOptions {
        tokenizer,
        template: template.clone(),
        fields: s.fields,
        max_len,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (prompts, report) = opts.prompts(s.file).map_err(invalid)?;
    tracing::info!(
        "{}: {} prompts ({} longer than {max_len} tokens skipped)",
        s.file.display(),
        prompts.len(),
        report.skipped
    );
    Ok((prompts, report))
}

/// Whether two checkpoints share one tokenizer, byte for byte: a reward model must read the
/// policy's tokens as the policy wrote them.
pub fn same_tokenizer(a: &Path, b: &Path) -> bool {
    let read = |dir: &Path| std::fs::read(dir.join("tokenizer.json")).ok();
    read(a) == read(b)
}

/// Each prompt's sign under a reward model's `temper_score_sign` (1 for every prompt when it
/// has none): what turns its score into a reward for what each prompt asks.
pub fn prompt_signs(
    reward: Option<&crate::Transformer>,
    prompts: &[(Vec<u32>, PromptRecord)],
) -> Result<Vec<f64>, temper_rewards::RewardError> {
    match reward.and_then(|r| r.config.score_sign.as_ref()) {
        Some(sign) => prompts.iter().map(|(_, r)| sign.sign(&r.meta)).collect(),
        None => Ok(vec![1.0; prompts.len()]),
    }
}
