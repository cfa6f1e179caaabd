//! From each prompt's labelled replies to preference pairs and best-of-n rows, and the
//! statistics that show what the labeller did — as pure functions with hand-computed tests.

use serde::{Deserialize, Serialize};

use crate::config::PairMode;

/// One sampled reply and its label.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Labelled {
    /// The prompt's index in the prompt set, and the reply's among its `num_generations`.
    pub prompt: usize,
    pub sample: usize,
    pub text: String,
    /// Reply tokens, EOS included.
    pub tokens: usize,
    pub eos: bool,
    /// The labeller's weighted sum, and each of its rewards by name.
    pub score: f64,
    pub parts: Vec<(String, f64)>,
}

/// A kept pair: indices into its prompt's group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub chosen: usize,
    pub rejected: usize,
    pub margin: f64,
}

/// Candidate pairs left out, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropped {
    /// Equal scores: no preference.
    pub ties: usize,
    /// A margin above zero but not above `min_margin`.
    pub below_margin: usize,
    /// Different scores for the same text (a labeller that is not a function of the text,
    /// e.g. a sampling `command`): the pair would teach nothing.
    pub same_text: usize,
}

impl Dropped {
    pub fn add(&mut self, other: Dropped) {
        self.ties += other.ties;
        self.below_margin += other.below_margin;
        self.same_text += other.same_text;
    }
}

/// The pairs of one prompt's replies. `best_worst`: the highest score against the lowest
/// (the first of equals, so the choice is reproducible); `all`: every two replies, the
/// higher-scored chosen. A pair is kept when its margin is above `min_margin` and above 0.
pub fn pairs(group: &[Labelled], mode: PairMode, min_margin: f64) -> (Vec<Pair>, Dropped) {
    let candidates: Vec<(usize, usize)> = match mode {
        PairMode::BestWorst => match (best(group, None), worst(group)) {
            (Some(b), Some(w)) => vec![(b, w)],
            _ => vec![],
        },
        PairMode::All => (0..group.len())
            .flat_map(|i| (i + 1..group.len()).map(move |j| (i, j)))
            .map(|(i, j)| match group[i].score >= group[j].score {
                true => (i, j),
                false => (j, i),
            })
            .collect(),
    };
    let mut kept = Vec::new();
    let mut dropped = Dropped::default();
    for (c, r) in candidates {
        let margin = group[c].score - group[r].score;
        if margin <= 0.0 {
            dropped.ties += 1;
        } else if margin <= min_margin {
            dropped.below_margin += 1;
        } else if group[c].text == group[r].text {
            dropped.same_text += 1;
        } else {
            kept.push(Pair {
                chosen: c,
                rejected: r,
                margin,
            });
        }
    }
    (kept, dropped)
}

/// The best reply (the first of equals), if it scores at least `min_score`.
pub fn best(group: &[Labelled], min_score: Option<f64>) -> Option<usize> {
    let mut at: Option<usize> = None;
    for (i, r) in group.iter().enumerate() {
        if at.is_none_or(|b| r.score > group[b].score) {
            at = Some(i);
        }
    }
    at.filter(|&b| min_score.is_none_or(|m| group[b].score >= m))
}

/// The worst reply (the first of equals).
fn worst(group: &[Labelled]) -> Option<usize> {
    let mut at: Option<usize> = None;
    for (i, r) in group.iter().enumerate() {
        if at.is_none_or(|w| r.score < group[w].score) {
            at = Some(i);
        }
    }
    at
}

