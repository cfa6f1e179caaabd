//! Record kinds: text documents, SFT examples (alpaca or messages form), preference pairs and
//! prompt sets. Each parses from a [`Row`]; field names are configurable ([`Fields`]) and
//! every error names the file, line or row, and field.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{DataError, Result};
use crate::read::Row;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Column / field names. The defaults are the ecosystem's: alpaca, sharegpt-style `messages`,
/// and `prompt`/`chosen`/`rejected` pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fields {
    pub text: String,
    pub messages: String,
    /// ShareGPT's turn list: `[{from: human|gpt|system, value}]`.
    pub conversations: String,
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub system: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Unpaired examples (KTO): the reply, and whether it is desirable.
    pub completion: String,
    pub label: String,
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            text: "text".into(),
            messages: "messages".into(),
            conversations: "conversations".into(),
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            completion: "completion".into(),
            label: "label".into(),
        }
    }
}

/// An unpaired example (KTO): a conversation, one reply, and whether the reply is desirable.
#[derive(Clone, Debug, PartialEq)]
pub struct UnpairedExample {
    pub prompt: Vec<Message>,
    pub completion: Vec<Message>,
    pub desirable: bool,
}

/// A preference pair: the same conversation so far, two candidate assistant replies, and the
/// row's other fields (a label to report accuracy by, say).
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    pub meta: BTreeMap<String, Value>,
}

/// A prompt for generation (PPO, evaluation): the conversation to continue, and any other
/// string/number fields of the row (a target label for a judge, say).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptRecord {
    pub messages: Vec<Message>,
    pub meta: BTreeMap<String, Value>,
}

/// Parses rows of one file, carrying its path into every error.
pub struct RecordParser<'a> {
    pub path: &'a Path,
    pub fields: &'a Fields,
}

