//! The chat template. One rendering serves SFT, the reward model, PPO, GRPO and DPO, so the
//! stages agree token for token. Two kinds:
//!
//! - **temper's own**, for tokenizers temper trains:
//!   ```text
//!   <|system|>{system}<|user|>{user}<|assistant|>{reply}<|endoftext|><|user|>...
//!   ```
//!   Markers are special tokens inserted by id and message text is encoded on its own, so no
//!   data can forge a turn and a prompt rendered for generation (ending in `<|assistant|>`) is
//!   an exact prefix of the conversation with its reply. Saved checkpoints carry it as a Jinja
//!   `chat_template` ([`TEMPER_TEMPLATE`]) that transformers renders to the same ids.
//! - **the model's own** Jinja `chat_template` (ChatML, Llama 3, Mistral…; see
//!   [`crate::jinja`]): the conversation is rendered to text and tokenized with special tokens
//!   recognised, as `apply_chat_template` does. Assistant turns are found by the template's
//!   `{% generation %}` blocks where it has them, otherwise by rendering each prefix of the
//!   conversation: turn i is what the conversation up to i adds to the conversation before it
//!   with a generation prompt, up to and including the token that ends a turn.
//!
//! Loss covers the assistant replies and the token ending each, unless `train_on_prompt`.

use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::jinja::JinjaTemplate;
use crate::records::{Message, Role};
use crate::tokenizer::{TextTokenizer, ASSISTANT, EOS, PAD, SYSTEM, USER};

/// temper's template in Jinja, written into every checkpoint's `tokenizer_config.json`. The
/// `{% generation %}` block lets transformers' `return_assistant_tokens_mask` mark what temper
/// trains on.
pub const TEMPER_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

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

/// How a conversation becomes ids: see the module comment.
#[derive(Clone)]
pub struct ChatTemplate {
    /// The token that ends an assistant turn: sampling stops there.
    pub eos: u32,
    /// Fills padded positions (never attended to, never trained).
    pub pad: u32,
    /// Other ids the model's `generation_config.json` stops at (`eos_token_id` as a list).
    pub extra_stops: Vec<u32>,
    format: Format,
}

#[derive(Clone)]
enum Format {
    Markers {
        system: u32,
        user: u32,
        assistant: u32,
    },
    Jinja(Arc<JinjaTemplate>),
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.format {
            Format::Markers { .. } => "temper".to_string(),
            Format::Jinja(t) => format!("jinja from {}", t.origin.display()),
        };
        write!(
            f,
            "ChatTemplate({kind}, eos {}, pad {})",
            self.eos, self.pad
        )
    }
}

impl ChatTemplate {
    /// The template for `tok`: the Jinja template in the tokenizer's folder when it has one
    /// other than temper's own, else temper's markers (an error names any missing token).
    pub fn new(tok: &TextTokenizer) -> Result<Self> {
        let dir = tok.path.parent().unwrap_or(std::path::Path::new("."));
        let mut template = match JinjaTemplate::find(dir)? {
            Some(t) if t.source.trim() != TEMPER_TEMPLATE => Self::jinja(tok, t)?,
            _ => Self::markers(tok)?,
        };
        template.extra_stops = generation_stops(dir)?
            .into_iter()
            .filter(|&id| id != template.eos)
            .collect();
        Ok(template)
    }

    /// The ids besides `eos` that end a reply, for the sampler.
    pub fn also_stop(&self) -> Vec<i64> {
        self.extra_stops.iter().map(|&id| i64::from(id)).collect()
    }

    /// Every token that ends a reply: EOS, then the template's other stops (a reply that ends
    /// with any of them is complete, not cut off).
    pub fn stop_ids(&self) -> Vec<u32> {
        std::iter::once(self.eos)
            .chain(self.extra_stops.iter().copied())
            .collect()
    }

    /// temper's own template over `tok`'s special tokens.
    pub fn markers(tok: &TextTokenizer) -> Result<Self> {
        Ok(Self {
            eos: tok.require(EOS)?,
            pad: tok.require(PAD)?,
            extra_stops: Vec::new(),
            format: Format::Markers {
                system: tok.require(SYSTEM)?,
                user: tok.require(USER)?,
                assistant: tok.require(ASSISTANT)?,
            },
        })
    }

