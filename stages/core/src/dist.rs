//! Data parallelism over PyTorch's c10d (Gloo), reached through csrc/dist.cpp.
//!
//! A stage learns its place from the environment torchrun and Slurm set: `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (or `SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID` when those are absent). With a world of one nothing changes; with more,
//! rank 0 serves a `TCPStore` rendezvous and every rank joins a Gloo process group, whose
//! collectives are torch's own.

use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tch::{Kind, Tensor};

use temper_stage::{StageError, StageFolder};

use crate::error::{CoreError, Result};

extern "C" {
    fn temper_gloo_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_long,
    ) -> *mut c_void;
    fn temper_gloo_free(group: *mut c_void);
    fn temper_gloo_allreduce_sum(group: *mut c_void, tensor: *mut torch_sys::C_tensor) -> c_int;
    fn temper_gloo_broadcast(
        group: *mut c_void,
        tensor: *mut torch_sys::C_tensor,
        root: c_int,
    ) -> c_int;
    fn temper_gloo_barrier(group: *mut c_void) -> c_int;
}

/// Where this process stands among the ranks of a data-parallel stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, needed when `world` > 1.
    pub master: Option<(String, u16)>,
}

impl Placement {
    /// From torchrun's variables, else Slurm's, else a world of one. `get` reads a variable
    /// (the process environment in [`Placement::from_env`]).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> std::result::Result<Self, String> {
        let num = |name: &str| -> std::result::Result<Option<usize>, String> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("{name}={v:?} is not a non-negative integer"))
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
            return Err("WORLD_SIZE is 0; it counts the ranks, at least 1".into());
        }
        if rank >= world {
            return Err(format!(
                "RANK {rank} is not below WORLD_SIZE {world}: ranks are numbered 0..{}",
                world - 1
            ));
        }
        let master = if world > 1 {
            let addr = get("MASTER_ADDR").ok_or_else(|| {
                format!("WORLD_SIZE is {world} but MASTER_ADDR is not set: set it to rank 0's host (torchrun and the orchestrator do)")
            })?;
            let port = get("MASTER_PORT").unwrap_or_else(|| "29500".into());
            let port = port
                .trim()
                .parse::<u16>()
                .map_err(|_| format!("MASTER_PORT={port:?} is not a port number"))?;
            Some((addr, port))
        } else {
            None
        };
        Ok(Self {
            rank,
            world,
            local_rank: local.unwrap_or(rank),
            master,
        })
    }

    pub fn from_env() -> std::result::Result<Self, String> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }
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

/// This process's ranks and, with more than one, the process group joining them.
pub struct World {
    pub placement: Placement,
    group: Option<*mut c_void>,
}

// SAFETY: the c10d process group is thread-safe for the calls made here, which the stage makes
// from one thread at a time anyway.
unsafe impl Send for World {}
unsafe impl Sync for World {}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(g) = self.group.take() {
            // SAFETY: created by temper_gloo_new and freed once.
            unsafe { temper_gloo_free(g) }
        }
    }
}

fn dist_error(what: &str) -> CoreError {
    CoreError::Device(format!("{what}: {}", crate::ffi::last_error()))
}

impl World {
    /// One process, no group.
    pub fn single() -> Self {
        Self {
            placement: Placement {
                rank: 0,
                world: 1,
                local_rank: 0,
                master: None,
            },
            group: None,
        }
    }

    /// Joins the ranks `placement` describes (a rendezvous that waits at most `timeout`).
    pub fn join(placement: Placement, timeout: Duration) -> Result<Self> {
        let Some((host, port)) = placement.master.clone() else {
            return Ok(Self {
                placement,
                group: None,
            });
        };
        let c_host = CString::new(host.clone()).map_err(|e| CoreError::Device(e.to_string()))?;
        // SAFETY: a valid C string; the shim copies it.
        let g = unsafe {
            temper_gloo_new(
                c_host.as_ptr(),
                c_int::from(port),
                placement.rank as c_int,
                placement.world as c_int,
                timeout.as_millis() as c_long,
            )
        };
        if g.is_null() {
            return Err(dist_error(&format!(
                "rank {} of {} could not join the process group at {host}:{port} within {} s",
                placement.rank,
                placement.world,
                timeout.as_secs()
            )));
        }
        Ok(Self {
            placement,
            group: Some(g),
        })
    }

