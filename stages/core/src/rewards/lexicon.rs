//! An independent sentiment judge for evaluation: VADER's human-rated lexicon (Hutto & Gilbert,
//! 2014) with its main rules — negation within three words (× −0.74), degree boosters (±0.293),
//! "but" shifting weight to the clause after it (× 0.5 before, × 1.5 after) — and its
//! normalisation compound = s / sqrt(s² + 15). It leaves out VADER's capitalisation, punctuation
//! emphasis and idiom rules. Nothing in the pipeline trains on this lexicon.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{CoreError, Result};

const NEGATIONS: [&str; 21] = [
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere", "cannot",
    "without", "isnt", "arent", "wasnt", "werent", "dont", "doesnt", "didnt", "wont", "cant",
    "hardly",
];
const BOOSTERS_UP: [&str; 14] = [
    "very",
    "really",
    "extremely",
    "incredibly",
    "so",
    "totally",
    "absolutely",
    "completely",
    "highly",
    "most",
    "truly",
    "utterly",
    "deeply",
    "especially",
];
const BOOSTERS_DOWN: [&str; 7] = [
    "slightly",
    "somewhat",
    "barely",
    "kind",
    "sort",
    "little",
    "marginally",
];
const BOOST: f64 = 0.293;
const NEGATION_SCALAR: f64 = -0.74;

pub struct SentimentJudge {
    lexicon: HashMap<String, f64>,
}

/// What the judge says of a text, and whether that agrees with a wanted sentiment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// In [−1, 1].
    pub compound: f64,
}

impl Verdict {
    /// VADER's usual thresholds: positive ≥ 0.05, negative ≤ −0.05, neutral between.
    pub fn agrees_with(&self, wanted: &str) -> bool {
        match wanted {
            "positive" => self.compound >= 0.05,
            "negative" => self.compound <= -0.05,
            _ => self.compound.abs() < 0.05,
        }
    }
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| {
        c.is_whitespace() || matches!(c, ',' | '.' | ';' | ':' | '!' | '?' | '"' | '(' | ')')
    })
    .filter(|w| !w.is_empty())
    .map(|w| w.to_lowercase().replace(['\'', '’'], ""))
    .collect()
}

impl SentimentJudge {
    /// Reads `vader_lexicon.txt`: `token<TAB>mean valence<TAB>...` per line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.into(),
            source,
        })?;
        let mut lexicon = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let mut parts = line.split('\t');
            let (Some(word), Some(valence)) = (parts.next(), parts.next()) else {
                continue;
            };
            let v: f64 = valence.trim().parse().map_err(|_| CoreError::Config {
                path: path.into(),
                field: format!("line {}", i + 1),
                message: format!("valence `{valence}` is not a number"),
            })?;
            lexicon.insert(word.to_lowercase(), v);
        }
        if lexicon.is_empty() {
            return Err(CoreError::Config {
                path: path.into(),
                field: "(file)".into(),
                message: "no lexicon entries".into(),
            });
        }
        Ok(Self { lexicon })
    }

    pub fn from_pairs(pairs: &[(&str, f64)]) -> Self {
        Self {
            lexicon: pairs.iter().map(|(w, v)| (w.to_string(), *v)).collect(),
        }
    }

    pub fn judge(&self, text: &str) -> Verdict {
        let ws = words(text);
        let but = ws.iter().position(|w| w == "but");
        let mut sum = 0.0;
        for (i, w) in ws.iter().enumerate() {
            let Some(&base) = self.lexicon.get(w.as_str()) else {
                continue;
            };
            let mut v = base;
            if let Some(prev) = i.checked_sub(1).map(|j| ws[j].as_str()) {
                let boost = if BOOSTERS_UP.contains(&prev) {
                    BOOST
                } else if BOOSTERS_DOWN.contains(&prev) {
                    -BOOST
                } else {
                    0.0
                };
                v += boost * v.signum();
            }
            if ws[i.saturating_sub(3)..i]
                .iter()
                .any(|p| NEGATIONS.contains(&p.as_str()) || p.ends_with("nt"))
            {
                v *= NEGATION_SCALAR;
            }
            if let Some(b) = but {
                v *= if i < b { 0.5 } else { 1.5 };
            }
            sum += v;
        }
        Verdict {
            compound: sum / (sum * sum + 15.0).sqrt(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compound_scores_by_hand() {
        let j = SentimentJudge::from_pairs(&[("good", 1.9), ("bad", -2.5), ("dull", -1.7)]);
        // 1.9 / sqrt(1.9² + 15) = 1.9 / 4.31393 = 0.44043
        assert!((j.judge("A good film.").compound - 0.440_43).abs() < 1e-4);
        // "very good": 1.9 + 0.293 = 2.193 → 2.193 / sqrt(4.8092 + 15) = 0.49279
        assert!((j.judge("very good").compound - 0.492_73).abs() < 1e-4);
        // "not good": 1.9 × −0.74 = −1.406 → −0.34124
        assert!((j.judge("It is not good").compound + 0.341_24).abs() < 1e-4);
        // "good but dull": 0.95 − 2.55 = −1.6 → −1.6 / sqrt(2.56 + 15) = −0.38183
        let v = j.judge("Good, but dull.");
        assert!((v.compound + 0.381_83).abs() < 1e-4);
        assert!(v.agrees_with("negative") && !v.agrees_with("positive"));
        assert!(j.judge("a film").agrees_with("neutral"));
    }
}
