//! `temper-data prepare-arith`: the arithmetic demo's data, generated (nothing downloaded).
//!
//! Every problem `a+b` and `a-b` (a ≥ b, so answers are non-negative) with operands up to
//! `max_operand` is assigned by a seeded hash of its text to one of three disjoint sets:
//! 10 % held out (evaluation), 45 % for pretraining and SFT, 45 % for RL prompts. Files:
//!
//! - corpus.parquet        `text`: documents of 16 equations (`12+34=46`), one per line, from
//!   every problem that is not held out (RL prompts included: RL sharpens what the model has
//!   seen; held-out problems measure it)
//! - sft_train/_eval       `messages`: "What is 12+34?" → "46"; `answer`
//!
//! With `worked` the corpus lines and SFT replies show the column-by-column working before the
//! answer (`12+34: 2+4+0=6, 1+3+0=4, answer 46`; a borrow writes the borrowed ten:
//! `52-18: 12-8-0=4, 5-1-1=3, answer 34`). Every step is a one-digit fact with a carry, all
//! of which pretraining sees many times, so a model can apply to unseen problems what it cannot
//! learn from whole answers of this many problems (the `answer` field stays the bare number; the
//! exact-match reward takes the reply's last number).
//! - rl_prompts.parquet    `prompt`, `answer`: problems the policy never saw solved
//! - eval_prompts.parquet  `prompt`, `answer`: the held-out problems

use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use temper_data::write::{write_parquet, Column};
use temper_data::{seed_for, shuffled, Message, Role};

#[derive(Debug, Default, Serialize)]
pub struct ArithCounts {
    pub problems: usize,
    pub corpus_documents: usize,
    pub sft_train: usize,
    pub sft_eval: usize,
    pub rl_prompts: usize,
    pub eval_prompts: usize,
}

/// `a+b`, or `a-b` when `add` is false.
struct Problem {
    a: i64,
    b: i64,
    add: bool,
}

fn problems(max: i64) -> Vec<Problem> {
    let mut out = Vec::new();
    for a in 0..=max {
        for b in 0..=max {
            out.push(Problem { a, b, add: true });
            if a >= b {
                out.push(Problem { a, b, add: false });
            }
        }
    }
    out
}

/// Which set a problem belongs to: 0 held out, 1 pretraining/SFT, 2 RL.
fn set_of(seed: u64, text: &str) -> u8 {
    let h = blake3::hash(format!("{seed}:{text}").as_bytes());
    match u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) % 100 {
        0..10 => 0,
        10..55 => 1,
        _ => 2,
    }
}

fn question(p: &Problem) -> String {
    format!("What is {}?", p.text())
}

/// The working for `a+b` or `a-b`, units column first, each step `x+y+carry=sum` or
/// `x-y-borrow=difference` (x written with its borrowed ten, `12-8-0=4`), then the answer.
fn worked(a: i64, b: i64, add: bool) -> String {
    let digits = |n: i64| -> Vec<i64> {
        n.to_string()
            .bytes()
            .rev()
            .map(|d| i64::from(d - b'0'))
            .collect()
    };
    let (da, db) = (digits(a), digits(b));
    let columns = da.len().max(db.len());
    let mut steps = Vec::with_capacity(columns + 1);
    let mut carry = 0;
    for i in 0..columns {
        let x = da.get(i).copied().unwrap_or(0);
        let y = db.get(i).copied().unwrap_or(0);
        if add {
            let s = x + y + carry;
            steps.push(format!("{x}+{y}+{carry}={s}"));
            carry = s / 10;
        } else {
            let borrow = i64::from(x - carry < y);
            let top = x + 10 * borrow;
            steps.push(format!("{top}-{y}-{carry}={}", top - y - carry));
            carry = borrow;
        }
    }
    let answer = if add { a + b } else { a - b };
    steps.push(format!("answer {answer}"));
    steps.join(", ")
}

impl Problem {
    /// `47+38`: the problem's text, also the key its set is hashed from.
    fn text(&self) -> String {
        let op = if self.add { '+' } else { '-' };
        format!("{}{op}{}", self.a, self.b)
    }

    fn answer(&self) -> i64 {
        if self.add {
            self.a + self.b
        } else {
            self.a - self.b
        }
    }

    /// The reply SFT teaches and the corpus line's right-hand side.
    fn solution(&self, show_work: bool) -> String {
        match show_work {
            true => worked(self.a, self.b, self.add),
            false => self.answer().to_string(),
        }
    }

    fn corpus_line(&self, show_work: bool) -> String {
        if show_work {
            format!("{}: {}", self.text(), self.solution(true))
        } else {
            format!("{}={}", self.text(), self.answer())
        }
    }
}

fn write_sft(path: &Path, rows: &[&Problem], show_work: bool) -> Result<()> {
    let messages = rows
        .iter()
        .map(|p| {
            vec![
                Message {
                    role: Role::User,
                    content: question(p),
                },
                Message {
                    role: Role::Assistant,
                    content: p.solution(show_work),
                },
            ]
        })
        .collect();
    write_parquet(
        path,
        &[
            ("messages", Column::Messages(messages)),
            (
                "answer",
                Column::Str(rows.iter().map(|p| p.answer().to_string()).collect()),
            ),
        ],
    )?;
    Ok(())
}

