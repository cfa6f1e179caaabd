//! temper-core: the one decoder-only transformer every stage trains, samples from or scores.
//!
//! GPT-2 and Llama families share one implementation with small enum switches ([`Arch`]);
//! parameter names are Hugging Face's, so `model.safetensors` files move between temper and
//! `transformers` without conversion. Training loops live in the stage binaries; this crate
//! holds the pieces they call.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
mod ffi;
pub mod kv_cache;
mod layers;
pub mod losses;
pub mod model;
pub mod optim;
pub mod rl;
pub mod rundir;
pub mod sample;
pub mod schedule;
pub mod stage;

pub use checkpoint::{load_checkpoint, save_checkpoint, LoadSpec, ScoreHead};
pub use config::{Arch, ModelConfig, ScorePooling};
pub use device::{resolve_device, with_autocast, DeviceSpec, Precision};
pub use error::{CoreError, Result};
pub use kv_cache::KvCache;
pub use model::{causal_lm_loss, lm_target_mask, token_logprobs, Heads, Transformer};
pub use optim::{AdamW, AdamWConfig};
pub use rundir::{config_hash, Progress, RunDir};
pub use sample::{generate, Generation, Joined, SamplingConfig};
pub use schedule::{OptimSettings, Schedule};
