//! Which line of a YAML file holds which key, so an error can name the line a user wrote.
//!
//! A small scanner for the block style people write and serde_yaml emits: `key: value` lines
//! nested by indentation, `- ` list items, and one-line flow mappings (`optim: {lr: 1e-3}`),
//! whose keys all sit on their line. It reads no values and never fails; a key it cannot place
//! falls back to the line of its nearest placed ancestor.

/// (1-based line, key path) for every mapping key in `text`, in file order.
pub fn key_lines(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    // (indent of the key, key) for the block keys enclosing the current line.
    let mut stack: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
            continue;
        }
        let mut indent = raw.len() - trimmed.len();
        let mut content = trimmed;
        // A list item: its content is nested one level deeper than the dash.
        while let Some(rest) = content.strip_prefix("- ") {
            indent += 2;
            content = rest.trim_start();
        }
        let Some((key, value)) = split_key(content) else {
            continue;
        };
        while stack.last().is_some_and(|(ind, _)| *ind >= indent) {
            stack.pop();
        }
        let mut path: Vec<String> = stack.iter().map(|(_, k)| k.clone()).collect();
        path.push(key.clone());
        out.push((line_no, path.clone()));
        let value = value.trim();
        if value.starts_with('{') {
            for sub in flow_keys(value) {
                let mut p = path.clone();
                p.extend(sub);
                out.push((line_no, p));
            }
        }
        stack.push((indent, key));
    }
    out
}

/// The line of `path`, or of its longest prefix that has one.
pub fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let lines = key_lines(text);
    (1..=path.len()).rev().find_map(|n| {
        lines
            .iter()
            .find(|(_, p)| p.len() == n && p.iter().zip(&path[..n]).all(|(a, b)| a == b))
            .map(|(l, _)| *l)
    })
}

/// The line of exactly `path`, if the file declares it.
pub fn exact_line(text: &str, path: &[&str]) -> Option<usize> {
    key_lines(text)
        .into_iter()
        .find(|(_, p)| p.len() == path.len() && p.iter().zip(path).all(|(a, b)| a == b))
        .map(|(l, _)| l)
}

/// The key path declared at `line`: the one ending in `key` when given and present there,
/// else the deepest.
pub fn path_at(text: &str, line: usize, key: Option<&str>) -> Option<Vec<String>> {
    let on_line: Vec<Vec<String>> = key_lines(text)
        .into_iter()
        .filter(|(l, _)| *l == line)
        .map(|(_, p)| p)
        .collect();
    on_line
        .iter()
        .find(|p| key.is_some_and(|k| p.last().is_some_and(|l| l == k)))
        .or_else(|| on_line.iter().max_by_key(|p| p.len()))
        .cloned()
}

/// Where the mapping that starts at `line` declares `key` for the second time (the parser
/// reports a duplicate key at the mapping's start): that line and the key's path. The mapping
/// is the deepest one around `line`'s keys in which `key` appears twice from `line` on.
pub fn duplicate_at(text: &str, line: usize, key: &str) -> Option<(usize, Vec<String>)> {
    let lines = key_lines(text);
    let start = lines
        .iter()
        .filter(|(l, _)| *l == line)
        .map(|(_, p)| p)
        .max_by_key(|p| p.len())?;
    (0..start.len()).rev().find_map(|n| {
        let parent = &start[..n];
        let mut hits = lines
            .iter()
            .filter(|(l, p)| *l >= line && p.len() == n + 1 && p[..n] == *parent && p[n] == key);
        hits.next()?;
        hits.next().cloned()
    })
}

/// `key: rest` → (key, rest), with quotes around the key removed; None for a line that is not
/// a mapping entry (a plain list item, a continuation line).
fn split_key(content: &str) -> Option<(String, &str)> {
    let (key, rest) = if let Some(q) = content.strip_prefix('"') {
        let end = q.find('"')?;
        (&q[..end], q[end + 1..].strip_prefix(':')?)
    } else if let Some(q) = content.strip_prefix('\'') {
        let end = q.find('\'')?;
        (&q[..end], q[end + 1..].strip_prefix(':')?)
    } else {
        let pos = content
            .char_indices()
            .find(|&(i, c)| {
                c == ':'
                    && content[i + 1..]
                        .chars()
                        .next()
                        .is_none_or(char::is_whitespace)
            })
            .map(|(i, _)| i)?;
        let key = &content[..pos];
        if key.is_empty() || key.contains(['{', '[', '"', '\'', '#']) {
            return None;
        }
        (key, &content[pos + 1..])
    };
    Some((key.trim().to_string(), rest))
}

