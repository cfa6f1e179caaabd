//! Chat templates against transformers' `apply_chat_template`, on the goldens
//! scripts/make_chat_goldens.py wrote (tests/fixtures/chat/<template>/): temper's own template,
//! ChatML, Llama 3 and Mistral, read from `tokenizer_config.json` or `chat_template.jinja`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use temper_data::chat::ChatTemplate;
use temper_data::jinja::JinjaTemplate;
use temper_data::records::{Message, Role};
use temper_data::tokenizer::TextTokenizer;

const TEMPLATES: [&str; 4] = ["temper", "chatml", "llama3", "mistral"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/chat")
        .join(name)
}

fn golden(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn messages(case: &Value) -> Vec<Message> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Runs of consecutive trained tokens, decoded.
fn trained_segments(tok: &TextTokenizer, ids: &[u32], mask: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut run = Vec::new();
    for (&id, &m) in ids.iter().zip(mask).chain([(&0, &0)]) {
        if m == 1 {
            run.push(id);
        } else if !run.is_empty() {
            out.push(tok.decode(&run).unwrap());
            run.clear();
        }
    }
    out
}

fn check(name: &str, tok: &TextTokenizer, tpl: &ChatTemplate) {
    let g = golden(name);
    let end = g["end_of_turn"].as_str().unwrap();
    assert_eq!(
        Some(tpl.eos),
        tok.id(end),
        "{name}: the token ending a turn"
    );
    for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let conv = messages(case);
        let ex = tpl.render(tok, &conv, false).unwrap();
        assert_eq!(ex.ids, ids(&case["ids"]), "{name} case {i}: ids");
        let prompt = tpl.render_prompt(tok, &conv[..conv.len() - 1]).unwrap();
        assert_eq!(prompt, ids(&case["prompt_ids"]), "{name} case {i}: prompt");
        if let Some(mask) = case.get("assistant_mask") {
            let mask: Vec<u8> = serde_json::from_value(mask.clone()).unwrap();
            assert_eq!(
                ex.loss_mask, mask,
                "{name} case {i}: transformers' assistant mask"
            );
        }
        let replies: Vec<String> = serde_json::from_value(case["replies"].clone()).unwrap();
        assert_eq!(
            trained_segments(tok, &ex.ids, &ex.loss_mask),
            replies,
            "{name} case {i}: trained tokens are each reply and the token ending it"
        );
    }
}

#[test]
fn templates_render_the_ids_transformers_renders() {
    for name in TEMPLATES {
        let tok = TextTokenizer::load(&fixture(name).join("tokenizer.json")).unwrap();
        let tpl = ChatTemplate::new(&tok).unwrap();
        assert_eq!(tpl.is_temper(), name == "temper", "{name}: which renderer");
        check(name, &tok, &tpl);
    }
}

#[test]
fn temper_template_through_the_jinja_engine_matches_its_marker_renderer() {
    // temper's checkpoints carry TEMPER_TEMPLATE; rendered as Jinja (as transformers does) it
    // must give what the marker renderer gives, masks included via {% generation %}.
    let dir = fixture("temper");
    let tok = TextTokenizer::load(&dir.join("tokenizer.json")).unwrap();
    let jinja = JinjaTemplate::find(&dir).unwrap().unwrap();
    assert_eq!(jinja.source, temper_data::TEMPER_TEMPLATE);
    assert!(jinja.has_generation_blocks);
    let tpl = ChatTemplate::jinja(&tok, jinja).unwrap();
    assert!(!tpl.is_temper());
    check("temper", &tok, &tpl);
}

#[test]
fn a_template_that_raises_is_named_with_its_message() {
    let dir = fixture("mistral");
    let tok = TextTokenizer::load(&dir.join("tokenizer.json")).unwrap();
    let tpl = ChatTemplate::new(&tok).unwrap();
    let conv = [
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "Hello"),
    ];
    let err = tpl.render(&tok, &conv, false).unwrap_err().to_string();
    assert!(
        err.contains("chat_template.jinja") && err.contains("roles must alternate"),
        "{err}"
    );
}

#[test]
fn a_template_without_assistant_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("chatml").join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    // Drops every assistant message: nothing could be trained.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages if m.role != 'assistant' %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let tok = TextTokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
    let tpl = ChatTemplate::new(&tok).unwrap();
    let conv = [
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "Hello"),
    ];
    let err = tpl.render(&tok, &conv, false).unwrap_err().to_string();
    assert!(err.contains("no assistant tokens"), "{err}");
}

#[test]
fn a_generation_config_list_adds_stop_ids() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("chatml").join(f), dir.path().join(f)).unwrap();
    }
    let tok = TextTokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
    let (im_end, text_end) = (
        tok.id("<|im_end|>").unwrap(),
        tok.id("<|endoftext|>").unwrap(),
    );
    assert!(ChatTemplate::new(&tok).unwrap().extra_stops.is_empty());
    // Qwen's generation_config: the turn's end and the document's end.
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!("{{\"eos_token_id\": [{im_end}, {text_end}]}}"),
    )
    .unwrap();
    let tpl = ChatTemplate::new(&tok).unwrap();
    assert_eq!(tpl.eos, im_end);
    assert_eq!(tpl.extra_stops, [text_end]);
    assert_eq!(tpl.also_stop(), [i64::from(text_end)]);
}
