//! An independent sentiment judge for evaluation: VADER (Hutto & Gilbert, 2014), ported from
//! `vaderSentiment` 3.3.2's `SentimentIntensityAnalyzer.polarity_scores` rule for rule — the
//! human-rated lexicon, negation (× −0.74, also by "no", "least" and "n't"), degree boosters
//! and dampeners with distance decay, ALL-CAPS emphasis, "never so/this", "without doubt",
//! the special-case idioms, "but" (× 0.5 before, × 1.5 after, with the original's
//! first-equal-value indexing kept), "!" and "?" amplification, and compound = s / √(s² + 15).
//! Only the compound score is computed, and emoji are not replaced by their descriptions (the
//! package's emoji lexicon is not shipped with the demo data). tests/parity/ checks it
//! against the package itself on real snippets. Nothing in the pipeline trains on this lexicon.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Result, RewardError};

const B_INCR: f64 = 0.293;
const B_DECR: f64 = -0.293;
const C_INCR: f64 = 0.733;
const N_SCALAR: f64 = -0.74;

const NEGATE: [&str; 59] = [
    "aint",
    "arent",
    "cannot",
    "cant",
    "couldnt",
    "darent",
    "didnt",
    "doesnt",
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "dont",
    "hadnt",
    "hasnt",
    "havent",
    "isnt",
    "mightnt",
    "mustnt",
    "neither",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "neednt",
    "needn't",
    "never",
    "none",
    "nope",
    "nor",
    "not",
    "nothing",
    "nowhere",
    "oughtnt",
    "shant",
    "shouldnt",
    "uhuh",
    "wasnt",
    "werent",
    "oughtn't",
    "shan't",
    "shouldn't",
    "uh-uh",
    "wasn't",
    "weren't",
    "without",
    "wont",
    "wouldnt",
    "won't",
    "wouldn't",
    "rarely",
    "seldom",
    "despite",
];

const BOOST_UP: [&str; 60] = [
    "absolutely",
    "amazingly",
    "awfully",
    "completely",
    "considerable",
    "considerably",
    "decidedly",
    "deeply",
    "effing",
    "enormous",
    "enormously",
    "entirely",
    "especially",
    "exceptional",
    "exceptionally",
    "extreme",
    "extremely",
    "fabulously",
    "flipping",
    "flippin",
    "frackin",
    "fracking",
    "fricking",
    "frickin",
    "frigging",
    "friggin",
    "fully",
    "fuckin",
    "fucking",
    "fuggin",
    "fugging",
    "greatly",
    "hella",
    "highly",
    "hugely",
    "incredible",
    "incredibly",
    "intensely",
    "major",
    "majorly",
    "more",
    "most",
    "particularly",
    "purely",
    "quite",
    "really",
    "remarkably",
    "so",
    "substantially",
    "thoroughly",
    "total",
    "totally",
    "tremendous",
    "tremendously",
    "uber",
    "unbelievably",
    "unusually",
    "utter",
    "utterly",
    "very",
];

const BOOST_DOWN: [&str; 24] = [
    "almost",
    "barely",
    "hardly",
    "just enough",
    "kind of",
    "kinda",
    "kindof",
    "kind-of",
    "less",
    "little",
    "marginal",
    "marginally",
    "occasional",
    "occasionally",
    "partly",
    "scarce",
    "scarcely",
    "slight",
    "slightly",
    "somewhat",
    "sort of",
    "sorta",
    "sortof",
    "sort-of",
];

const SPECIAL_CASES: [(&str, f64); 9] = [
    ("the shit", 3.0),
    ("the bomb", 3.0),
    ("bad ass", 1.5),
    ("badass", 1.5),
    ("bus stop", 0.0),
    ("yeah right", -2.0),
    ("kiss of death", -1.5),
    ("to die for", 3.0),
    ("beating heart", 3.5),
];

/// VADER's ASCII punctuation (Python's `string.punctuation`).
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn booster(word_lower: &str) -> Option<f64> {
    if BOOST_UP.contains(&word_lower) {
        Some(B_INCR)
    } else if BOOST_DOWN.contains(&word_lower) {
        Some(B_DECR)
    } else {
        None
    }
}

fn special_case(phrase: &str) -> Option<f64> {
    SPECIAL_CASES
        .iter()
        .find(|(p, _)| *p == phrase)
        .map(|(_, v)| *v)
}

