//! Bindings to csrc/shim.cpp. Every function here is wrapped by a safe one elsewhere.

use std::ffi::{c_char, c_int, CStr};

use torch_sys::C_tensor;

extern "C" {
    fn temper_last_error() -> *const c_char;
    pub(crate) fn temper_autocast_enter(device: c_int, bf16: c_int) -> c_int;
    pub(crate) fn temper_autocast_exit(device: c_int, prev: c_int);
    pub(crate) fn temper_autocast_set(device: c_int, enabled: c_int) -> c_int;
    pub(crate) fn temper_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        steps: *const *const C_tensor,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> c_int;
}

/// The message of the last failed shim call on this thread.
pub(crate) fn last_error() -> String {
    // SAFETY: the shim returns a pointer to a thread-local, NUL-terminated std::string buffer
    // that stays valid until the next failing call on this thread; we copy it out at once.
    unsafe { CStr::from_ptr(temper_last_error()) }
        .to_string_lossy()
        .into_owned()
}
