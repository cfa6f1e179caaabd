//! The process group joining the ranks, and the collectives the stages use on it.

use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::DistError;
use super::{timeout, Backend, Placement};
use crate::error::{CoreError, Result};

extern "C" {
    fn temper_pg_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_long,
        backend: c_int,
        device: c_int,
    ) -> *mut c_void;
    fn temper_pg_free(group: *mut c_void);
    fn temper_pg_allreduce_sum(group: *mut c_void, tensor: *mut torch_sys::C_tensor) -> c_int;
    fn temper_pg_broadcast(
        group: *mut c_void,
        tensor: *mut torch_sys::C_tensor,
        root: c_int,
    ) -> c_int;
    fn temper_pg_barrier(group: *mut c_void) -> c_int;
    fn temper_has_nccl() -> c_int;
}

/// Whether this build compiled NCCL in (build.rs does where libtorch has CUDA and
/// scripts/setup.sh installed the headers).
pub fn nccl_built() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { temper_has_nccl() != 0 }
}

/// This process's ranks and, with more than one, the process group joining them.
pub struct World {
    pub placement: Placement,
    pub(super) group: Option<*mut c_void>,
    /// Where collective buffers live: host memory for Gloo, the rank's GPU for NCCL.
    pub(super) comm: Device,
}

// SAFETY: the c10d process group is thread-safe for the calls made here, which the stage makes
// from one thread at a time anyway.
unsafe impl Send for World {}
unsafe impl Sync for World {}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(g) = self.group.take() {
            // SAFETY: created by temper_pg_new and freed once.
            unsafe { temper_pg_free(g) }
        }
    }
}