    pub fn rank(&self) -> usize {
        self.placement.rank
    }

    pub fn size(&self) -> usize {
        self.placement.world
    }

    /// Joins the ranks `placement` describes, within [`timeout`], saying which rank this is;
    /// the error is one line naming the address.
    /// A stage checks its placement (`Placement::from_env`) before reading anything and joins
    /// only once it will train: `--validate` never waits for a rendezvous.
    pub fn join_placed(placement: Placement) -> std::result::Result<Self, String> {
        if placement.world > 1 {
            tracing::info!(
                "rank {} of {} (local rank {}), rendezvous at {}:{}",
                placement.rank,
                placement.world,
                placement.local_rank,
                placement.master.as_ref().map_or("", |m| m.0.as_str()),
                placement.master.as_ref().map_or(0, |m| m.1),
            );
        }
        Self::join(placement, timeout()).map_err(|e| e.to_string())
    }

    /// Rank 0: the one that writes.
    pub fn is_main(&self) -> bool {
        self.placement.rank == 0
    }

    /// This rank's rows of a global batch of `rows`: contiguous near-equal shares in rank
    /// order (the last ranks get fewer, possibly none, when `rows` does not divide).
    pub fn shard(&self, rows: usize) -> std::ops::Range<usize> {
        let share = rows.div_ceil(self.size());
        let start = (self.rank() * share).min(rows);
        start..(start + share).min(rows)
    }

    /// The whole of a 1-D tensor of `rows` values whose `shard(rows)` this rank computed, on
    /// every rank (an all-gather as one all-reduce: each rank fills its rows of zeros). fp32.
    pub fn gather_shards(&self, local: &Tensor, rows: usize) -> Result<Tensor> {
        if self.group.is_none() {
            return Ok(local.to_kind(Kind::Float));
        }
        let range = self.shard(rows);
        let mut whole = Tensor::zeros([rows as i64], (Kind::Float, tch::Device::Cpu));
        if !range.is_empty() {
            whole
                .narrow(0, range.start as i64, range.len() as i64)
                .copy_(
                    &local
                        .detach()
                        .to_kind(Kind::Float)
                        .to_device(tch::Device::Cpu),
                );
        }
        self.sum_(&mut whole)?;
        Ok(whole.to_device(local.device()))
    }

    /// The whole batch of a 1-D tensor of this rank's `shard(rows)` values: one process keeps
    /// its tensor as it is (its own kind, so an f64 value stays f64 and one-process runs keep
    /// their arithmetic); several gather every rank's rows with `gather_shards` (fp32).
    pub fn whole_batch(&self, local: &Tensor, rows: usize) -> Result<Tensor> {
        match self.size() {
            1 => Ok(local.shallow_clone()),
            _ => self.gather_shards(local, rows),
        }
    }

    /// For a stage without data parallelism: refuses a world above one with one line, rather
    /// than letting every rank train the whole stage alone.
    pub fn require_single(kind: &str) -> std::result::Result<(), String> {
        let placement = Placement::from_env()?;
        if placement.world > 1 {
            return Err(format!(
                "temper-{kind} does not train data-parallel (WORLD_SIZE={}); run it as one \
                 process (the training stages — pretrain, sft, reward, dpo, grpo, ppo — do)",
                placement.world
            ));
        }
        Ok(())
    }