    /// A model's Jinja template. The token ending a turn is the first special token the
    /// template writes after a reply; the pad token is `pad_token`, else that one.
    pub fn jinja(tok: &TextTokenizer, template: JinjaTemplate) -> Result<Self> {
        let probe = [
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello"),
        ];
        let prompt = template.render(&probe[..1], true)?.text;
        let full = template.render(&probe, false)?.text;
        let from_template = match full.strip_prefix(prompt.as_str()) {
            Some(reply) => {
                let (ids, _) = tok.encode_rendered(reply)?;
                ids.into_iter().find(|&id| tok.is_special(id))
            }
            None => None,
        };
        let named = |t: &Option<String>| t.as_deref().and_then(|t| tok.id(t));
        let eos = from_template
            .or_else(|| named(&template.specials.eos))
            .ok_or_else(|| DataError::Tokenizer {
                path: template.origin.clone(),
                message: "cannot tell which token ends an assistant turn: the template writes no special token after a reply and tokenizer_config.json names no eos_token in the vocabulary".into(),
            })?;
        let pad = named(&template.specials.pad).unwrap_or(eos);
        Ok(Self {
            eos,
            pad,
            extra_stops: Vec::new(),
            format: Format::Jinja(Arc::new(template)),
        })
    }

    /// Whether this is temper's own template (markers by id).
    pub fn is_temper(&self) -> bool {
        matches!(self.format, Format::Markers { .. })
    }

    /// A whole conversation, with the loss on assistant replies (and the token ending each).
    pub fn render(
        &self,
        tok: &TextTokenizer,
        messages: &[Message],
        train_on_prompt: bool,
    ) -> Result<Example> {
        match &self.format {
            Format::Markers {
                system,
                user,
                assistant,
            } => {
                let mut ex = Example::default();
                for m in messages {
                    let reply = m.role == Role::Assistant;
                    let marker = match m.role {
                        Role::System => *system,
                        Role::User => *user,
                        Role::Assistant => *assistant,
                    };
                    ex.push(&[marker], train_on_prompt);
                    ex.push(&tok.encode(&m.content)?, reply || train_on_prompt);
                    if reply {
                        ex.push(&[self.eos], true);
                    }
                }
                Ok(ex)
            }
            Format::Jinja(t) => self.render_jinja(t, tok, messages, train_on_prompt),
        }
    }

    fn render_jinja(
        &self,
        t: &JinjaTemplate,
        tok: &TextTokenizer,
        messages: &[Message],
        train_on_prompt: bool,
    ) -> Result<Example> {
        let full = t.render(messages, false)?;
        let spans = if t.has_generation_blocks {
            full.generation_spans
        } else {
            self.turn_spans(t, tok, messages, &full.text)?
        };
        let (ids, offsets) = tok.encode_rendered(&full.text)?;
        let loss_mask: Vec<u8> = offsets
            .iter()
            .map(|&(start, _)| {
                u8::from(train_on_prompt || spans.iter().any(|&(a, b)| start >= a && start < b))
            })
            .collect();
        let has_reply = messages.iter().any(|m| m.role == Role::Assistant);
        if has_reply && !loss_mask.contains(&1) {
            return Err(DataError::Tokenizer {
                path: t.origin.clone(),
                message: "the chat template put no assistant tokens in a rendered conversation: add {% generation %} blocks around replies, or check that it writes assistant messages".into(),
            });
        }
        Ok(Example { ids, loss_mask })
    }

    /// Byte spans of each assistant turn, by rendering prefixes (see the module comment).
    fn turn_spans(
        &self,
        t: &JinjaTemplate,
        tok: &TextTokenizer,
        messages: &[Message],
        full: &str,
    ) -> Result<Vec<(usize, usize)>> {
        let end_of_turn = tok.token(self.eos).unwrap_or_default();
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let before = t.render(&messages[..i], true)?.text;
            let upto = t.render(&messages[..=i], false)?.text;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(DataError::Tokenizer {
                    path: t.origin.clone(),
                    message: format!(
                        "assistant turn {} cannot be located: the template renders the conversation before it differently once more messages follow; add {{% generation %}} blocks around replies",
                        i + 1
                    ),
                });
            }
            let reply = &upto[before.len()..];
            let end = match reply
                .find(end_of_turn.as_str())
                .filter(|_| !end_of_turn.is_empty())
            {
                Some(k) => before.len() + k + end_of_turn.len(),
                None => upto.len(),
            };
            spans.push((before.len(), end));
        }
        Ok(spans)
    }

    /// The prompt for generation: the conversation so far and the opening of a reply.
    pub fn render_prompt(&self, tok: &TextTokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        match &self.format {
            Format::Markers { assistant, .. } => {
                let mut ex = self.render(tok, messages, false)?;
                ex.push(&[*assistant], false);
                Ok(ex.ids)
            }
            Format::Jinja(t) => Ok(tok.encode_rendered(&t.render(messages, true)?.text)?.0),
        }
    }
}

/// `eos_token_id` of `generation_config.json` in `dir` (a number or a list; none without the
/// file). A file that is not JSON is an error naming it.
fn generation_stops(dir: &std::path::Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
    let ids = match &value["eos_token_id"] {
        serde_json::Value::Array(list) => list.iter().filter_map(|v| v.as_u64()).collect(),
        v => v.as_u64().into_iter().collect::<Vec<_>>(),
    };
    Ok(ids.into_iter().map(|id| id as u32).collect())
}
