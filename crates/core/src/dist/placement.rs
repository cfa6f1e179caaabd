//! Where a process stands among the ranks, from the environment torchrun and Slurm set, and
//! which device and process-group backend it uses.

use std::time::Duration;

use tch::Device;

use super::DistError;
use crate::device::{resolve_device, DeviceSpec};

/// The c10d process group the ranks join: Gloo (collectives on host memory; CPU, and GPUs at a
/// cost) or NCCL (GPU to GPU, one GPU per rank).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Where this process stands among the ranks of a data-parallel stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`: where the ranks meet. Set when `world` > 1, and for a group
    /// of one when a backend is named (`TEMPER_DIST_BACKEND`) and `MASTER_ADDR` is set, which
    /// runs a single process through the collectives — how a backend is checked on one device.
    pub master: Option<(String, u16)>,
    /// `TEMPER_DIST_BACKEND` (`gloo` or `nccl`); unset or `auto`: NCCL on GPUs, Gloo on CPU.
    pub backend: Option<Backend>,
}

fn env(message: String) -> DistError {
    DistError::Environment(message)
}

impl Placement {
    /// From torchrun's variables, else Slurm's, else a world of one. `get` reads a variable
    /// (the process environment in [`Placement::from_env`]).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> std::result::Result<Self, DistError> {
        let num = |name: &str| -> std::result::Result<Option<usize>, DistError> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| env(format!("{name}={v:?} is not a non-negative integer")))
                })
                .transpose()
        };
        let (rank, world, local) = if get("WORLD_SIZE").is_some() || get("RANK").is_some() {
            (num("RANK")?, num("WORLD_SIZE")?, num("LOCAL_RANK")?)
        } else {
            (
                num("SLURM_PROCID")?,
                num("SLURM_NTASKS")?,
                num("SLURM_LOCALID")?,
            )
        };
        let world = world.unwrap_or(1);
        let rank = rank.unwrap_or(0);
        if world == 0 {
            return Err(env(
                "WORLD_SIZE is 0; it counts the ranks, at least 1".into()
            ));
        }
        if rank >= world {
            return Err(env(format!(
                "RANK {rank} is not below WORLD_SIZE {world}: ranks are numbered 0..{}",
                world - 1
            )));
        }
        let backend = match get("TEMPER_DIST_BACKEND").as_deref().map(str::trim) {
            None | Some("auto") => None,
            Some("gloo") => Some(Backend::Gloo),
            Some("nccl") => Some(Backend::Nccl),
            Some(other) => {
                return Err(env(format!(
                "TEMPER_DIST_BACKEND={other:?}: use gloo, nccl or auto (NCCL on GPUs, Gloo on CPU)"
            )))
            }
        };
        let group_of_one = backend.is_some() && get("MASTER_ADDR").is_some();
        let master = if world > 1 || group_of_one {
            let addr = get("MASTER_ADDR").ok_or_else(|| {
                env(format!("WORLD_SIZE is {world} but MASTER_ADDR is not set: set it to rank 0's host (torchrun and the orchestrator do)"))
            })?;
            let port = get("MASTER_PORT").unwrap_or_else(|| "29500".into());
            let port = port
                .trim()
                .parse::<u16>()
                .map_err(|_| env(format!("MASTER_PORT={port:?} is not a port number")))?;
            Some((addr, port))
        } else {
            None
        };
        Ok(Self {
            rank,
            world,
            local_rank: local.unwrap_or(rank),
            master,
            backend,
        })
    }

    pub fn from_env() -> std::result::Result<Self, DistError> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// The device this rank trains on: `spec` resolved as in one process, except that ranks in
    /// a group on GPUs take one GPU each, `cuda:LOCAL_RANK` (as torchrun's DDP does); asking
    /// for NCCL off the GPU is refused. Checked before anything is read or written.
    pub fn device(&self, spec: DeviceSpec) -> std::result::Result<Device, DistError> {
        let device = resolve_device(spec).map_err(|e| DistError::Device(e.to_string()))?;
        let device = match device {
            Device::Cuda(_) if self.master.is_some() => {
                gpu_of(self.local_rank, tch::Cuda::device_count() as usize)?
            }
            d => d,
        };
        if self.backend == Some(Backend::Nccl) && self.master.is_some() && !device.is_cuda() {
            return Err(DistError::Device(format!(
                "TEMPER_DIST_BACKEND=nccl needs a GPU, but this stage runs on the CPU (device \
                 `{spec}`, {} CUDA device(s) visible): use gloo, or run on a GPU machine",
                tch::Cuda::device_count()
            )));
        }
        Ok(device)
    }

    /// The backend of a group whose ranks train on `device`: the one named, else NCCL on GPUs
    /// and Gloo on CPU.
    pub fn backend_on(&self, device: Device) -> Backend {
        self.backend.unwrap_or(if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        })
    }
}

