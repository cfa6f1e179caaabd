//! Loading a stage's dataset: read rows, parse records, render with the chat template, and
//! apply the over-long policy, with a report of what was kept, truncated or skipped.

use std::path::Path;

use serde::Serialize;

use crate::batch::Overlong;
use crate::chat::{ChatTemplate, Example};
use crate::error::{DataError, Location, Result};
use crate::read::{read_rows, TextSplit};
use crate::records::{Fields, PromptRecord, RecordParser};
use crate::tokenizer::TextTokenizer;

/// What loading did to a file's records; stages log it and put it in their summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    pub rows: usize,
    pub kept: usize,
    pub truncated: usize,
    pub skipped: usize,
    pub max_tokens: usize,
    pub total_tokens: usize,
}

impl LoadReport {
    pub fn mean_tokens(&self) -> f64 {
        self.total_tokens as f64 / self.rows.max(1) as f64
    }
}

/// A prompt's ids (ending in the assistant marker) and its record.
pub type RenderedPrompt = (Vec<u32>, PromptRecord);

/// A preference pair rendered: both sides as prompt + reply + EOS (loss mask on the reply), and
/// the row's other fields.
#[derive(Clone, Debug)]
pub struct RenderedPair {
    pub chosen: Example,
    pub rejected: Example,
    pub meta: std::collections::BTreeMap<String, serde_json::Value>,
}

impl RenderedPair {
    /// A string field of the row (`sentiment`, say), for grouping results.
    pub fn label(&self, field: &str) -> Option<&str> {
        self.meta.get(field).and_then(|v| v.as_str())
    }
}

/// Shared settings for rendering a file's records.
pub struct LoadOptions<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub template: ChatTemplate,
    pub fields: &'a Fields,
    /// Longest example in tokens (the model's context).
    pub max_len: usize,
    pub overlong: Overlong,
    pub train_on_prompt: bool,
}

