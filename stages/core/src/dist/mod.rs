//! Data parallelism over PyTorch's c10d, reached through csrc/dist.cpp (and csrc/nccl.cpp).
//!
//! A stage learns its place from the environment torchrun and Slurm set: `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (or `SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID` when those are absent). With a world of one nothing changes; with more,
//! rank 0 serves a `TCPStore` rendezvous and every rank joins a process group — Gloo on CPU,
//! NCCL on GPUs with one GPU per rank — whose collectives are torch's own.

mod grad_sync;
mod placement;
mod ranks;
mod world;

pub use grad_sync::GradSync;
pub use placement::{timeout, Backend, Placement};
pub use ranks::Ranks;
pub use world::{nccl_built, World};
