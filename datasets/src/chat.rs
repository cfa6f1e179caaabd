//! The chat template. One rendering serves SFT, the reward model and PPO, so the stages agree
//! token for token:
//!
//! ```text
//! <|system|>{system}<|user|>{user}<|assistant|>{reply}<|endoftext|><|user|>...
//! ```
//!
//! Markers are special tokens inserted by id; message text is encoded on its own, so a prompt
//! rendered for generation (ending in `<|assistant|>`) is an exact prefix of the rendered
//! conversation with the reply. Loss covers the assistant's reply tokens and its EOS only,
//! unless `train_on_prompt` is set.

use crate::error::Result;
use crate::records::{Message, Role};
use crate::tokenizer::{TextTokenizer, ASSISTANT, EOS, PAD, SYSTEM, USER};

/// Token ids and, per token, whether it is a training target (1) or context (0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Tokens before the first trained one: the prompt of a rendered reply.
    pub fn prompt_len(&self) -> usize {
        self.loss_mask
            .iter()
            .position(|&m| m == 1)
            .unwrap_or(self.len())
    }

    /// This example's prompt followed by `other`'s reply (KTO's mismatched pairs).
    pub fn with_reply_of(&self, other: &Example) -> Example {
        let (p, q) = (self.prompt_len(), other.prompt_len());
        Example {
            ids: [&self.ids[..p], &other.ids[q..]].concat(),
            loss_mask: [&self.loss_mask[..p], &other.loss_mask[q..]].concat(),
        }
    }

    fn push(&mut self, ids: &[u32], trained: bool) {
        self.ids.extend_from_slice(ids);
        self.loss_mask
            .extend(std::iter::repeat_n(u8::from(trained), ids.len()));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    pub system: u32,
    pub user: u32,
    pub assistant: u32,
    pub eos: u32,
    pub pad: u32,
}

impl ChatTemplate {
    /// The template's token ids in `tok`; an error names any missing special token.
    pub fn new(tok: &TextTokenizer) -> Result<Self> {
        Ok(Self {
            system: tok.require(SYSTEM)?,
            user: tok.require(USER)?,
            assistant: tok.require(ASSISTANT)?,
            eos: tok.require(EOS)?,
            pad: tok.require(PAD)?,
        })
    }

    fn marker(&self, role: Role) -> u32 {
        match role {
            Role::System => self.system,
            Role::User => self.user,
            Role::Assistant => self.assistant,
        }
    }

    /// A whole conversation, with the loss on assistant replies (and their EOS).
    pub fn render(
        &self,
        tok: &TextTokenizer,
        messages: &[Message],
        train_on_prompt: bool,
    ) -> Result<Example> {
        let mut ex = Example::default();
        for m in messages {
            let reply = m.role == Role::Assistant;
            ex.push(&[self.marker(m.role)], train_on_prompt);
            ex.push(&tok.encode(&m.content)?, reply || train_on_prompt);
            if reply {
                ex.push(&[self.eos], true);
            }
        }
        Ok(ex)
    }

    /// The prompt for generation: the conversation so far and the assistant marker.
    pub fn render_prompt(&self, tok: &TextTokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        let mut ex = self.render(tok, messages, false)?;
        ex.push(&[self.assistant], false);
        Ok(ex.ids)
    }
}
