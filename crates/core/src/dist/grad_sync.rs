//! A data-parallel step's gradient averaging, in buckets launched while backward still runs
//! (csrc/reducer.cpp, after DDP's Reducer).
//!
//! A stage makes one [`GradSync`] for its optimizer's parameters and, each step, calls
//! [`GradSync::arm_last_backward`] just before the backward pass that completes the step's
//! gradients, then [`GradSync::finish`] before the update. While armed, every bucket whose
//! gradients are final is all-reduced at once, overlapping the backward pass of the layers
//! below; `finish` reduces the rest, waits, and leaves every gradient the mean over the ranks.
//! A step whose gradients come from several backward passes (gradient accumulation's earlier
//! micro-batches, activation checkpointing's block-by-block passes, a separate regulariser)
//! arms only before the last, or not at all: unarmed, `finish` reduces every bucket after
//! backward, which is what [`World::average_`] does.

use std::ffi::{c_int, c_long, c_void};

use tch::Tensor;

use super::{Backend, DistError, World};
use crate::error::Result;

extern "C" {
    fn temper_reducer_new(
        group: *mut c_void,
        params: *const *mut torch_sys::C_tensor,
        n: c_int,
        comm_device: c_int,
        bucket_bytes: c_long,
    ) -> *mut c_void;
    fn temper_reducer_free(handle: *mut c_void);
    fn temper_reducer_arm(handle: *mut c_void);
    fn temper_reducer_finish(handle: *mut c_void) -> c_int;
    fn temper_reducer_buckets(handle: *mut c_void) -> c_int;
    fn temper_reducer_launched_early(handle: *mut c_void) -> c_long;
}

/// The gradient size of one bucket: `TEMPER_DIST_BUCKET_MB` MiB, default 25 (DDP's
/// `bucket_cap_mb`). Larger buckets mean fewer collectives, smaller ones earlier overlap.
pub fn bucket_bytes() -> std::result::Result<i64, DistError> {
    match std::env::var("TEMPER_DIST_BUCKET_MB") {
        Err(_) => Ok(25 << 20),
        Ok(v) => parse_bucket_mb(&v),
    }
}

fn parse_bucket_mb(v: &str) -> std::result::Result<i64, DistError> {
    match v.trim().parse::<f64>() {
        Ok(mb) if mb > 0.0 && mb.is_finite() => Ok((mb * (1 << 20) as f64) as i64),
        _ => Err(DistError::Environment(format!(
            "TEMPER_DIST_BUCKET_MB={v:?} is not a size: give the gradient bucket's size in MiB, \
             e.g. 25"
        ))),
    }
}

/// Whether buckets launch during backward: `TEMPER_DIST_OVERLAP=1` or `0`; by default on with
/// Gloo and off with NCCL, where it has not yet run on a GPU (NCCL's buckets are then reduced
/// after backward).
pub fn overlap_on(backend: Backend) -> std::result::Result<bool, DistError> {
    match std::env::var("TEMPER_DIST_OVERLAP") {
        Err(_) => Ok(backend == Backend::Gloo),
        Ok(v) => parse_overlap(&v),
    }
}

fn parse_overlap(v: &str) -> std::result::Result<bool, DistError> {
    match v.trim() {
        "1" => Ok(true),
        "0" => Ok(false),
        v => Err(DistError::Environment(format!(
            "TEMPER_DIST_OVERLAP={v:?}: use 1 (reduce gradients while backward runs) or 0 \
             (after it)"
        ))),
    }
}

/// See the module's documentation. With one process every call does nothing.
pub struct GradSync {
    handle: Option<*mut c_void>,
    overlap: bool,
    steps: std::cell::Cell<u64>,
}

// SAFETY: the reducer locks its own state; the stage calls it from one thread at a time.
unsafe impl Send for GradSync {}

impl Drop for GradSync {
    fn drop(&mut self) {
        if self.handle.is_some() && self.steps.get() > 0 {
            // How much of the reduction overlapped backward: the line a test (and a user
            // tuning TEMPER_DIST_BUCKET_MB) reads.
            tracing::info!(
                "gradient averaging: {} bucket(s) per step; {} of {} bucket reductions started \
                 while backward ran",
                self.buckets(),
                self.launched_early(),
                self.buckets() as u64 * self.steps.get()
            );
        }
        if let Some(h) = self.handle.take() {
            // SAFETY: made by temper_reducer_new, freed once; removes the hooks it set.
            unsafe { temper_reducer_free(h) }
        }
    }
}

