//! temper-core: the one decoder-only transformer every stage trains, samples from or scores.
//!
//! GPT-2 and Llama families share one implementation with small enum switches ([`Arch`]);
//! parameter names are Hugging Face's, so `model.safetensors` files move between temper and
//! `transformers` without conversion. Training loops live in the stage binaries; this crate
//! holds the pieces they call: the model, sampler, scoring, losses, RL maths, optimizer,
//! checkpoints, the resumable state and the training run around a loop ([`train`]). The
//! stage contract (arguments, configs, folders, metrics files) is temper-stage's; the
//! rewards a program computes are temper-rewards'.

mod attention_mask;
pub mod chat_model;
pub mod checkpoint;
pub mod config;
pub mod critic_free;
pub mod device;
pub mod dist;
pub mod error;
mod ffi;
pub mod hf_config;
pub mod kv_cache;
mod layers;
pub mod losses;
pub mod model;
pub mod optim;
pub mod peft;
pub mod preference;
pub mod reward_set;
pub mod rl;
pub mod safetensors;
pub mod sample;
pub mod save;
pub mod schedule;
pub mod scoring;
pub mod state;
pub mod tensors;
pub mod train;

pub use checkpoint::{
    load_checkpoint, load_with_tokenizer, save_checkpoint, save_full_checkpoint, LoadSpec, Loaded,
    ScoreHead, CHECKPOINT_FILES,
};
pub use config::{Arch, Family, ModelConfig, ModelShape, RopeScaling, ScorePooling, ScoreSign};
pub use device::{resolve_device, with_autocast, DeviceSpec, Precision};
pub use error::{CoreError, Result};
pub use kv_cache::KvCache;
pub use losses::{causal_lm_loss, lm_target_mask, token_logprobs};
pub use model::{Heads, Transformer};
pub use optim::{AdamW, AdamWConfig};
pub use sample::{generate, Generation, Joined, SamplingConfig};
pub use schedule::{OptimSettings, Schedule};
pub use state::{resume_or_start, save_state};
pub use tensors::BatchTensors;