pub(super) fn dist_error(what: &str) -> CoreError {
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
                backend: None,
            },
            group: None,
            comm: Device::Cpu,
        }
    }

    /// Joins the ranks `placement` describes, which train on `device` (a rendezvous that waits
    /// at most `timeout`), in a Gloo or NCCL group as [`Placement::backend_on`] decides.
    pub fn join(placement: Placement, timeout: Duration, device: Device) -> Result<Self> {
        let Some((host, port)) = placement.master.clone() else {
            return Ok(Self {
                placement,
                group: None,
                comm: Device::Cpu,
            });
        };
        let backend = placement.backend_on(device);
        let (code, comm) = match (backend, device) {
            (Backend::Nccl, Device::Cuda(n)) => (1, Device::Cuda(n)),
            (Backend::Nccl, _) => {
                return Err(CoreError::Device(
                    "NCCL joins ranks on GPUs, and this one trains on the CPU: use gloo".into(),
                ))
            }
            (Backend::Gloo, _) => (0, Device::Cpu),
        };
        let c_host = CString::new(host.clone()).map_err(|e| CoreError::Device(e.to_string()))?;
        // SAFETY: a valid C string; the shim copies it.
        let g = unsafe {
            temper_pg_new(
                c_host.as_ptr(),
                c_int::from(port),
                placement.rank as c_int,
                placement.world as c_int,
                timeout.as_millis() as c_long,
                code,
                match comm {
                    Device::Cuda(n) => n as c_int,
                    _ => -1,
                },
            )
        };
        if g.is_null() {
            return Err(dist_error(&format!(
                "rank {} of {} could not join the {} process group at {host}:{port} within {} s",
                placement.rank,
                placement.world,
                backend.name(),
                timeout.as_secs()
            )));
        }
        Ok(Self {
            placement,
            group: Some(g),
            comm,
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
    pub fn join_placed(
        placement: Placement,
        device: Device,
    ) -> std::result::Result<Self, DistError> {
        if let Some((host, port)) = &placement.master {
            tracing::info!(
                "rank {} of {} (local rank {}) on {device:?}, {} rendezvous at {host}:{port}",
                placement.rank,
                placement.world,
                placement.local_rank,
                placement.backend_on(device).name(),
            );
        }
        Self::join(placement, timeout(), device).map_err(|e| DistError::Rendezvous(e.to_string()))
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
        let mut whole = Tensor::zeros([rows as i64], (Kind::Float, self.comm));
        if !range.is_empty() {
            whole
                .narrow(0, range.start as i64, range.len() as i64)
                .copy_(&local.detach().to_kind(Kind::Float).to_device(self.comm));
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
    pub fn require_single(kind: &str) -> std::result::Result<(), DistError> {
        let placement = Placement::from_env()?;
        if placement.world > 1 {
            return Err(DistError::Environment(format!(
                "temper-{kind} does not train data-parallel (WORLD_SIZE={}); run it as one \
                 process (the training stages — pretrain, sft, reward, dpo, grpo, ppo — do)",
                placement.world
            )));
        }
        Ok(())
    }

    /// Sums `tensor` over the ranks in place. The collective runs on the group's device (host
    /// memory for Gloo, the rank's GPU for NCCL); a tensor elsewhere, or not contiguous, goes
    /// through a copy there.
    pub fn sum_(&self, tensor: &mut Tensor) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        if tensor.device() != self.comm || !tensor.is_contiguous() {
            let mut there = tensor.to_device(self.comm).contiguous();
            self.sum_(&mut there)?;
            tch::no_grad(|| tensor.copy_(&there));
            return Ok(());
        }
        // SAFETY: `tensor` is a live tensor handle for the duration of the call.
        let rc = unsafe { temper_pg_allreduce_sum(g, tensor.as_mut_ptr()) };
        if rc != 0 {
            return Err(dist_error("all-reduce failed (did another rank stop?)"));
        }
        Ok(())
    }

    /// Rank 0's values of `tensors`, on every rank.
    pub fn broadcast_(&self, tensors: &[Tensor]) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        let mut flat = flatten(tensors, self.comm);
        // SAFETY: as in `sum_`.
        let rc = unsafe { temper_pg_broadcast(g, flat.as_mut_ptr(), 0) };
        if rc != 0 {
            return Err(dist_error("broadcast failed (did another rank stop?)"));
        }
        unflatten(&flat, tensors);
        Ok(())
    }

    /// The start of training on every rank: checks that all ranks resumed the same run — the
    /// same step and the same weights, which they do when every rank reads the same `state/` —
    /// then copies rank 0's `params` to all. A rank that found another state (a node without
    /// the shared filesystem started afresh, or read an older save) fails every rank with one
    /// line naming it, instead of training a silently diverged model.
    pub fn start_together(&self, step: u64, params: &[Tensor]) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        // What each rank resumed: its step and two sums over its weights, compared as fp32
        // (the broadcast's precision) with rank 0's. A fresh start compares the step alone:
        // the broadcast below is what makes fresh weights equal.
        let (sum, abs) = if step == 0 {
            (0.0, 0.0)
        } else {
            tch::no_grad(|| {
                params.iter().fold((0.0, 0.0), |(s, a), p| {
                    let p = p.to_kind(Kind::Double);
                    (
                        s + p.sum(Kind::Double).double_value(&[]),
                        a + p.abs().sum(Kind::Double).double_value(&[]),
                    )
                })
            })
        };
        let mine = Tensor::from_slice(&[step as f64, sum, abs]).to_kind(Kind::Float);
        let rank0 = mine.copy();
        self.broadcast_(&[rank0.shallow_clone()])?;
        let differs = if mine.equal(&rank0) { 0.0 } else { 1.0 };
        let sent = Vec::<f32>::try_from(&rank0)?;
        // Every rank learns how many differ, and which (a sum of one-hot flags), so all stop.
        let mut flags = vec![0.0; self.size()];
        flags[self.rank()] = differs;
        let flags = self.sum_values(&flags)?;
        let odd: Vec<String> = (0..self.size())
            .filter(|&r| flags[r] > 0.0)
            .map(|r| r.to_string())
            .collect();
        if !odd.is_empty() {
            return Err(CoreError::Device(format!(
                "rank(s) {} resumed a different state than rank 0 (rank 0: step {}; this rank \
                 {}: step {step}): every rank must read the same stage folder — put it on a \
                 filesystem all nodes share",
                odd.join(", "),
                sent[0],
                self.rank()
            )));
        }
        self.broadcast_(params)
    }

    /// The mean over ranks of every tensor (one all-reduce for all of them). A training
    /// step's gradients go through [`World::grad_sync`] instead, in buckets.
    pub fn average_(&self, tensors: &[Tensor]) -> Result<()> {
        if self.group.is_none() || tensors.is_empty() {
            return Ok(());
        }
        let mut flat = flatten(tensors, self.comm);
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
        let mut t = Tensor::from_slice(values).to_device(self.comm);
        self.sum_(&mut t)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
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
        if unsafe { temper_pg_barrier(g) } != 0 {
            return Err(dist_error("barrier failed (did another rank stop?)"));
        }
        Ok(())
    }
}

/// One fp32 vector on `device` holding every tensor, in order.
fn flatten(tensors: &[Tensor], device: Device) -> Tensor {
    let parts: Vec<Tensor> = tensors
        .iter()
        .map(|t| {
            t.detach()
                .to_kind(Kind::Float)
                .to_device(device)
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
pub(super) mod tests {
    use super::*;

    pub(in crate::dist) fn free_port() -> u16 {
        super::super::port_for_tests()
    }

    /// Rank `rank` of `world` Gloo ranks on this machine, meeting at `port`.
    pub(in crate::dist) fn join_local(rank: usize, world: usize, port: u16) -> World {
        let placement = Placement {
            rank,
            world,
            local_rank: rank,
            master: Some(("127.0.0.1".into(), port)),
            backend: None,
        };
        World::join(placement, Duration::from_secs(60), Device::Cpu).unwrap()
    }

    #[test]
    fn two_ranks_sum_broadcast_and_average_through_gloo() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = join_local(rank, 2, port);
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
    fn ranks_that_resumed_different_states_all_stop_naming_the_odd_one() {
        let port = free_port();
        let run = |port: u16, step_of_rank1: u64, weight_of_rank1: f64| {
            let ranks: Vec<_> = (0..2)
                .map(|rank| {
                    std::thread::spawn(move || {
                        let world = join_local(rank, 2, port);
                        let (step, w) = match rank {
                            0 => (10, 0.5),
                            _ => (step_of_rank1, weight_of_rank1),
                        };
                        let p = Tensor::full([4], w, (Kind::Float, Device::Cpu));
                        let r = world.start_together(step, &[p.shallow_clone()]);
                        (
                            r.map_err(|e| e.to_string()),
                            Vec::<f32>::try_from(p).unwrap(),
                        )
                    })
                })
                .collect();
            ranks
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        };
        // The same state: both go on, with rank 0's weights.
        for (r, w) in run(port, 10, 0.5) {
            assert!(r.is_ok(), "{r:?}");
            assert_eq!(w, [0.5; 4]);
        }
        // Rank 1 started afresh (step 0, other weights): both stop, naming rank 1.
        for (r, _) in run(free_port(), 0, 0.25) {
            let err = r.unwrap_err();
            assert!(
                err.contains("rank(s) 1 resumed a different state than rank 0 (rank 0: step 10"),
                "{err}"
            );
        }
        // The same step but other weights (an older save of the same run): stopped too.
        for (r, _) in run(free_port(), 10, 0.25) {
            assert!(r.unwrap_err().contains("rank(s) 1 resumed"));
        }
    }

    #[test]
    fn nccl_is_built_in_wherever_libtorch_has_cuda() {
        // Cargo gives tests the LIBTORCH of .cargo/config.toml: a silent fallback to a build
        // without NCCL (headers missing) would fail here rather than on a GPU cluster.
        let lib = std::path::PathBuf::from(std::env::var("LIBTORCH").unwrap()).join("lib");
        assert_eq!(nccl_built(), lib.join("libtorch_cuda.so").exists());
        if !nccl_built() {
            return;
        }
        // Asked for on the CPU, NCCL is refused before any rendezvous.
        let placement = Placement {
            rank: 0,
            world: 2,
            local_rank: 0,
            master: Some(("127.0.0.1".into(), 1)),
            backend: Some(Backend::Nccl),
        };
        let err = World::join(placement, Duration::from_secs(1), Device::Cpu)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("NCCL joins ranks on GPUs"),
            "{err}"
        );
    }

    #[test]
    fn a_rendezvous_nobody_joins_times_out_naming_the_address() {
        let port = free_port();
        let placement = Placement {
            rank: 1,
            world: 2,
            local_rank: 1,
            master: Some(("127.0.0.1".into(), port)),
            backend: None,
        };
        let started = std::time::Instant::now();
        let err = World::join(placement, Duration::from_secs(2), Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("gloo process group at 127.0.0.1:{port}")),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
}
