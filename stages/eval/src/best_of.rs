//! Best-of-n, the rejection-sampling baseline every RL result should be read against: the
//! reference policy answers each prompt n times, a labeller (the one the trained policies
//! learned from, typically) picks each prompt's best reply, and the row is reported beside the
//! policies with the same judges. Its first draw uses the seeds every policy uses, so with the
//! baseline as reference each prompt's best-of reply is at least as good under the labeller as
//! the baseline's. Its KL to the reference is not measured per reply but known in closed form:
//! log n − (n − 1)/n nats (Stiennon et al. 2020; Gao et al. 2022), exact for a reply
//! distribution without ties and an upper bound otherwise (Beirami et al. 2024).

use serde::{Deserialize, Serialize};
use temper_core::reward_set::RewardSet;
use temper_rewards::{check_rewards, RewardSpec};
use temper_stage::{ConfigFile, Inputs, StageError};

use crate::config::Config;
use crate::measures::Replies;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestOfEval {
    /// Replies sampled per prompt.
    pub n: usize,
    /// What picks the best: a list of rewards as the label stage's `labeller:` (lexicon,
    /// afinn, regex, length, command, model), summed with their weights.
    pub labeller: Vec<RewardSpec>,
    /// The row's name; `best_of_<n>` when not given.
    #[serde(default)]
    pub name: Option<String>,
}

impl BestOfEval {
    pub fn row_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("best_of_{}", self.n))
    }

    /// KL(best-of-n ‖ reference) in nats per reply: log n − (n − 1)/n.
    pub fn analytic_kl(&self) -> f64 {
        let n = self.n as f64;
        n.ln() - (n - 1.0) / n
    }
}

/// Range checks, the row's name against the policies', and the labeller's inputs.
pub fn check(cfg: &ConfigFile<Config>, inputs: &mut Inputs) -> Result<(), StageError> {
    let Some(b) = &cfg.value.best_of else {
        return Ok(());
    };
    cfg.ensure(
        b.n >= 2,
        "best_of.n",
        "must be at least 2 (best of one is the reference itself)",
    )?;
    cfg.ensure(
        !b.labeller.is_empty(),
        "best_of.labeller",
        "list at least one reward",
    )?;
    cfg.ensure(
        !cfg.value.policies.contains_key(&b.row_name()),
        "best_of.name",
        format!(
            "`{}` is also a policy's name: give the best-of row another `name`",
            b.row_name()
        ),
    )?;
    check_rewards(cfg, inputs, "best_of.labeller", &b.labeller, None)
}

/// One draw of the reference's replies with the labeller's totals.
pub struct Draw {
    pub replies: Replies,
    pub labels: Vec<f64>,
}

/// Each prompt's best reply over the draws (the first draw wins ties), as a policy's replies
/// with the analytic KL, and the labeller's mean over the chosen replies.
pub fn select(b: &BestOfEval, draws: &[Draw]) -> (Replies, f64) {
    let prompts = draws[0].labels.len();
    let judges = draws[0].replies.judges.len();
    let scored = !draws[0].replies.scores.is_empty();
    let mut out = Replies {
        text: Vec::with_capacity(prompts),
        tokens: Vec::with_capacity(prompts),
        scores: Vec::new(),
        kl: vec![b.analytic_kl(); prompts],
        eos: Vec::with_capacity(prompts),
        judges: vec![Vec::with_capacity(prompts); judges],
    };
    let mut label_sum = 0.0;
    for i in 0..prompts {
        let mut best = 0;
        for (k, d) in draws.iter().enumerate().skip(1) {
            if d.labels[i] > draws[best].labels[i] {
                best = k;
            }
        }
        let r = &draws[best].replies;
        out.text.push(r.text[i].clone());
        out.tokens.push(r.tokens[i]);
        out.eos.push(r.eos[i]);
        if scored {
            out.scores.push(r.scores[i]);
        }
        for (j, values) in out.judges.iter_mut().enumerate() {
            values.push(r.judges[j][i]);
        }
        label_sum += draws[best].labels[i];
    }
    (out, label_sum / prompts.max(1) as f64)
}

/// The labeller, loaded beside the reference (a model labeller must share its tokenizer).
pub fn load_labeller(
    cfg: &ConfigFile<Config>,
    reference: &temper_core::Loaded,
) -> Result<Option<RewardSet>, StageError> {
    let Some(b) = &cfg.value.best_of else {
        return Ok(None);
    };
    let device = reference.model.device();
    RewardSet::load(cfg, "best_of.labeller", &b.labeller, reference, device).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(labels: &[f64], text: &[&str]) -> Draw {
        Draw {
            replies: Replies {
                text: text.iter().map(|t| t.to_string()).collect(),
                tokens: text.iter().map(|t| t.len()).collect(),
                scores: labels.iter().map(|x| 10.0 * x).collect(),
                kl: vec![0.5; labels.len()],
                eos: vec![true; labels.len()],
                judges: vec![labels.iter().map(|x| -x).collect()],
            },
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn picks_each_prompts_best_draw_and_the_first_on_ties() {
        let b = BestOfEval {
            n: 3,
            labeller: vec![],
            name: None,
        };
        let draws = [
            draw(&[0.1, 0.5, 0.2], &["a0", "b0", "c0"]),
            draw(&[0.3, 0.5, 0.1], &["a1", "b1", "c1"]),
            draw(&[0.2, 0.4, 0.2], &["a2", "b2", "c2"]),
        ];
        let (r, label_mean) = select(&b, &draws);
        assert_eq!(r.text, ["a1", "b0", "c0"]);
        assert_eq!(r.scores, [3.0, 5.0, 2.0]);
        assert_eq!(r.judges, [vec![-0.3, -0.5, -0.2]]);
        assert!((label_mean - 1.0 / 3.0).abs() < 1e-12);
        // log 3 − 2/3, every reply.
        assert!(r
            .kl
            .iter()
            .all(|&k| (k - (3f64.ln() - 2.0 / 3.0)).abs() < 1e-15));
        assert_eq!(b.row_name(), "best_of_3");
    }

    #[test]
    fn analytic_kl_by_hand() {
        let kl = |n| {
            BestOfEval {
                n,
                labeller: vec![],
                name: None,
            }
            .analytic_kl()
        };
        // n = 2: ln 2 − 1/2 = 0.19315; n = 4: ln 4 − 3/4 = 0.63629; n = 16: 1.83509.
        assert!((kl(2) - 0.193_147_180_559_945_3).abs() < 1e-15);
        assert!((kl(4) - 0.636_294_361_119_890_6).abs() < 1e-15);
        assert!((kl(16) - 1.835_088_722_239_781).abs() < 1e-12);
    }
}
