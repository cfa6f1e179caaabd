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

/// A data-parallel setting that cannot work, in one line saying what to change: the
/// environment torchrun or Slurm set, a `TEMPER_DIST_*` variable, a rank's device, or the
/// rendezvous.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DistError {
    /// A variable of the environment (its name and value are in the message).
    #[error("{0}")]
    Environment(String),
    /// A device this rank cannot use.
    #[error("{0}")]
    Device(String),
    /// Joining the process group failed.
    #[error("{0}")]
    Rendezvous(String),
}

/// A free port for a rendezvous on this machine, for tests that start ranks in parallel: taken
/// below the kernel's ephemeral range (32768 and up on Linux), where the listening sockets Gloo
/// opens for its own connections land, and never the same twice in one process. (A port picked
/// by binding port 0 and released can be handed straight to such a socket, and a rendezvous
/// client that connects to it hangs.)
#[doc(hidden)]
pub fn port_for_tests() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(97);
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (start.wrapping_add(n) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