impl RecordParser<'_> {
    fn err(&self, row: &Row, field: &str, message: impl Into<String>) -> DataError {
        DataError::Field {
            path: self.path.into(),
            location: row.location,
            field: field.into(),
            message: message.into(),
        }
    }

    fn get<'r>(&self, row: &'r Row, field: &str) -> Option<&'r Value> {
        row.value.get(field).filter(|v| !v.is_null())
    }

    fn string(&self, row: &Row, field: &str) -> Result<String> {
        match self.get(row, field) {
            None => Err(self.err(row, field, "missing")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(
                row,
                field,
                format!("expected a string, got {}", kind(other)),
            )),
        }
    }

    fn opt_string(&self, row: &Row, field: &str) -> Result<Option<String>> {
        match self.get(row, field) {
            None => Ok(None),
            Some(_) => self.string(row, field).map(Some),
        }
    }

    pub fn text(&self, row: &Row) -> Result<String> {
        self.string(row, &self.fields.text)
    }

    /// A message list: `[{role, content}, ...]`, or ShareGPT's `[{from, value}, ...]`.
    fn messages(&self, row: &Row, field: &str) -> Result<Vec<Message>> {
        let Some(value) = self.get(row, field) else {
            return Err(self.err(row, field, "missing"));
        };
        let Value::Array(items) = value else {
            return Err(self.err(
                row,
                field,
                format!("expected a list of messages, got {}", kind(value)),
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let at = format!("{field}[{i}]");
                // ShareGPT names the keys `from` and `value`.
                let (role_key, content_key) = if m.get("role").is_none() && m.get("from").is_some()
                {
                    ("from", "value")
                } else {
                    ("role", "content")
                };
                let role = match m.get(role_key).and_then(Value::as_str) {
                    Some("system") => Role::System,
                    Some("user") | Some("human") => Role::User,
                    Some("assistant") | Some("gpt") => Role::Assistant,
                    Some(other) => {
                        return Err(self.err(
                            row,
                            &format!("{at}.{role_key}"),
                            format!("unknown role `{other}` (system, user/human or assistant/gpt)"),
                        ))
                    }
                    None => return Err(self.err(row, &format!("{at}.{role_key}"), "missing")),
                };
                let content = match m.get(content_key) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(self.err(
                            row,
                            &format!("{at}.{content_key}"),
                            format!("expected a string, got {}", kind(other)),
                        ))
                    }
                    None => return Err(self.err(row, &format!("{at}.{content_key}"), "missing")),
                };
                Ok(Message { role, content })
            })
            .collect()
    }

    /// A string (one user or assistant turn) or a message list.
    fn turns(&self, row: &Row, field: &str, role: Role) -> Result<Vec<Message>> {
        match self.get(row, field) {
            Some(Value::String(s)) => Ok(vec![Message::new(role, s.clone())]),
            _ => self.messages(row, field),
        }
    }

    /// An SFT example in messages form, or alpaca form (`instruction`, optional `input`,
    /// `output`, optional `system`). It must end with an assistant turn.
    pub fn sft(&self, row: &Row) -> Result<Vec<Message>> {
        let f = self.fields;
        let messages = if self.get(row, &f.messages).is_some() {
            self.messages(row, &f.messages)?
        } else if self.get(row, &f.conversations).is_some() {
            self.messages(row, &f.conversations)?
        } else if self.get(row, &f.instruction).is_some() {
            let mut user = self.string(row, &f.instruction)?;
            if let Some(input) = self.opt_string(row, &f.input)?.filter(|s| !s.is_empty()) {
                user = format!("{user}\n\n{input}");
            }
            let mut m = Vec::new();
            if let Some(system) = self.opt_string(row, &f.system)? {
                m.push(Message::new(Role::System, system));
            }
            m.push(Message::new(Role::User, user));
            m.push(Message::new(Role::Assistant, self.string(row, &f.output)?));
            m
        } else {
            return Err(self.err(
                row,
                &f.messages,
                format!(
                    "missing: an SFT example needs `{}`, `{}` (ShareGPT) or `{}`/`{}`",
                    f.messages, f.conversations, f.instruction, f.output
                ),
            ));
        };
        match messages.last() {
            Some(m) if m.role == Role::Assistant => Ok(messages),
            _ => Err(self.err(
                row,
                &f.messages,
                "the last message must be the assistant's (it is what SFT trains)",
            )),
        }
    }

    /// A preference pair; `chosen`/`rejected` are strings (one assistant turn) or message lists.
    /// Without `prompt` (TRL's implicit-prompt form) they are whole conversations, and their
    /// shared opening turns are the prompt.
    pub fn pair(&self, row: &Row) -> Result<PreferencePair> {
        let f = self.fields;
        let mut pair = PreferencePair {
            prompt: Vec::new(),
            chosen: self.turns(row, &f.chosen, Role::Assistant)?,
            rejected: self.turns(row, &f.rejected, Role::Assistant)?,
            meta: self.other_fields(row, &[&f.prompt, &f.chosen, &f.rejected]),
        };
        if self.get(row, &f.prompt).is_some() {
            pair.prompt = self.turns(row, &f.prompt, Role::User)?;
        } else {
            let shared = pair
                .chosen
                .iter()
                .zip(&pair.rejected)
                .take_while(|(a, b)| a == b)
                .count();
            // The replies differ at least in their last turn.
            let shared = shared.min(pair.chosen.len().min(pair.rejected.len()).saturating_sub(1));
            if shared == 0 {
                return Err(self.err(
                    row,
                    &f.prompt,
                    format!(
                        "missing, and `{}` and `{}` share no opening turns to serve as the prompt",
                        f.chosen, f.rejected
                    ),
                ));
            }
            pair.prompt = pair.chosen.drain(..shared).collect();
            pair.rejected.drain(..shared);
        }
        for (field, turns) in [(&f.chosen, &pair.chosen), (&f.rejected, &pair.rejected)] {
            if turns.last().map(|m| m.role) != Some(Role::Assistant) {
                return Err(self.err(row, field, "must end with an assistant turn"));
            }
        }
        if pair.chosen == pair.rejected {
            return Err(self.err(
                row,
                &f.chosen,
                "identical to `rejected`: the pair carries no preference",
            ));
        }
        Ok(pair)
    }

    /// An unpaired example: `prompt`, `completion` (a string or message list) and a boolean
    /// `label` (true: desirable).
    pub fn unpaired(&self, row: &Row) -> Result<UnpairedExample> {
        let f = self.fields;
        let desirable = match self.get(row, &f.label) {
            Some(Value::Bool(b)) => *b,
            None => {
                return Err(self.err(
                    row,
                    &f.label,
                    "missing: unpaired examples need a true/false label",
                ))
            }
            Some(v) => {
                return Err(self.err(
                    row,
                    &f.label,
                    format!("expected true or false, got {}", kind(v)),
                ))
            }
        };
        let completion = self.turns(row, &f.completion, Role::Assistant)?;
        if completion.last().map(|m| m.role) != Some(Role::Assistant) {
            return Err(self.err(row, &f.completion, "must end with an assistant turn"));
        }
        Ok(UnpairedExample {
            prompt: self.turns(row, &f.prompt, Role::User)?,
            completion,
            desirable,
        })
    }

    /// A prompt: `prompt` as a string or message list (or `messages`), plus the other fields.
    pub fn prompt(&self, row: &Row) -> Result<PromptRecord> {
        let f = self.fields;
        let field = if self.get(row, &f.prompt).is_some() {
            &f.prompt
        } else {
            &f.messages
        };
        let messages = self.turns(row, field, Role::User)?;
        if messages.last().map(|m| m.role) == Some(Role::Assistant) {
            return Err(self.err(row, field, "a prompt must not end with an assistant turn"));
        }
        let meta = self.other_fields(row, &[field]);
        Ok(PromptRecord { messages, meta })
    }

    /// The row's fields other than `used`.
    fn other_fields(&self, row: &Row, used: &[&String]) -> BTreeMap<String, Value> {
        row.value
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| !used.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