/// Mean, standard deviation (population) and the 0/10/50/90/100th percentiles (nearest rank
/// on the sorted values) of `values`; None when there are none.
pub fn describe(values: &[f64]) -> Option<Described> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let at = |q: f64| v[((q * (n - 1.0)).round() as usize).min(v.len() - 1)];
    Some(Described {
        mean,
        std: var.sqrt(),
        min: v[0],
        p10: at(0.1),
        p50: at(0.5),
        p90: at(0.9),
        max: v[v.len() - 1],
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Described {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

impl Described {
    /// As metric fields `<prefix>/mean`, `<prefix>/std`, ….
    pub fn fields(&self, prefix: &str) -> Vec<(String, f64)> {
        [
            ("mean", self.mean),
            ("std", self.std),
            ("min", self.min),
            ("p10", self.p10),
            ("p50", self.p50),
            ("p90", self.p90),
            ("max", self.max),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}/{k}"), v))
        .collect()
    }
}

/// Counts of `values` in `bins` equal bins over [min, max] (one bin when all are equal):
/// (the bins' lower edges, counts).
pub fn histogram(values: &[f64], bins: usize) -> (Vec<f64>, Vec<usize>) {
    let Some(d) = describe(values) else {
        return (vec![], vec![]);
    };
    let width = (d.max - d.min) / bins as f64;
    if width <= 0.0 {
        return (vec![d.min], vec![values.len()]);
    }
    let mut counts = vec![0; bins];
    for x in values {
        let i = (((x - d.min) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let edges = (0..bins).map(|i| d.min + i as f64 * width).collect();
    (edges, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(scores: &[f64], texts: &[&str]) -> Vec<Labelled> {
        scores
            .iter()
            .zip(texts)
            .enumerate()
            .map(|(i, (&score, text))| Labelled {
                prompt: 0,
                sample: i,
                text: text.to_string(),
                tokens: text.split_whitespace().count() + 1,
                eos: true,
                score,
                parts: vec![("lexicon".into(), score)],
            })
            .collect()
    }

    #[test]
    fn best_against_worst_takes_the_first_of_equals() {
        let g = group(&[0.2, 0.9, -0.5, 0.9, -0.5], &["a", "b", "c", "d", "e"]);
        let (kept, dropped) = pairs(&g, PairMode::BestWorst, 0.0);
        assert_eq!(
            kept,
            [Pair {
                chosen: 1,
                rejected: 2,
                margin: 1.4
            }]
        );
        assert_eq!(dropped, Dropped::default());
        // A margin of 1.4 is not above 1.4.
        let (kept, dropped) = pairs(&g, PairMode::BestWorst, 1.4);
        assert!(kept.is_empty());
        assert_eq!(dropped.below_margin, 1);
    }

    #[test]
    fn an_all_equal_group_gives_no_pair_and_counts_ties() {
        let g = group(&[0.3, 0.3, 0.3], &["a", "b", "c"]);
        let (kept, dropped) = pairs(&g, PairMode::BestWorst, 0.0);
        assert!(kept.is_empty());
        assert_eq!(dropped.ties, 1);
        let (kept, dropped) = pairs(&g, PairMode::All, 0.0);
        assert!(kept.is_empty());
        assert_eq!(dropped.ties, 3, "three pairs of three replies, all tied");
        assert_eq!(best(&g, None), Some(0));
        assert_eq!(best(&g, Some(0.31)), None);
        assert_eq!(best(&g, Some(0.3)), Some(0));
    }

    #[test]
    fn all_pairs_orient_by_score_and_drop_by_margin_tie_and_text() {
        // Scores 1, 3, 3, 0.5 with texts x, y, y, z: pairs (0,1) m2, (0,2) m2, (0,3) m0.5,
        // (1,2) tie, (1,3) m2.5, (2,3) m2.5. min_margin 0.5 drops (0,3); (1,2) is a tie.
        let g = group(&[1.0, 3.0, 3.0, 0.5], &["x", "y", "y", "z"]);
        let (kept, dropped) = pairs(&g, PairMode::All, 0.5);
        let got: Vec<(usize, usize, f64)> = kept
            .iter()
            .map(|p| (p.chosen, p.rejected, p.margin))
            .collect();
        assert_eq!(got, [(1, 0, 2.0), (2, 0, 2.0), (1, 3, 2.5), (2, 3, 2.5)]);
        assert_eq!(
            dropped,
            Dropped {
                ties: 1,
                below_margin: 1,
                same_text: 0
            }
        );
        // The same text scored twice differently (a noisy labeller) makes no pair.
        let g = group(&[1.0, 2.0], &["same", "same"]);
        let (kept, dropped) = pairs(&g, PairMode::All, 0.0);
        assert!(kept.is_empty());
        assert_eq!(dropped.same_text, 1);
    }

    #[test]
    fn statistics_by_hand() {
        // 1..=10: mean 5.5, population variance 8.25; nearest ranks 0.9 → 1, 4.5 → 5 (index
        // 4.5 rounds to 5: value 6), 8.1 → 8 (value 9).
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let d = describe(&v).unwrap();
        assert_eq!((d.mean, d.min, d.max), (5.5, 1.0, 10.0));
        assert!((d.std - 8.25f64.sqrt()).abs() < 1e-12);
        assert_eq!((d.p10, d.p50, d.p90), (2.0, 6.0, 9.0));
        assert_eq!(describe(&[]), None);
        let (edges, counts) = histogram(&[0.0, 0.1, 0.5, 0.9, 1.0], 2);
        assert_eq!(edges, [0.0, 0.5]);
        assert_eq!(counts, [2, 3], "the max falls in the last bin");
        assert_eq!(histogram(&[2.0, 2.0], 4), (vec![2.0], vec![2]));
    }
}
