//! What the evaluation measures of each policy's replies, as pure functions: win-rate under
//! the reward model, reply length, EOS rate, distinct-n, agreement with the wanted sentiment
//! under the independent judge (overall and per sentiment), and the reward model's
//! correlation with that judge within each sentiment. Each has a hand-computed test.

use std::collections::{HashMap, HashSet};

/// One policy's replies to every prompt (same seeds for every policy).
pub struct Replies {
    pub text: Vec<String>,
    pub tokens: Vec<usize>,
    pub scores: Vec<f64>,
    /// Σ log π − log π_ref over the reply.
    pub kl: Vec<f64>,
    pub eos: Vec<bool>,
    /// Each judge's value of each reply, in the order of the setup's judges.
    pub judges: Vec<Vec<f64>>,
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Share of prompts where `a` scores higher than `b` (ties count half).
pub fn win_rate(a: &[f64], b: &[f64]) -> f64 {
    let wins: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| match x.partial_cmp(y) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .sum();
    wins / a.len().max(1) as f64
}

/// Distinct n-grams over all n-grams of all replies (whitespace words, lowercased): low values
/// mean the policy repeats itself, a classic sign of reward hacking.
pub fn distinct_n(texts: &[String], n: usize) -> f64 {
    let (mut seen, mut total) = (HashSet::new(), 0usize);
    for t in texts {
        let words: Vec<String> = t.split_whitespace().map(str::to_lowercase).collect();
        for w in words.windows(n) {
            seen.insert(w.to_vec());
            total += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        seen.len() as f64 / total as f64
    }
}

/// Whether a judge's value says the wanted sentiment: positive above 0 and at least `band`,
/// negative below 0 and at most −`band`, neutral otherwise (VADER's convention: band 0.05;
/// AFINN and commands: the sign).
pub fn agrees(value: f64, wanted: &str, band: f64) -> bool {
    let positive = value > 0.0 && value >= band;
    let negative = value < 0.0 && value <= -band;
    match wanted {
        "positive" => positive,
        "negative" => negative,
        _ => !positive && !negative,
    }
}

/// Share of labelled prompts (or only those wanting `only`) whose reply the judge agrees with.
pub fn agreement(
    values: &[f64],
    labels: &[Option<String>],
    only: Option<&str>,
    band: f64,
) -> Option<f64> {
    let hits: Vec<bool> = values
        .iter()
        .zip(labels)
        .filter(|(_, l)| only.is_none() || l.as_deref() == only)
        .filter_map(|(c, l)| l.as_ref().map(|l| agrees(*c, l, band)))
        .collect();
    (!hits.is_empty()).then(|| hits.iter().filter(|&&a| a).count() as f64 / hits.len() as f64)
}

/// Does the reward model measure what the independent judge measures? Its scores against the
/// judge's compound signed by the wanted sentiment (+ positive, − negative), within each wanted
/// sentiment: a Bradley–Terry score is only comparable between replies to the same kind of
/// prompt (its level per prompt is free).
pub fn rm_judge_corr(compounds: &[f64], scores: &[f64], labels: &[Option<String>]) -> Option<f64> {
    let points: Vec<(&str, f64, f64)> = compounds
        .iter()
        .zip(scores)
        .zip(labels)
        .filter_map(|((c, &s), l)| {
            let label = l.as_deref()?;
            let sign = match label {
                "positive" => 1.0,
                "negative" => -1.0,
                _ => return None,
            };
            Some((label, s, sign * c))
        })
        .collect();
    within_group_pearson(&points)
}

/// Pearson correlation of (x, y) after centring both within each group: the pooled
/// within-group correlation, blind to differences between the groups' means.
pub fn within_group_pearson(points: &[(&str, f64, f64)]) -> Option<f64> {
    let mut sums: HashMap<&str, (f64, f64, f64)> = HashMap::new();
    for &(g, x, y) in points {
        let e = sums.entry(g).or_default();
        *e = (e.0 + x, e.1 + y, e.2 + 1.0);
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = points
        .iter()
        .map(|&(g, x, y)| {
            let (sx, sy, n) = sums[g];
            (x - sx / n, y - sy / n)
        })
        .unzip();
    pearson(&xs, &ys)
}

/// Pearson correlation of `xs` and `ys`; None with fewer than two points or a constant side.
pub fn pearson(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len() as f64;
    if xs.len() < 2 || xs.len() != ys.len() {
        return None;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Every number of one policy, as (`<policy>/<metric>`, value); `judges` are each judge's
/// name and dead band, in the order of `r.judges`.
pub fn policy_metrics(
    name: &str,
    r: &Replies,
    baseline: Option<&Replies>,
    labels: &[Option<String>],
    judges: &[(&str, f64)],
) -> Vec<(String, f64)> {
    let n = r.text.len().max(1) as f64;
    let scored = !r.scores.is_empty();
    let mut out: Vec<(String, f64)> = vec![
        ("kl".into(), mean(&r.kl)),
        ("len".into(), r.tokens.iter().sum::<usize>() as f64 / n),
        (
            "eos_rate".into(),
            r.eos.iter().filter(|&&e| e).count() as f64 / n,
        ),
        ("distinct_1".into(), distinct_n(&r.text, 1)),
        ("distinct_2".into(), distinct_n(&r.text, 2)),
    ];
    if scored {
        out.push(("score".into(), mean(&r.scores)));
        if let Some(b) = baseline {
            out.push(("win_rate".into(), win_rate(&r.scores, &b.scores)));
        }
    }
    for ((judge, band), values) in judges.iter().zip(&r.judges) {
        out.push((format!("{judge}_mean"), mean(values)));
        let key = format!("{judge}_agreement");
        out.extend(agreement(values, labels, None, *band).map(|a| (key.clone(), a)));
        for label in ["positive", "negative"] {
            let a = agreement(values, labels, Some(label), *band);
            out.extend(a.map(|a| (format!("{key}/{label}"), a)));
        }
        if scored {
            let c = rm_judge_corr(values, &r.scores, labels);
            out.extend(c.map(|c| (format!("rm_{judge}_corr"), c)));
        }
    }
    out.into_iter()
        .map(|(k, v)| (format!("{name}/{k}"), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_matches_hand_computed_values() {
        // x = 1, 2, 3; y = 1, 3, 2: sxy = 1, sxx = syy = 2, r = 0.5.
        let r = pearson(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]).unwrap();
        assert!((r - 0.5).abs() < 1e-12, "{r}");
        assert!((pearson(&[1.0, 2.0], &[4.0, 2.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0], &[1.0]), None);
    }

    #[test]
    fn within_group_pearson_ignores_the_groups_offsets() {
        // Inside each group y rises with x; the groups' means go the other way, so the plain
        // correlation is negative while the within-group one is exactly 1.
        let pts = [
            ("a", 0.0, 10.0),
            ("a", 1.0, 11.0),
            ("b", 10.0, 0.0),
            ("b", 11.0, 1.0),
        ];
        let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().map(|p| (p.1, p.2)).unzip();
        assert!(pearson(&xs, &ys).unwrap() < 0.0);
        assert!((within_group_pearson(&pts).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn distinct_n_win_rate_and_agreement_by_hand() {
        // "a b a" and "a b": unigrams a b a a b → {a, b} = 2 of 5; bigrams ab ba ab → 2 of 3.
        let texts = ["a b a".to_string(), "A b".to_string()];
        assert!((distinct_n(&texts, 1) - 0.4).abs() < 1e-12);
        assert!((distinct_n(&texts, 2) - 2.0 / 3.0).abs() < 1e-12);
        assert!((win_rate(&[1.0, 2.0, 3.0, 0.0], &[0.0, 2.0, 4.0, -1.0]) - 0.625).abs() < 1e-12);
        let labels = [
            Some("positive".to_string()),
            Some("negative".to_string()),
            None,
        ];
        let compounds = [0.3, 0.2, -0.9];
        assert_eq!(agreement(&compounds, &labels, None, 0.05), Some(0.5));
        assert_eq!(
            agreement(&compounds, &labels, Some("negative"), 0.05),
            Some(0.0)
        );
        assert_eq!(agreement(&compounds, &labels, Some("neutral"), 0.05), None);
        // VADER's band against a sign: 0.03 is neutral to VADER, positive to AFINN.
        assert!(!agrees(0.03, "positive", 0.05) && agrees(0.03, "neutral", 0.05));
        assert!(agrees(0.03, "positive", 0.0) && !agrees(0.0, "positive", 0.0));
        assert!(agrees(-0.05, "negative", 0.05) && agrees(0.0, "neutral", 0.0));
    }
}
