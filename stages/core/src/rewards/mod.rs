//! Rewards a program computes rather than a model: the independent sentiment judge (VADER),
//! and the reward functions of the RL stages (exact answers, patterns, lengths, the lexicon,
//! a user's command).

pub mod command;
pub mod functions;
pub mod program;
pub mod vader;

pub use functions::{RewardSpec, Scored, TextReward};
pub use program::{ProgramRewards, ProgramScores, ReplyText};
pub use vader::{SentimentJudge, Verdict};
