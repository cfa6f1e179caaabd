//! Where the model runs and in what precision. CPU fp32 is the default (and what the parity
//! tests use); `auto` picks CUDA when libtorch sees a GPU; bf16 runs matmuls under autocast
//! while parameters, optimizer state and losses stay fp32; precision `auto` is bf16 where the
//! hardware has it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::{CoreError, Result};
use crate::ffi;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Auto,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: use cpu, auto, cuda or cuda:N")),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Auto => write!(f, "auto"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device a spec names on this machine; asking for CUDA where there is none is an error.
pub fn resolve_device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(Device::cuda_if_available()),
        DeviceSpec::Cuda(n) => {
            let count = tch::Cuda::device_count() as usize;
            if n < count {
                Ok(Device::Cuda(n))
            } else {
                Err(CoreError::Device(format!(
                    "cuda:{n} requested but libtorch sees {count} CUDA device(s); use `device: auto` or `cpu`"
                )))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    /// The default: bf16 where the hardware computes it natively — CUDA, or a CPU with
    /// AVX512-BF16 or AMX — and fp32 elsewhere; the choice is logged once.
    #[default]
    Auto,
}

impl Precision {
    /// The precision used on `device`: `auto` resolved, the others as they are.
    pub fn on(self, device: Device) -> Precision {
        if self != Precision::Auto {
            return self;
        }
        // Decided (and logged) once per kind of device.
        static ON_CPU: std::sync::OnceLock<(bool, &'static str)> = std::sync::OnceLock::new();
        static ON_CUDA: std::sync::OnceLock<(bool, &'static str)> = std::sync::OnceLock::new();
        let cuda = device.is_cuda();
        let chosen = if cuda { &ON_CUDA } else { &ON_CPU };
        let (bf16, _) = *chosen.get_or_init(|| {
            let forced = std::env::var(temper_stage::AUTO_PRECISION_VAR).ok();
            if let Some(other) = forced.as_deref().filter(|f| !matches!(*f, "fp32" | "bf16")) {
                tracing::warn!("TEMPER_AUTO_PRECISION=`{other}` ignored: it takes fp32 or bf16");
            }
            let choice = match (forced.as_deref(), cuda, cpu_bf16()) {
                (Some("bf16"), _, _) => (true, "TEMPER_AUTO_PRECISION=bf16"),
                (Some("fp32"), _, _) => (false, "TEMPER_AUTO_PRECISION=fp32"),
                (_, true, _) => (true, "CUDA"),
                (_, false, Some(flag)) => (true, flag),
                (_, false, None) => (false, "this CPU has neither avx512_bf16 nor amx_bf16"),
            };
            tracing::info!(
                "precision auto: {} ({})",
                if choice.0 { "bf16 autocast" } else { "fp32" },
                choice.1
            );
            choice
        });
        if bf16 {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }
}

/// The CPU feature that makes bf16 matmuls native here, if any (from /proc/cpuinfo).
fn cpu_bf16() -> Option<&'static str> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if has("amx_bf16") {
        Some("this CPU has amx_bf16")
    } else if has("avx512_bf16") {
        Some("this CPU has avx512_bf16")
    } else {
        None
    }
}

/// Runs `f` with autocast on `device` when `precision` asks for bf16. Autocast, not bf16
/// weights: master weights and AdamW moments stay fp32, as with `torch.autocast`.
pub fn with_autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> Result<T> {
    if precision.on(device) == Precision::Fp32 {
        return Ok(f());
    }
    let device_code = if device.is_cuda() { 1 } else { 0 };
    // SAFETY: plain C call into libtorch's thread-local autocast state.
    let prev = unsafe { ffi::temper_autocast_enter(device_code, 1) };
    if prev < 0 {
        return Err(CoreError::Native(ffi::last_error()));
    }
    // Restore on every path, panics included, so autocast never leaks into later code.
    struct Restore(i32, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: pairs the successful enter above on the same thread.
            unsafe { ffi::temper_autocast_exit(self.0, self.1) }
        }
    }
    let _restore = Restore(device_code, prev);
    Ok(f())
}

/// Runs `f` with autocast off on the CPU (for ops that must see the precision they are given),
/// restoring the previous setting afterwards, panics included. The cast-weight cache survives.
pub(crate) fn outside_cpu_autocast<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain C calls on libtorch's thread-local autocast flag, paired on this thread.
    let prev = unsafe { ffi::temper_autocast_set(0, 0) };
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe { ffi::temper_autocast_set(0, self.0) };
        }
    }
    let _restore = Restore(prev);
    f()
}

/// Refuses a job whose estimated memory exceeds the machine's (CPU: physical memory). On CUDA
/// the estimate is not checked here: libtorch reports an out-of-memory error on its own.
pub fn check_memory(device: Device, bytes: f64, what: &str) -> std::result::Result<(), String> {
    if device.is_cuda() {
        return Ok(());
    }
    match temper_stage::footprint::total_bytes() {
        Some(total) => temper_stage::footprint::check_fits(bytes, total, what),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    fn matmul_kind() -> Kind {
        let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        a.matmul(&a).kind()
    }

    #[test]
    fn outside_cpu_autocast_runs_in_the_given_precision_and_restores_autocast_even_on_panic() {
        with_autocast(Device::Cpu, Precision::Bf16, || {
            assert_eq!(matmul_kind(), Kind::BFloat16, "autocast is on");
            assert_eq!(outside_cpu_autocast(matmul_kind), Kind::Float);
            assert_eq!(matmul_kind(), Kind::BFloat16, "restored after");
            let panicked = std::panic::catch_unwind(|| {
                outside_cpu_autocast(|| panic!("inside"));
            });
            assert!(panicked.is_err());
            assert_eq!(matmul_kind(), Kind::BFloat16, "restored after a panic");
        })
        .unwrap();
        // Outside any autocast region it changes nothing, and leaves autocast off.
        assert_eq!(outside_cpu_autocast(matmul_kind), Kind::Float);
        assert_eq!(matmul_kind(), Kind::Float);
    }
}
