//! Hugging Face chat templates: the Jinja `chat_template` a model ships in
//! `tokenizer_config.json` (or `chat_template.jinja`), rendered with minijinja configured as
//! transformers configures Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls, Python string
//! methods, `raise_exception`, `strftime_now`, a `tojson` that writes what Python's
//! `json.dumps` writes) and the special tokens of `tokenizer_config.json`.
//!
//! `{% generation %}…{% endgeneration %}` blocks (transformers' marker for assistant tokens)
//! are rewritten into sentinel characters before compiling, so a render reports the byte spans
//! they enclose.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

use temper_stage::clock::{civil_from_days, days_from_civil};

use crate::error::{DataError, Result};
use crate::records::Message;

/// Where a model folder keeps its template, in the order transformers reads them.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// Private-use characters that stand for `{% generation %}` and `{% endgeneration %}` in the
/// rendered text (stripped before tokenizing).
const OPEN: char = '\u{F8F0}';
const CLOSE: char = '\u{F8F1}';

/// The special tokens a template refers to by name, as strings.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// A model folder's template and special tokens.
pub struct JinjaTemplate {
    env: Environment<'static>,
    pub source: String,
    /// Where the template came from (named in errors).
    pub origin: PathBuf,
    pub specials: SpecialTokens,
    /// Whether the template marks assistant tokens itself with `{% generation %}`.
    pub has_generation_blocks: bool,
}

/// One render: the text (sentinels removed) and the byte spans `{% generation %}` enclosed.
#[derive(Debug)]
pub struct Rendered {
    pub text: String,
    pub generation_spans: Vec<(usize, usize)>,
}

impl JinjaTemplate {
    /// The template and special tokens beside `tokenizer.json` in `dir`, if the folder has a
    /// template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`).
    pub fn find(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join(TOKENIZER_CONFIG);
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                Some(
                    serde_json::from_str::<Json>(&text).map_err(|e| DataError::Tokenizer {
                        path: config_path.clone(),
                        message: format!("not valid JSON: {e}"),
                    })?,
                )
            }
            Err(_) => None,
        };
        let specials = config.as_ref().map(special_tokens).unwrap_or_default();
        let file = dir.join(TEMPLATE_FILE);
        let (source, origin) = if file.exists() {
            let text = std::fs::read_to_string(&file).map_err(|e| DataError::Tokenizer {
                path: file.clone(),
                message: e.to_string(),
            })?;
            (text, file)
        } else {
            match config.as_ref().and_then(template_in_config) {
                Some(text) => (text, config_path),
                None => return Ok(None),
            }
        };
        Self::new(source, origin, specials).map(Some)
    }

    /// Compiles `source`; a syntax error names `origin` and the line.
    pub fn new(source: String, origin: PathBuf, specials: SpecialTokens) -> Result<Self> {
        let rewritten = rewrite_generation_tags(&source);
        let has_generation_blocks = rewritten != source;
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", python_tojson);
        env.add_template_owned("chat", rewritten)
            .map_err(|e| template_error(&origin, &e))?;
        Ok(Self {
            env,
            source,
            origin,
            specials,
            has_generation_blocks,
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the opening of an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        let tmpl = self
            .env
            .get_template("chat")
            .expect("compiled in new() under this name");
        let s = &self.specials;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => s.bos.clone().unwrap_or_default(),
            eos_token => s.eos.clone().unwrap_or_default(),
            pad_token => s.pad.clone(),
            unk_token => s.unk.clone(),
        };
        let raw = tmpl
            .render(ctx)
            .map_err(|e| template_error(&self.origin, &e))?;
        Ok(strip_sentinels(&raw))
    }
}

fn template_error(origin: &Path, e: &Error) -> DataError {
    let mut message = format!("chat template: {}", e.detail().unwrap_or(&e.to_string()));
    if let Some(line) = e.line() {
        message = format!("{message} (template line {line})");
    }
    DataError::Tokenizer {
        path: origin.into(),
        message,
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": …}`.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(String::from),
        _ => None,
    }
}

fn special_tokens(config: &Json) -> SpecialTokens {
    SpecialTokens {
        bos: token_string(config.get("bos_token")),
        eos: token_string(config.get("eos_token")),
        pad: token_string(config.get("pad_token")),
        unk: token_string(config.get("unk_token")),
    }
}