/// Python's `str.isupper()`: at least one cased character, and no lowercase one.
fn is_upper(word: &str) -> bool {
    word.chars().any(char::is_uppercase) && !word.chars().any(char::is_lowercase)
}

/// VADER's `negated([word])`: a negation word, or any word containing "n't".
fn negated(word_lower: &str) -> bool {
    NEGATE.contains(&word_lower) || word_lower.contains("n't")
}

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

/// Words and emoticons: split on whitespace, punctuation stripped from both ends unless that
/// leaves two characters or fewer (then it was likely an emoticon and stays whole).
fn tokens(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            let stripped = w.trim_matches(|c: char| PUNCTUATION.contains(c));
            if stripped.chars().count() <= 2 {
                w.to_string()
            } else {
                stripped.to_string()
            }
        })
        .collect()
}

struct Sentence {
    words: Vec<String>,
    lower: Vec<String>,
    cap_diff: bool,
}

impl SentimentJudge {
    /// Reads `vader_lexicon.txt`: `token<TAB>mean valence<TAB>...` per line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| RewardError::Io {
            path: path.into(),
            source,
        })?;
        let mut lexicon = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let mut parts = line.trim().split('\t');
            let (Some(word), Some(valence)) = (parts.next(), parts.next()) else {
                continue;
            };
            let v: f64 = valence.trim().parse().map_err(|_| RewardError::File {
                path: path.into(),
                at: format!("line {}", i + 1),
                message: format!("valence `{valence}` is not a number"),
            })?;
            lexicon.insert(word.to_string(), v);
        }
        if lexicon.is_empty() {
            return Err(RewardError::File {
                path: path.into(),
                at: "(file)".into(),
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

    fn known(&self, word_lower: &str) -> bool {
        self.lexicon.contains_key(word_lower)
    }

    /// The compound score of `text`.
    pub fn judge(&self, text: &str) -> Verdict {
        let words = tokens(text.trim());
        let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
        let caps = words.iter().filter(|w| is_upper(w)).count();
        let s = Sentence {
            cap_diff: caps > 0 && caps < words.len(),
            words,
            lower,
        };
        let mut sentiments = Vec::with_capacity(s.words.len());
        for i in 0..s.words.len() {
            let skip = booster(&s.lower[i]).is_some()
                || (s.lower[i] == "kind" && s.lower.get(i + 1).is_some_and(|n| n == "of"));
            sentiments.push(if skip { 0.0 } else { self.valence(&s, i) });
        }
        but_check(&s.lower, &mut sentiments);
        if sentiments.is_empty() {
            return Verdict { compound: 0.0 };
        }
        let mut sum: f64 = sentiments.iter().sum();
        let emphasis = punctuation_emphasis(text);
        if sum > 0.0 {
            sum += emphasis;
        } else if sum < 0.0 {
            sum -= emphasis;
        }
        Verdict {
            compound: (sum / (sum * sum + 15.0).sqrt()).clamp(-1.0, 1.0),
        }
    }

    /// The valence of word `i` with every rule that reads its neighbours.
    fn valence(&self, s: &Sentence, i: usize) -> f64 {
        let (w, l) = (&s.words, &s.lower);
        let Some(&base) = self.lexicon.get(&l[i]) else {
            return 0.0;
        };
        let mut v = base;
        if l[i] == "no" && i + 1 < w.len() && self.known(&l[i + 1]) {
            v = 0.0; // "no" negates the next lexicon word instead of counting itself
        }
        if (i > 0 && l[i - 1] == "no")
            || (i > 1 && l[i - 2] == "no")
            || (i > 2 && l[i - 3] == "no" && matches!(l[i - 1].as_str(), "or" | "nor"))
        {
            v = base * N_SCALAR;
        }
        if is_upper(&w[i]) && s.cap_diff {
            v += if v > 0.0 { C_INCR } else { -C_INCR };
        }
        for start in 0..3 {
            if i > start && !self.known(&l[i - (start + 1)]) {
                let mut scalar = scalar_inc_dec(&w[i - (start + 1)], v, s.cap_diff);
                if start == 1 {
                    scalar *= 0.95;
                } else if start == 2 {
                    scalar *= 0.9;
                }
                v += scalar;
                v = negation_check(v, l, start, i);
                if start == 2 {
                    v = special_idioms_check(v, l, i);
                }
            }
        }
        least_check(v, l, i, |x| self.known(x))
    }
}

fn scalar_inc_dec(word: &str, valence: f64, cap_diff: bool) -> f64 {
    let Some(mut scalar) = booster(&word.to_lowercase()) else {
        return 0.0;
    };
    if valence < 0.0 {
        scalar = -scalar;
    }
    if is_upper(word) && cap_diff {
        scalar += if valence > 0.0 { C_INCR } else { -C_INCR };
    }
    scalar
}

fn negation_check(v: f64, l: &[String], start: usize, i: usize) -> f64 {
    let at = |k: usize| l[i - k].as_str();
    match start {
        0 if negated(at(1)) => v * N_SCALAR,
        1 if at(2) == "never" && matches!(at(1), "so" | "this") => v * 1.25,
        1 if at(2) == "without" && at(1) == "doubt" => v,
        1 if negated(at(2)) => v * N_SCALAR,
        2 if (at(3) == "never" && matches!(at(2), "so" | "this"))
            || matches!(at(1), "so" | "this") =>
        {
            v * 1.25
        }
        2 if at(3) == "without" && (at(2) == "doubt" || at(1) == "doubt") => v,
        2 if negated(at(3)) => v * N_SCALAR,
        _ => v,
    }
}

fn special_idioms_check(mut v: f64, l: &[String], i: usize) -> f64 {
    let (w3, w2, w1, w0) = (&l[i - 3], &l[i - 2], &l[i - 1], &l[i]);
    let sequences = [
        format!("{w1} {w0}"),
        format!("{w2} {w1} {w0}"),
        format!("{w2} {w1}"),
        format!("{w3} {w2} {w1}"),
        format!("{w3} {w2}"),
    ];
    if let Some(x) = sequences.iter().find_map(|s| special_case(s)) {
        v = x;
    }
    if i + 1 < l.len() {
        if let Some(x) = special_case(&format!("{w0} {}", l[i + 1])) {
            v = x;
        }
    }
    if i + 2 < l.len() {
        if let Some(x) = special_case(&format!("{w0} {} {}", l[i + 1], l[i + 2])) {
            v = x;
        }
    }
    for n_gram in [&sequences[3], &sequences[4], &sequences[2]] {
        if let Some(b) = booster(n_gram) {
            v += b;
        }
    }
    v
}

fn least_check(v: f64, l: &[String], i: usize, known: impl Fn(&str) -> bool) -> f64 {
    if i > 1 && !known(&l[i - 1]) && l[i - 1] == "least" {
        if l[i - 2] != "at" && l[i - 2] != "very" {
            return v * N_SCALAR;
        }
    } else if i > 0 && !known(&l[i - 1]) && l[i - 1] == "least" {
        return v * N_SCALAR;
    }
    v
}

/// "but": sentiments before it count half, after it one and a half. Kept as the original
/// computes it: each value is looked up by `list.index(value)`, its first equal occurrence.
fn but_check(lower: &[String], sentiments: &mut [f64]) {
    let Some(bi) = lower.iter().position(|w| w == "but") else {
        return;
    };
    for pos in 0..sentiments.len() {
        let value = sentiments[pos];
        let si = sentiments
            .iter()
            .position(|&x| x == value)
            .expect("the value is in the list");
        if si < bi {
            sentiments[si] = value * 0.5;
        } else if si > bi {
            sentiments[si] = value * 1.5;
        }
    }
}

/// Up to four "!" add 0.292 each; two or three "?" add 0.18 each, more add 0.96.
fn punctuation_emphasis(text: &str) -> f64 {
    let ep = text.matches('!').count().min(4) as f64 * 0.292;
    let qm = match text.matches('?').count() {
        0 | 1 => 0.0,
        n @ 2..=3 => n as f64 * 0.18,
        _ => 0.96,
    };
    ep + qm
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
        // "GOOD film" among lowercase words: 1.9 + 0.733 caps emphasis = 2.633 → 0.56216;
        // "good!!": 1.9 + 2 × 0.292 = 2.484 → 0.53981.
        assert!((j.judge("a GOOD film").compound - 0.562_16).abs() < 1e-4);
        assert!((j.judge("good!!").compound - 0.539_81).abs() < 1e-4);
    }
}