fn write_prompts(path: &Path, rows: &[&Problem]) -> Result<()> {
    write_parquet(
        path,
        &[
            (
                "prompt",
                Column::Str(rows.iter().map(|p| question(p)).collect()),
            ),
            (
                "answer",
                Column::Str(rows.iter().map(|p| p.answer().to_string()).collect()),
            ),
        ],
    )?;
    Ok(())
}

/// Writes the arithmetic demo's files under `out`.
pub fn prepare_arith(
    out: &Path,
    seed: u64,
    max_operand: i64,
    sft_rows: usize,
    show_work: bool,
) -> Result<ArithCounts> {
    std::fs::create_dir_all(out)?;
    let all = problems(max_operand);
    let mut sets: [Vec<&Problem>; 3] = Default::default();
    for p in &all {
        sets[set_of(seed, &p.text()) as usize].push(p);
    }
    let order = |set: &[&Problem], stream: &str| -> Vec<usize> {
        shuffled(set.len(), seed_for(seed, stream, 0))
    };
    let [heldout, train, rl] = &sets;
    let seen: Vec<&Problem> = train.iter().chain(rl.iter()).copied().collect();
    let train_order: Vec<&Problem> = order(&seen, "corpus").iter().map(|&i| seen[i]).collect();
    let docs: Vec<String> = train_order
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|p| p.corpus_line(show_work))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    write_parquet(
        &out.join("corpus.parquet"),
        &[("text", Column::Str(docs.clone()))],
    )?;
    let sft: Vec<&Problem> = order(train, "sft")
        .iter()
        .take(sft_rows)
        .map(|&i| train[i])
        .collect();
    write_sft(&out.join("sft_train.parquet"), &sft, show_work)?;
    let heldout_order: Vec<&Problem> = order(heldout, "heldout")
        .iter()
        .map(|&i| heldout[i])
        .collect();
    let sft_eval: Vec<&Problem> = heldout_order.iter().take(300).copied().collect();
    write_sft(&out.join("sft_eval.parquet"), &sft_eval, show_work)?;
    let rl_order: Vec<&Problem> = order(rl, "rl").iter().map(|&i| rl[i]).collect();
    write_prompts(&out.join("rl_prompts.parquet"), &rl_order)?;
    write_prompts(&out.join("eval_prompts.parquet"), &heldout_order)?;
    Ok(ArithCounts {
        problems: all.len(),
        corpus_documents: docs.len(),
        sft_train: sft.len(),
        sft_eval: sft_eval.len(),
        rl_prompts: rl_order.len(),
        eval_prompts: heldout_order.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sets_are_disjoint_and_answers_right() {
        let all = problems(20);
        // 21 × 21 sums and 21 · 22 / 2 differences.
        assert_eq!(all.len(), 441 + 231);
        assert!(all.iter().all(|p| p.answer() >= 0));
        let sets: Vec<u8> = all.iter().map(|p| set_of(7, &p.text())).collect();
        let held = sets.iter().filter(|&&s| s == 0).count();
        assert!(held > 30 && held < 110, "about 10 % held out: {held}");
        // Deterministic in the seed, different across seeds.
        assert_eq!(
            sets,
            all.iter().map(|p| set_of(7, &p.text())).collect::<Vec<_>>()
        );
        assert_ne!(
            sets,
            all.iter().map(|p| set_of(8, &p.text())).collect::<Vec<_>>()
        );
        let p = all.iter().find(|p| p.text() == "17-9").unwrap();
        assert_eq!(p.answer(), 8);
    }

    #[test]
    fn the_working_carries_and_borrows_column_by_column() {
        assert_eq!(worked(47, 38, true), "7+8+0=15, 4+3+1=8, answer 85");
        assert_eq!(worked(95, 7, true), "5+7+0=12, 9+0+1=10, answer 102");
        assert_eq!(worked(52, 18, false), "12-8-0=4, 5-1-1=3, answer 34");
        assert_eq!(worked(43, 38, false), "13-8-0=5, 4-3-1=0, answer 5");
        assert_eq!(
            worked(100, 1, false),
            "10-1-0=9, 10-0-1=9, 1-0-1=0, answer 99"
        );
        assert_eq!(worked(3, 3, false), "3-3-0=0, answer 0");
        let p = Problem {
            a: 12,
            b: 34,
            add: true,
        };
        assert_eq!(p.corpus_line(false), "12+34=46");
        assert_eq!(p.corpus_line(true), "12+34: 2+4+0=6, 1+3+0=4, answer 46");
        assert_eq!(p.solution(false), "46");
        // Every generated working ends in the true answer and its steps are right.
        for p in problems(120) {
            let w = p.solution(true);
            assert!(
                w.ends_with(&format!("answer {}", p.answer())),
                "{}: {w}",
                p.text()
            );
            for step in w.split(", ").filter(|s| !s.starts_with("answer")) {
                let (lhs, rhs) = step.split_once('=').unwrap();
                let n: Vec<i64> = lhs.split(['+', '-']).map(|x| x.parse().unwrap()).collect();
                let value = if lhs.contains('+') {
                    n[0] + n[1] + n[2]
                } else {
                    n[0] - n[1] - n[2]
                };
                assert_eq!(value.to_string(), rhs, "{}: {step}", p.text());
                assert!((0..=19).contains(&value), "{}: {step}", p.text());
            }
        }
    }
}