impl World {
    /// The gradient averaging of `params` (the optimizer's, in its fixed order: the same on
    /// every rank, so the buckets match). Sets a hook on each parameter for as long as the
    /// result lives.
    pub fn grad_sync(&self, params: &[Tensor]) -> Result<GradSync> {
        if self.group.is_none() {
            return self.grad_sync_with(params, 0, false);
        }
        let overlap = overlap_on(self.placement.backend_on(self.comm))?;
        let bytes = bucket_bytes()?;
        self.grad_sync_with(params, bytes, overlap)
    }

    fn grad_sync_with(&self, params: &[Tensor], bytes: i64, overlap: bool) -> Result<GradSync> {
        let Some(group) = self.group else {
            return Ok(GradSync {
                handle: None,
                overlap: false,
                steps: Default::default(),
            });
        };
        let ptrs: Vec<*mut torch_sys::C_tensor> =
            params.iter().map(|p| p.as_ptr() as *mut _).collect();
        let device = match self.comm {
            tch::Device::Cuda(n) => n as c_int,
            _ => -1,
        };
        // SAFETY: live tensor handles for the call; the reducer keeps its own references.
        let handle = unsafe {
            temper_reducer_new(
                group,
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                device,
                bytes as c_long,
            )
        };
        if handle.is_null() {
            return Err(super::world::dist_error(
                "could not set up gradient averaging",
            ));
        }
        Ok(GradSync {
            handle: Some(handle),
            overlap,
            steps: Default::default(),
        })
    }
}

impl GradSync {
    /// The next backward pass completes this step's gradients, and reaches each parameter at
    /// most once: its buckets are reduced while it runs (where overlap is on).
    pub fn arm_last_backward(&self) {
        if let (Some(h), true) = (self.handle, self.overlap) {
            // SAFETY: a live reducer.
            unsafe { temper_reducer_arm(h) }
        }
    }

    /// Every gradient the mean over the ranks (missing ones count as zeros and are set).
    pub fn finish(&self) -> Result<()> {
        let Some(h) = self.handle else { return Ok(()) };
        // SAFETY: a live reducer.
        if unsafe { temper_reducer_finish(h) } != 0 {
            return Err(super::world::dist_error(
                "gradient all-reduce failed (did another rank stop?)",
            ));
        }
        self.steps.set(self.steps.get() + 1);
        Ok(())
    }

    /// How many buckets the parameters make (0 with one process).
    pub fn buckets(&self) -> usize {
        // SAFETY: a live reducer.
        self.handle
            .map_or(0, |h| unsafe { temper_reducer_buckets(h) } as usize)
    }

    /// Buckets launched while a backward pass ran, so far.
    pub fn launched_early(&self) -> u64 {
        // SAFETY: a live reducer.
        self.handle
            .map_or(0, |h| unsafe { temper_reducer_launched_early(h) } as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::world::tests::{free_port, join_local};
    use super::*;
    use tch::{Device, Kind};

    fn params() -> Vec<Tensor> {
        [vec![3], vec![2, 2], vec![5]]
            .iter()
            .map(|shape| {
                Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu))
                    .view(shape.as_slice())
                    .set_requires_grad(true)
            })
            .collect()
    }

    /// Two micro-batches: the first reaches the first two parameters, the second (rank 0
    /// only: rank 1's share is empty) the first and the last, with rank-dependent weights.
    fn step(rank: usize, p: &[Tensor], before_last: impl Fn()) {
        let w = rank as f64 + 1.0;
        ((&p[0] * w).sum(Kind::Float) + (&p[1] * (2.0 * w)).sum(Kind::Float)).backward();
        before_last();
        if rank == 0 {
            ((&p[0] * &p[0]).sum(Kind::Float) * w + (&p[2] * w).sum(Kind::Float)).backward();
        }
    }