/// The GPU of local rank `local_rank` on a node where libtorch sees `count`: `cuda:LOCAL_RANK`,
/// or, with more ranks per node than GPUs, the one line that says so.
fn gpu_of(local_rank: usize, count: usize) -> std::result::Result<Device, DistError> {
    if local_rank >= count {
        return Err(DistError::Device(format!(
            "LOCAL_RANK {local_rank} needs GPU cuda:{local_rank}, but libtorch sees {count} GPU(s) \
             on this node: start at most {count} ranks per node (nproc)"
        )));
    }
    Ok(Device::Cuda(local_rank))
}

/// How long a rank waits for the others (rendezvous, each collective): `TEMPER_DIST_TIMEOUT`
/// seconds, default 300. A rank that died makes the others fail after this long.
pub fn timeout() -> Duration {
    let secs = std::env::var("TEMPER_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(300);
    Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_takes_its_own_gpu_and_one_too_many_is_refused() {
        assert_eq!(gpu_of(0, 2), Ok(Device::Cuda(0)));
        assert_eq!(gpu_of(1, 2), Ok(Device::Cuda(1)));
        let err = gpu_of(2, 2).unwrap_err().to_string();
        assert!(
            err.contains("LOCAL_RANK 2 needs GPU cuda:2")
                && err.contains("sees 2 GPU(s)")
                && err.contains("at most 2 ranks per node"),
            "{err}"
        );
        assert!(gpu_of(0, 0).is_err(), "no GPU at all");
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_placement_comes_from_torchrun_or_slurm() {
        let p = Placement::from_vars(vars(&[])).unwrap();
        assert_eq!((p.rank, p.world, p.master, p.backend), (0, 1, None, None));
        let p = Placement::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29511"),
        ]))
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank), (1, 2, 1));
        assert_eq!(p.master, Some(("127.0.0.1".into(), 29511)));
        let p = Placement::from_vars(vars(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node1"),
        ]))
        .unwrap();
        assert_eq!((p.rank, p.world, p.local_rank), (3, 4, 1));
        assert_eq!(p.master, Some(("node1".into(), 29500)));
    }

    #[test]
    fn a_named_backend_with_an_address_makes_a_group_of_one() {
        // torchrun sets MASTER_ADDR even for one rank: without a named backend, no group.
        let p = Placement::from_vars(vars(&[("WORLD_SIZE", "1"), ("MASTER_ADDR", "h")])).unwrap();
        assert_eq!(p.master, None);
        let p = Placement::from_vars(vars(&[
            ("TEMPER_DIST_BACKEND", "gloo"),
            ("MASTER_ADDR", "127.0.0.1"),
        ]))
        .unwrap();
        assert_eq!((p.world, p.backend), (1, Some(Backend::Gloo)));
        assert_eq!(p.master, Some(("127.0.0.1".into(), 29500)));
        assert_eq!(p.backend_on(Device::Cpu), Backend::Gloo);
        let auto = Placement::from_vars(vars(&[("TEMPER_DIST_BACKEND", "auto")])).unwrap();
        assert_eq!(auto.backend, None);
        assert_eq!(auto.backend_on(Device::Cuda(0)), Backend::Nccl);
        assert_eq!(auto.backend_on(Device::Cpu), Backend::Gloo);
    }

    #[test]
    fn nccl_off_the_gpu_is_refused_by_name() {
        if tch::Cuda::is_available() {
            return; // this machine has a GPU: NCCL is allowed there
        }
        let p = Placement::from_vars(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("TEMPER_DIST_BACKEND", "nccl"),
        ]))
        .unwrap();
        let e = p.device(DeviceSpec::Auto).unwrap_err().to_string();
        assert!(e.contains("TEMPER_DIST_BACKEND=nccl needs a GPU"), "{e}");
        let e = p.device(DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("cuda:0 requested"), "{e}");
        // Gloo on the same placement trains on the CPU.
        let gloo = Placement { backend: None, ..p };
        assert_eq!(gloo.device(DeviceSpec::Auto).unwrap(), Device::Cpu);
    }

    #[test]
    fn an_inconsistent_environment_is_named() {
        let e = Placement::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK 2 is not below WORLD_SIZE 2"), "{e}");
        let e = Placement::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        let e = Placement::from_vars(vars(&[("WORLD_SIZE", "two")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
        let e = Placement::from_vars(vars(&[("TEMPER_DIST_BACKEND", "mpi")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use gloo, nccl or auto"), "{e}");
    }
}
