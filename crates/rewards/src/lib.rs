//! temper-rewards: rewards a program computes rather than a model, with no tch: the reward
//! functions of the RL stages (exact answers, patterns, lengths, a sentiment lexicon, a user's
//! command), the independent sentiment judge (VADER) and the sign that turns a sentiment score
//! into a reward for the sentiment a prompt asks for. Reward models, which read tensors, are
//! scored by the stages through temper-core.

pub mod afinn;
pub mod command;
pub mod error;
pub mod functions;
pub mod program;
pub mod sign;
pub mod vader;

pub use afinn::{Afinn, AfinnScore};
pub use error::{Result, RewardError};
pub use functions::{check_rewards, compile_pattern, RewardSpec, Scored, TextReward};
pub use program::{ProgramRewards, ProgramScores, ReplyText};
pub use sign::ScoreSign;
pub use vader::{SentimentJudge, Verdict};