    /// Sums `tensor` over the ranks in place (CPU tensors; contiguous).
    pub fn sum_(&self, tensor: &mut Tensor) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        // SAFETY: `tensor` is a live tensor handle for the duration of the call.
        let rc = unsafe { temper_gloo_allreduce_sum(g, tensor.as_mut_ptr()) };
        if rc != 0 {
            return Err(dist_error("all-reduce failed (did another rank stop?)"));
        }
        Ok(())
    }

    /// Rank 0's values of `tensors`, on every rank.
    pub fn broadcast_(&self, tensors: &[Tensor]) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        let mut flat = flatten(tensors);
        // SAFETY: as in `sum_`.
        let rc = unsafe { temper_gloo_broadcast(g, flat.as_mut_ptr(), 0) };
        if rc != 0 {
            return Err(dist_error("broadcast failed (did another rank stop?)"));
        }
        unflatten(&flat, tensors);
        Ok(())
    }

    /// The mean over ranks of every tensor (one all-reduce for all of them).
    pub fn average_(&self, tensors: &[Tensor]) -> Result<()> {
        if self.group.is_none() || tensors.is_empty() {
            return Ok(());
        }
        let mut flat = flatten(tensors);
        self.sum_(&mut flat)?;
        let flat = flat / self.size() as f64;
        unflatten(&flat, tensors);
        Ok(())
    }

    /// The mean over ranks of one number.
    pub fn mean(&self, value: f64) -> Result<f64> {
        Ok(self.sum_values(&[value])?[0] / self.size() as f64)
    }

    /// The sums over ranks of a few numbers (losses, token counts).
    pub fn sum_values(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.group.is_none() {
            return Ok(values.to_vec());
        }
        let mut t = Tensor::from_slice(values);
        self.sum_(&mut t)?;
        Ok(Vec::<f64>::try_from(t)?)
    }

    /// `rl::masked_whiten` over a batch whose rows are split across the ranks: the mean and
    /// the (Bessel-corrected) variance are the whole batch's. One rank: `masked_whiten` itself.
    pub fn masked_whiten(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if self.group.is_none() {
            return Ok(crate::rl::masked_whiten(x, mask));
        }
        let (mean, var) = self.masked_moments(x, mask)?;
        Ok((x - mean) * (var + 1e-8).sqrt().recip() * mask.to_kind(Kind::Float))
    }

    /// `rl::explained_variance` over a batch whose rows are split across the ranks.
    pub fn explained_variance(
        &self,
        values: &Tensor,
        returns: &Tensor,
        mask: &Tensor,
    ) -> Result<f64> {
        if self.group.is_none() {
            let v = crate::rl::explained_variance(values, returns, mask);
            return Ok(v.to_kind(Kind::Double).double_value(&[]));
        }
        let (_, var_r) = self.masked_moments(returns, mask)?;
        let (_, var_e) = self.masked_moments(&(returns - values), mask)?;
        Ok(1.0 - var_e / var_r.max(1e-8))
    }

    /// The masked mean and Bessel-corrected variance of `x` over every rank's rows.
    fn masked_moments(&self, x: &Tensor, mask: &Tensor) -> Result<(f64, f64)> {
        let mask = mask.to_kind(Kind::Float);
        let local = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
        let sums = self.sum_values(&[local(&(x * &mask)), local(&mask)])?;
        let n = sums[1];
        let mean = sums[0] / n.max(1.0);
        let sq = self.sum_values(&[local(&((x - mean).square() * &mask))])?[0] / n.max(1.0);
        Ok((mean, sq * n / (n - 1.0).max(1.0)))
    }

    pub fn barrier(&self) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        // SAFETY: a live group.
        if unsafe { temper_gloo_barrier(g) } != 0 {
            return Err(dist_error("barrier failed (did another rank stop?)"));
        }
        Ok(())
    }
}

/// Where a data-parallel stage's ranks write: rank 0 claims the stage folder as a single
/// process would; the other ranks read its `state/` to resume from, and send their logs to a
/// scratch folder that is removed when they finish.
pub struct Ranks {
    /// The stage folder (every rank resumes from its `state/`; rank 0 alone writes it).
    pub out: PathBuf,
    /// Where this rank's metrics go: `out` for rank 0, scratch for the others.
    pub log_dir: PathBuf,
    main: bool,
    _folder: Option<StageFolder>,
}

impl Ranks {
    pub fn open(world: &World, out: &Path, kind: &str) -> std::result::Result<Self, StageError> {
        if world.is_main() {
            let folder = StageFolder::claim(out, kind)?;
            return Ok(Self {
                out: folder.path.clone(),
                log_dir: folder.path.clone(),
                main: true,
                _folder: Some(folder),
            });
        }
        let scratch = std::env::temp_dir().join(format!(
            "temper-{kind}-rank{}-{}",
            world.rank(),
            std::process::id()
        ));
        std::fs::create_dir_all(&scratch)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", scratch.display()))?;
        Ok(Self {
            out: out.to_path_buf(),
            log_dir: scratch,
            main: false,
            _folder: None,
        })
    }

