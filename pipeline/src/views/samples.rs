//! A stage's samples (prompt, reply, scores from its `samples.jsonl`) as a collapsible list in
//! `temper report`: the replies at the last step they were logged, where a glance tells fluent
//! text from gibberish and a high score from a deserved one.

use std::fmt::Write;
use std::path::Path;

use serde_json::Value as Json;

use crate::views::plot::escape;

/// Samples shown per stage: enough to judge, few enough to keep the report light.
const SHOWN: usize = 16;
/// Characters shown of one text field.
const TEXT_CHARS: usize = 600;

/// The text fields first (prompt, then replies), then everything else; `step` is the heading.
fn columns(records: &[&Json]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for r in records {
        for k in r.as_object().into_iter().flat_map(|o| o.keys()) {
            if k != "step" && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let rank = |k: &String| match k.as_str() {
        "prompt" => 0,
        "response" | "reply" | "completion" => 1,
        "reference" | "label" => 2,
        _ if records.iter().any(|r| r[k].is_string()) => 3,
        _ => 4,
    };
    keys.sort_by_key(|k| rank(k));
    keys
}

fn cell(v: &Json) -> (String, bool) {
    match v {
        Json::String(s) if s.chars().count() > TEXT_CHARS => {
            let head: String = s.chars().take(TEXT_CHARS).collect();
            (format!("{head}…"), true)
        }
        Json::String(s) => (s.clone(), true),
        Json::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => (format!("{x:.4}"), false),
            _ => (n.to_string(), false),
        },
        Json::Null => ("-".into(), false),
        other => (other.to_string(), false),
    }
}

/// Appends the `<details>` list for the stage folder `out`; nothing when it has no samples.
pub fn section(html: &mut String, out: &Path) {
    let Ok(text) = std::fs::read_to_string(out.join("samples.jsonl")) else {
        return;
    };
    let records: Vec<Json> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(Json::is_object)
        .collect();
    let Some(last_step) = records.iter().filter_map(|r| r["step"].as_i64()).max() else {
        return;
    };
    let shown: Vec<&Json> = records
        .iter()
        .filter(|r| r["step"].as_i64() == Some(last_step))
        .take(SHOWN)
        .collect();
    let cols = columns(&shown);
    let _ = write!(
        html,
        "<details class=\"samples\"><summary>Samples: {} at step {last_step} ({} logged in all)</summary><table><tr>",
        shown.len(),
        records.len()
    );
    for c in &cols {
        let _ = write!(html, "<th>{}</th>", escape(c));
    }
    html.push_str("</tr>");
    for r in &shown {
        html.push_str("<tr>");
        for c in &cols {
            let (value, is_text) = cell(&r[c]);
            let class = if is_text { " class=\"text\"" } else { "" };
            let _ = write!(html, "<td{class}>{}</td>", escape(&value));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></details>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_steps_samples_are_listed_text_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("samples.jsonl"),
            "{\"step\":0,\"prompt\":\"old\",\"response\":\"x\",\"score\":0.1}\n\
             {\"step\":10,\"kl\":0.5,\"prompt\":\"<hi>\",\"response\":\"there\",\"score\":0.25}\n\
             {\"step\":10,\"kl\":null,\"prompt\":\"p2\",\"response\":\"r2\",\"score\":1}\n\
             {\"step\":10,\"prompt\"\n",
        )
        .unwrap();
        let mut html = String::new();
        section(&mut html, dir.path());
        assert!(
            html.contains("Samples: 2 at step 10 (3 logged in all)"),
            "{html}"
        );
        assert!(html.contains("<th>prompt</th><th>response</th>"), "{html}");
        assert!(
            html.contains("&lt;hi&gt;") && !html.contains(">old<"),
            "{html}"
        );
        assert!(html.contains("<td>0.2500</td>") && html.contains("<td>-</td>"));
        let mut none = String::new();
        section(&mut none, &dir.path().join("missing"));
        assert!(none.is_empty());
    }
}
