//! AFINN-165 (Finn Årup Nielsen's word list: 3,382 words rated −5…+5), scored as the npm
//! `sentiment` package (5.0.2) scores it: the text lowercased, the characters
//! `. , / # ! ? $ % ^ & * ; : { } = _ \` " ~ ( )` and newlines turned into spaces, runs of
//! whitespace collapsed, split at spaces; every listed word adds its valence, negated when the
//! word before it is a negator (`not`, `don't`, `isn't`, …). `score` is the sum, `comparative`
//! the sum over the token count. A second sentiment judge, built independently of VADER (other
//! words, other ratings, no rules for emphasis or contrast): a policy trained against one can be
//! judged by the other. Checked against the package on real review snippets (tests/parity).

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Result, RewardError};

/// The negators of the `sentiment` package's English scoring strategy.
const NEGATORS: [&str; 12] = [
    "cant", "can't", "dont", "don't", "doesnt", "doesn't", "not", "non", "wont", "won't", "isnt",
    "isn't",
];

/// Characters the package's tokenizer turns into spaces.
const STRIPPED: &str = ".,/#!?$%^&*;:{}=_`\"~()";

pub struct Afinn {
    words: HashMap<String, i32>,
}

/// What AFINN makes of a text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AfinnScore {
    pub score: f64,
    pub comparative: f64,
    pub tokens: usize,
}

impl Afinn {
    /// Reads the list as AFINN distributes it: `word<TAB>valence` per line (a word may hold
    /// spaces: such phrases never match a single token, as in the package).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| RewardError::Io {
            path: path.into(),
            source,
        })?;
        let mut words = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| RewardError::File {
                path: path.into(),
                at: format!("line {}", i + 1),
                message,
            };
            let (word, valence) = line
                .rsplit_once('\t')
                .ok_or_else(|| bad("expected `word<TAB>valence`".into()))?;
            let v: i32 = valence
                .trim()
                .parse()
                .map_err(|_| bad(format!("valence `{valence}` is not a whole number")))?;
            words.insert(word.to_string(), v);
        }
        if words.is_empty() {
            return Err(RewardError::File {
                path: path.into(),
                at: "(file)".into(),
                message: "no AFINN entries".into(),
            });
        }
        Ok(Self { words })
    }

    pub fn from_pairs(pairs: &[(&str, i32)]) -> Self {
        Self {
            words: pairs.iter().map(|(w, v)| (w.to_string(), *v)).collect(),
        }
    }

    pub fn score(&self, text: &str) -> AfinnScore {
        let tokens = tokenize(text);
        let mut score = 0i64;
        for (i, t) in tokens.iter().enumerate() {
            let Some(&v) = self.words.get(t.as_str()) else {
                continue;
            };
            let negated = i > 0 && NEGATORS.contains(&tokens[i - 1].as_str());
            score += i64::from(if negated { -v } else { v });
        }
        let n = tokens.len();
        AfinnScore {
            score: score as f64,
            comparative: if n > 0 { score as f64 / n as f64 } else { 0.0 },
            tokens: n,
        }
    }
}

/// JavaScript's `\s`: what its regular expressions and `trim` treat as white space.
fn js_space(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}'
}

/// The package's tokenizer, step for step.
fn tokenize(text: &str) -> Vec<String> {
    let replaced: String = text
        .to_lowercase()
        .chars()
        .map(|c| match c == '\n' || STRIPPED.contains(c) {
            true => ' ',
            false => c,
        })
        .collect();
    // `replace(/\s\s+/g, ' ')`: a run of two or more white-space characters becomes one
    // space; a single tab stays a tab (and then part of a token, as in the package).
    let mut collapsed = String::with_capacity(replaced.len());
    let chars: Vec<char> = replaced.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if js_space(chars[i]) {
            let mut j = i;
            while j < chars.len() && js_space(chars[j]) {
                j += 1;
            }
            if j - i >= 2 {
                collapsed.push(' ');
            } else {
                collapsed.push(chars[i]);
            }
            i = j;
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    collapsed
        .trim_matches(js_space)
        .split(' ')
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_by_hand_with_negation_and_the_package_tokens() {
        let a = Afinn::from_pairs(&[("good", 3), ("bad", -3), ("love", 3), ("cover-up", -3)]);
        // "not good" flips: −3; "bad" −3; 5 tokens: not good, really bad film → −6 / 5.
        let s = a.score("Not GOOD, really bad film.");
        assert_eq!(s.score, -6.0);
        assert_eq!(s.tokens, 5);
        assert!((s.comparative + 1.2).abs() < 1e-12);
        // Hyphens and apostrophes stay inside words; `don't` negates.
        assert_eq!(a.score("a cover-up I don't love").score, -6.0);
        // Punctuation between words leaves one space; an empty text is one empty token.
        assert_eq!(tokenize("good!!bad"), ["good", "bad"]);
        assert_eq!(tokenize("  "), [""]);
        assert_eq!(a.score("").comparative, 0.0);
        assert_eq!(
            tokenize("good\tbad"),
            ["good\tbad"],
            "a lone tab is not split"
        );
        assert_eq!(tokenize("good \t bad"), ["good", "bad"]);
    }

    #[test]
    fn reads_the_tab_separated_list_and_names_a_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("afinn.txt");
        std::fs::write(&p, "good\t3\ncan't stand\t-3\n").unwrap();
        let a = Afinn::load(&p).unwrap();
        assert_eq!(a.score("good").score, 3.0);
        std::fs::write(&p, "good\t3\nbad -3\n").unwrap();
        let e = Afinn::load(&p).err().unwrap().to_string();
        assert!(
            e.contains("line 2") && e.contains("word<TAB>valence"),
            "{e}"
        );
    }
}