    fn grads(p: &[Tensor]) -> Vec<Vec<f32>> {
        p.iter()
            .map(|t| Vec::<f32>::try_from(t.grad().reshape([-1])).unwrap())
            .collect()
    }

    #[test]
    fn buckets_reduced_during_backward_give_the_mean_of_average_() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = join_local(rank, 2, port);
                    // Every parameter its own bucket (8 bytes), overlap on.
                    let p = params();
                    let sync = world.grad_sync_with(&p, 8, true).unwrap();
                    step(rank, &p, || sync.arm_last_backward());
                    // Rank 1 never reached the last parameter: zeros count for it.
                    sync.finish().unwrap();
                    let overlapped = (grads(&p), sync.buckets(), sync.launched_early());
                    // The same step through `average_`, after backward.
                    let q = params();
                    step(rank, &q, || {});
                    if !q[2].grad().defined() {
                        // what ensure_gradients does for the stages
                        (&q[2] * 0.0).sum(Kind::Float).backward();
                    }
                    world
                        .average_(&q.iter().map(|t| t.grad()).collect::<Vec<_>>())
                        .unwrap();
                    (overlapped, grads(&q))
                })
            })
            .collect();
        for (rank, r) in ranks.into_iter().enumerate() {
            let ((got, buckets, early), want) = r.join().unwrap();
            assert_eq!(got, want, "rank {rank}");
            assert_eq!(buckets, 3);
            // Buckets go in reverse order: the last parameter's bucket is complete once rank
            // 0's second pass reaches it; the middle one (reached only by the first,
            // unarmed, pass) holds back the first until `finish`.
            assert_eq!(early, if rank == 0 { 1 } else { 0 }, "rank {rank}");
        }
        // By hand: rank 0's gradients are p0: 1 + 2·p0, p1: 2, p2: 1; rank 1's p0: 2,
        // p1: 4, p2: 0 (none); their means:
        let p0: Vec<f32> = (0..3).map(|i| (1.0 + 2.0 * i as f32 + 2.0) / 2.0).collect();
        let port = free_port();
        let got = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|rank| {
                    s.spawn(move || {
                        let world = join_local(rank, 2, port);
                        let p = params();
                        let sync = world.grad_sync_with(&p, 1 << 20, true).unwrap();
                        step(rank, &p, || sync.arm_last_backward());
                        sync.finish().unwrap();
                        grads(&p)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for g in got {
            assert_eq!(
                g,
                vec![p0.clone(), vec![3.0; 4], vec![0.5; 5]],
                "one bucket"
            );
        }
    }

    #[test]
    fn a_second_gradient_after_arming_is_an_error_not_a_wrong_mean() {
        let world = join_local(0, 1, free_port());
        let p = params();
        let sync = world.grad_sync_with(&p, 8, true).unwrap();
        sync.arm_last_backward();
        p[2].sum(Kind::Float).backward();
        p[2].sum(Kind::Float).backward();
        let err = sync.finish().unwrap_err().to_string();
        assert!(err.contains("second gradient"), "{err}");
        // The reducer is usable again after the error.
        sync.finish().unwrap();
    }

    #[test]
    fn the_first_bucket_is_small_so_that_communication_starts_early() {
        let world = join_local(0, 1, free_port());
        // Three 1.2 MB parameters under 25 MiB buckets: the last one alone in a first bucket
        // capped at 1 MiB (as DDP), the other two together.
        let p: Vec<Tensor> = (0..3)
            .map(|_| Tensor::zeros([300_000], (Kind::Float, Device::Cpu)).set_requires_grad(true))
            .collect();
        let sync = world.grad_sync_with(&p, 25 << 20, true).unwrap();
        assert_eq!(sync.buckets(), 2);
    }

    #[test]
    fn bad_settings_are_refused_with_the_variable_named() {
        let msg = parse_bucket_mb("abc").unwrap_err().to_string();
        assert!(msg.contains("TEMPER_DIST_BUCKET_MB"), "{msg}");
        let msg = parse_overlap("yes").unwrap_err().to_string();
        assert!(msg.contains("TEMPER_DIST_OVERLAP"), "{msg}");
        assert_eq!(parse_bucket_mb("0.5"), Ok(1 << 19));
        assert_eq!(parse_overlap("0"), Ok(false));
    }
}