/// `chat_template` is a string, or a list of named templates of which `default` is the chat
/// one (as transformers picks it).
fn template_in_config(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(String::from),
        _ => None,
    }
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (with any whitespace control) by
/// expressions printing the sentinels, keeping the tags' `-` trimming.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (left, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => ("", inner.strip_prefix('+').unwrap_or(inner)),
        };
        let (body, right) = match body.strip_suffix('-') {
            Some(b) => (b, "-"),
            None => (body.strip_suffix('+').unwrap_or(body), ""),
        };
        let sentinel = match body.trim() {
            "generation" => Some(OPEN),
            "endgeneration" => Some(CLOSE),
            _ => None,
        };
        match sentinel {
            Some(c) => out.push_str(&format!("{{{{{left} '{c}' {right}}}}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn strip_sentinels(raw: &str) -> Rendered {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut open = None;
    for c in raw.chars() {
        match c {
            OPEN => open = Some(text.len()),
            CLOSE => {
                if let Some(s) = open.take() {
                    spans.push((s, text.len()));
                }
            }
            c => text.push(c),
        }
    }
    Rendered {
        text,
        generation_spans: spans,
    }
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` as transformers' `tojson` writes
/// it: `", "` and `": "` separators on one line, `","` and newlines when indented.
fn python_tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(&json, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonCompact);
            serde::Serialize::serialize(&json, &mut ser)
        }
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).expect("serde_json writes UTF-8"),
    ))
}

/// Python's default `json.dumps` separators.
struct PythonCompact;

/// `", "` before every item but the first.
fn item_separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `strftime_now(format)`: the current UTC time, or `SOURCE_DATE_EPOCH`'s when set (the
/// reproducible-builds convention), so a pipeline that must give the same ids every day can
/// pin the date templates such as Llama 3.1's print.
fn strftime_now(format: &str) -> std::result::Result<String, Error> {
    let secs = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse::<i64>().map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("SOURCE_DATE_EPOCH must be seconds since 1970, got `{v}`"),
            )
        })?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    };
    Ok(format_utc(secs, format))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// The strftime directives chat templates use (%Y %m %d %e %B %b %A %a %H %M %S %j %%).
fn format_utc(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Role;

    fn template(src: &str) -> JinjaTemplate {
        let specials = SpecialTokens {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            ..Default::default()
        };
        JinjaTemplate::new(src.into(), "t.jinja".into(), specials).unwrap()
    }

    #[test]
    fn dates_match_python_strftime() {
        // 2024-07-26 (a Friday) 13:05:09 UTC; day 208 of a leap year.
        let t = 1_722_085_509 - 86_400;
        assert_eq!(format_utc(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            format_utc(t, "%A %B %e %H:%M:%S %j %%"),
            "Friday July 26 13:05:09 208 %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }

    #[test]
    fn generation_blocks_become_spans_and_keep_whitespace_control() {
        let t = template(
            "{% for m in messages %}{{ m.role }}: {%- generation -%}  {{ m.content }}{% endgeneration %}\n{% endfor %}",
        );
        assert!(t.has_generation_blocks);
        let msgs = [
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "yo"),
        ];
        let r = t.render(&msgs, false).unwrap();
        assert_eq!(r.text, "user:hi\nassistant:yo\n");
        let spans: Vec<&str> = r
            .generation_spans
            .iter()
            .map(|&(a, b)| &r.text[a..b])
            .collect();
        assert_eq!(spans, ["hi", "yo"]);
    }

    #[test]
    fn python_helpers_behave_as_in_transformers() {
        let t = template(
            "{{ bos_token }}{{ messages[0].content.strip().upper() }}|{{ {'a': [1, 2], 'b': 'é'} | tojson }}|{{ messages | length }}{{ eos_token }}",
        );
        let r = t
            .render(&[Message::new(Role::User, "  x ")], false)
            .unwrap();
        assert_eq!(r.text, "<s>X|{\"a\": [1, 2], \"b\": \"é\"}|1</s>");
        let raising = template("{{ raise_exception('only user and assistant roles') }}");
        let err = raising.render(&[], false).unwrap_err().to_string();
        assert!(
            err.contains("only user and assistant roles") && err.contains("t.jinja"),
            "{err}"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_are_on_as_in_transformers() {
        let t = template("{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}");
        let r = t.render(&[Message::new(Role::User, "a")], false).unwrap();
        assert_eq!(r.text, "a\n");
    }
}