impl LoadOptions<'_> {
    /// Applies the over-long policy to one example; None when it is skipped.
    fn fit(
        &self,
        path: &Path,
        location: Location,
        mut ex: Example,
        report: &mut LoadReport,
    ) -> Result<Option<Example>> {
        report.rows += 1;
        report.total_tokens += ex.len();
        report.max_tokens = report.max_tokens.max(ex.len());
        if ex.len() <= self.max_len {
            report.kept += 1;
            return Ok(Some(ex));
        }
        match self.overlong {
            Overlong::Error => Err(DataError::TooLong {
                path: path.into(),
                location,
                len: ex.len(),
                max: self.max_len,
            }),
            Overlong::Truncate => {
                ex.ids.truncate(self.max_len);
                ex.loss_mask.truncate(self.max_len);
                report.truncated += 1;
                report.kept += 1;
                Ok(Some(ex))
            }
            Overlong::Skip => {
                report.skipped += 1;
                Ok(None)
            }
        }
    }

    fn nonempty<T>(&self, path: &Path, items: Vec<T>, report: &LoadReport) -> Result<Vec<T>> {
        if items.is_empty() {
            return Err(DataError::Invalid(format!(
                "{}: no usable examples ({} rows, {} skipped as longer than {} tokens)",
                path.display(),
                report.rows,
                report.skipped,
                self.max_len
            )));
        }
        Ok(items)
    }

    /// The parser of `path`'s records under this stage's field names.
    fn parser<'p>(&'p self, path: &'p Path) -> RecordParser<'p> {
        RecordParser {
            path,
            fields: self.fields,
        }
    }

    /// SFT examples: the whole conversation, loss on assistant replies.
    pub fn sft(&self, path: &Path) -> Result<(Vec<Example>, LoadReport)> {
        let parser = self.parser(path);
        let mut report = LoadReport::default();
        let mut out = Vec::new();
        for row in read_rows(path, TextSplit::File)? {
            let row = row?;
            let messages = parser.sft(&row)?;
            let ex = self
                .template
                .render(self.tokenizer, &messages, self.train_on_prompt)
                .map_err(in_record(path, row.location))?;
            out.extend(self.fit(path, row.location, ex, &mut report)?);
        }
        Ok((self.nonempty(path, out, &report)?, report))
    }

    /// The prompts of SFT examples (the conversation before the final reply, rendered for
    /// generation) with that reply, for sampling responses at evaluation.
    pub fn sft_prompts(&self, path: &Path, limit: usize) -> Result<Vec<(Vec<u32>, String)>> {
        let parser = self.parser(path);
        let mut out = Vec::new();
        for row in read_rows(path, TextSplit::File)?.take(limit) {
            let row = row?;
            let messages = parser.sft(&row)?;
            let (reply, context) = messages
                .split_last()
                .expect("sft() guarantees a final reply");
            out.push((
                self.template
                    .render_prompt(self.tokenizer, context)
                    .map_err(in_record(path, row.location))?,
                reply.content.clone(),
            ));
        }
        Ok(out)
    }

    /// Preference pairs, each side rendered as prompt + reply + EOS. The loss mask marks the
    /// reply, whose last token is where the reward model reads its score.
    pub fn pairs(&self, path: &Path) -> Result<(Vec<RenderedPair>, LoadReport)> {
        let parser = self.parser(path);
        let mut report = LoadReport::default();
        let mut out = Vec::new();
        for row in read_rows(path, TextSplit::File)? {
            let row = row?;
            let pair = parser.pair(&row)?;
            let render = |reply| {
                let conversation = [pair.prompt.clone(), reply].concat();
                self.template
                    .render(self.tokenizer, &conversation, false)
                    .map_err(in_record(path, row.location))
            };
            let chosen = self.fit(
                path,
                row.location,
                render(pair.chosen.clone())?,
                &mut report,
            )?;
            let rejected = self.fit(
                path,
                row.location,
                render(pair.rejected.clone())?,
                &mut report,
            )?;
            if let (Some(chosen), Some(rejected)) = (chosen, rejected) {
                if chosen.ids == rejected.ids {
                    return Err(DataError::Field {
                        path: path.into(),
                        location: row.location,
                        field: self.fields.chosen.clone(),
                        message: "renders to the same tokens as the rejected reply: the pair carries no preference".into(),
                    });
                }
                out.push(RenderedPair {
                    chosen,
                    rejected,
                    meta: pair.meta.clone(),
                });
            }
        }
        Ok((self.nonempty(path, out, &report)?, report))
    }

    /// Unpaired examples (KTO), rendered like one side of a pair, with their labels. A file of
    /// preference pairs is read as two examples per pair: the chosen reply desirable, the
    /// rejected one not.
    pub fn unpaired(&self, path: &Path) -> Result<(Vec<(Example, bool)>, LoadReport)> {
        let parser = self.parser(path);
        let mut report = LoadReport::default();
        let mut out = Vec::new();
        for row in read_rows(path, TextSplit::File)? {
            let row = row?;
            let examples = if row.value.get(&self.fields.chosen).is_some() {
                let pair = parser.pair(&row)?;
                vec![
                    ([pair.prompt.clone(), pair.chosen].concat(), true),
                    ([pair.prompt, pair.rejected].concat(), false),
                ]
            } else {
                let u = parser.unpaired(&row)?;
                vec![([u.prompt, u.completion].concat(), u.desirable)]
            };
            for (conversation, desirable) in examples {
                let ex = self
                    .template
                    .render(self.tokenizer, &conversation, false)
                    .map_err(in_record(path, row.location))?;
                out.extend(
                    self.fit(path, row.location, ex, &mut report)?
                        .map(|e| (e, desirable)),
                );
            }
        }
        Ok((self.nonempty(path, out, &report)?, report))
    }

    /// Prompts rendered for generation (ending in the assistant marker), with their records.
    pub fn prompts(&self, path: &Path) -> Result<(Vec<RenderedPrompt>, LoadReport)> {
        let parser = self.parser(path);
        let mut report = LoadReport::default();
        let mut out = Vec::new();
        for row in read_rows(path, TextSplit::File)? {
            let row = row?;
            let record = parser.prompt(&row)?;
            let ids = self
                .template
                .render_prompt(self.tokenizer, &record.messages)
                .map_err(in_record(path, row.location))?;
            let ex = Example {
                loss_mask: vec![0; ids.len()],
                ids,
            };
            if let Some(ex) = self.fit(path, row.location, ex, &mut report)? {
                out.push((ex.ids, record));
            }
        }
        Ok((self.nonempty(path, out, &report)?, report))
    }
}

/// A chat-template or tokenizer error while rendering one record, located: the data file and
/// line (or row) besides the template's own message.
fn in_record(path: &Path, location: Location) -> impl Fn(DataError) -> DataError + '_ {
    move |e| match e {
        DataError::Tokenizer { .. } => DataError::Field {
            path: path.into(),
            location,
            field: "messages".into(),
            message: e.to_string(),
        },
        other => other,
    }
}