/// Key paths inside a one-line flow mapping `{a: 1, b: {c: 2}}`, relative to it.
fn flow_keys(value: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut path: Vec<String> = Vec::new();
    // For each open bracket: whether it is a mapping, and whether it added a key to `path`.
    let mut frames: Vec<(bool, bool)> = Vec::new();
    let mut token = String::new();
    let mut quote: Option<char> = None;
    let mut pending_key: Option<String> = None;
    for c in value.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else {
                token.push(c);
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '{' | '[' => {
                let keyed = pending_key.take().is_some_and(|k| {
                    path.push(k);
                    true
                });
                frames.push((c == '{', keyed));
                token.clear();
            }
            '}' | ']' => {
                if let Some((_, keyed)) = frames.pop() {
                    if keyed {
                        path.pop();
                    }
                }
                token.clear();
                pending_key = None;
            }
            ':' if frames.last().is_some_and(|f| f.0) => {
                let key = token.trim().to_string();
                if !key.is_empty() {
                    let mut p = path.clone();
                    p.push(key.clone());
                    out.push(p);
                    pending_key = Some(key);
                }
                token.clear();
            }
            ',' => {
                token.clear();
                pending_key = None;
            }
            c if c.is_whitespace() && token.is_empty() => {}
            c => {
                if pending_key.is_some() && !c.is_whitespace() {
                    pending_key = None;
                }
                token.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
name: demo   # a comment
stages:
  sft:
    uses: sft
    with:
      init: ${pretrain.checkpoint}
      optim: {lr: 3.0e-4, sched: {kind: cosine}}
      eval_data:
        general: {files: [a.parquet], split: all}
      rewards:
        - kind: exact_match
          weight: 1.0
  \"ppo\":
    uses: ppo
";

    #[test]
    fn finds_block_flow_and_list_keys() {
        assert_eq!(line_of(DOC, &["name"]), Some(1));
        assert_eq!(line_of(DOC, &["stages", "sft", "with", "init"]), Some(6));
        assert_eq!(
            line_of(DOC, &["stages", "sft", "with", "optim", "lr"]),
            Some(7)
        );
        assert_eq!(
            line_of(DOC, &["stages", "sft", "with", "optim", "sched", "kind"]),
            Some(7)
        );
        assert_eq!(
            line_of(
                DOC,
                &["stages", "sft", "with", "eval_data", "general", "split"]
            ),
            Some(9)
        );
        assert_eq!(
            line_of(DOC, &["stages", "sft", "with", "rewards", "weight"]),
            Some(12)
        );
        assert_eq!(line_of(DOC, &["stages", "ppo", "uses"]), Some(14));
    }

    #[test]
    fn a_duplicate_key_is_found_where_it_is_given_the_second_time() {
        let doc = "policy: p\nseed: 1\noptim:\n  lr: 1\n  lr: 2\nseed: 3\n";
        assert_eq!(
            duplicate_at(doc, 1, "seed"),
            Some((6, vec!["seed".to_string()]))
        );
        let nested = Some((5, vec!["optim".to_string(), "lr".to_string()]));
        assert_eq!(duplicate_at(doc, 4, "lr"), nested);
        let flow = "optim: {lr: 1, lr: 2}\n";
        assert_eq!(
            duplicate_at(flow, 1, "lr"),
            Some((1, vec!["optim".to_string(), "lr".to_string()]))
        );
        assert_eq!(duplicate_at(doc, 1, "absent"), None);
    }

    #[test]
    fn an_unknown_key_falls_back_to_its_nearest_ancestor() {
        assert_eq!(line_of(DOC, &["stages", "sft", "with", "nope"]), Some(5));
        assert_eq!(line_of(DOC, &["elsewhere"]), None);
        assert_eq!(
            path_at(DOC, 7, None).unwrap(),
            ["stages", "sft", "with", "optim", "sched", "kind"]
        );
        assert_eq!(
            path_at(DOC, 7, Some("lr")).unwrap(),
            ["stages", "sft", "with", "optim", "lr"]
        );
    }
}