    /// Runs `resume` (which reads `out/state/`, or another file rank 0 may write first) on
    /// rank 0 first — it may repair an interrupted save — and on the other ranks once it is
    /// done.
    pub fn resume<T, E: Into<anyhow::Error>>(
        &self,
        world: &World,
        resume: impl FnOnce(&Path) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, StageError> {
        if self.main {
            let out = resume(&self.out)?;
            world.barrier()?;
            Ok(out)
        } else {
            world.barrier()?;
            Ok(resume(&self.out)?)
        }
    }

    /// A progress bar on rank 0; hidden on the others.
    pub fn progress_bar(&self, total: u64, done: u64) -> indicatif::ProgressBar {
        if self.main {
            temper_stage::progress_bar(total, done)
        } else {
            indicatif::ProgressBar::hidden()
        }
    }

    /// Ends a rank other than 0: its scratch logs go.
    pub fn finish(self) -> std::result::Result<(), StageError> {
        if !self.main {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        Ok(())
    }
}

/// One fp32 CPU vector holding every tensor, in order.
fn flatten(tensors: &[Tensor]) -> Tensor {
    let parts: Vec<Tensor> = tensors
        .iter()
        .map(|t| {
            t.detach()
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu)
                .reshape([-1])
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// Copies `flat` back into `tensors` (their own kinds and devices).
fn unflatten(flat: &Tensor, tensors: &[Tensor]) {
    let mut at = 0;
    tch::no_grad(|| {
        for t in tensors {
            let n = t.numel() as i64;
            let part = flat.narrow(0, at, n).view(t.size().as_slice());
            t.shallow_clone().copy_(&part);
            at += n;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!((p.rank, p.world, p.master), (0, 1, None));
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

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn two_ranks_sum_broadcast_and_average_through_gloo() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let placement = Placement {
                        rank,
                        world: 2,
                        local_rank: rank,
                        master: Some(("127.0.0.1".into(), port)),
                    };
                    let world = World::join(placement, Duration::from_secs(60)).unwrap();
                    let mut t =
                        Tensor::full([4], rank as f64 + 1.0, (Kind::Float, tch::Device::Cpu));
                    world.sum_(&mut t).unwrap();
                    let b = Tensor::full(
                        [2, 3],
                        rank as f64 * 10.0 + 7.0,
                        (Kind::Float, tch::Device::Cpu),
                    );
                    let c = Tensor::full([5], rank as f64, (Kind::Double, tch::Device::Cpu));
                    world
                        .broadcast_(&[b.shallow_clone(), c.shallow_clone()])
                        .unwrap();
                    let g = Tensor::full([3], rank as f64 * 2.0, (Kind::Float, tch::Device::Cpu));
                    world.average_(&[g.shallow_clone()]).unwrap();
                    let sums = world.sum_values(&[rank as f64, 1.0]).unwrap();
                    world.barrier().unwrap();
                    (
                        Vec::<f32>::try_from(t).unwrap(),
                        Vec::<f32>::try_from(b.reshape([-1])).unwrap(),
                        Vec::<f64>::try_from(c).unwrap(),
                        Vec::<f32>::try_from(g).unwrap(),
                        sums,
                    )
                })
            })
            .collect();
        for r in ranks {
            let (t, b, c, g, sums) = r.join().unwrap();
            assert_eq!(t, [3.0; 4]);
            assert_eq!(b, [7.0; 6], "rank 0's values everywhere");
            assert_eq!(c, [0.0; 5]);
            assert_eq!(g, [1.0; 3], "mean of 0 and 2");
            assert_eq!(sums, [1.0, 2.0]);
        }
    }

    #[test]
    fn a_rendezvous_nobody_joins_times_out_naming_the_address() {
        let port = free_port();
        let placement = Placement {
            rank: 1,
            world: 2,
            local_rank: 1,
            master: Some(("127.0.0.1".into(), port)),
        };
        let started = std::time::Instant::now();
        let err = World::join(placement, Duration::from_secs(2))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn an_inconsistent_environment_is_named() {
        let e = Placement::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.contains("RANK 2 is not below WORLD_SIZE 2"), "{e}");
        let e = Placement::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        let e = Placement::from_vars(vars(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
    }
}
