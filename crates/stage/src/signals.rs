//! SIGINT, SIGTERM and SIGHUP, the signals a terminal, `docker stop` and Slurm send.
//!
//! The first one sets a flag that training loops poll at step boundaries: they save their state
//! and exit with 130, so a stop loses no finished step. A second one ends the process at once,
//! after SIGKILLing any child process groups registered here (the orchestrator's running
//! stages). The handler only touches atomics and calls async-signal-safe functions.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

static RECEIVED: AtomicUsize = AtomicUsize::new(0);
const MAX_GROUPS: usize = 256;
static GROUPS: [AtomicI32; MAX_GROUPS] = [const { AtomicI32::new(0) }; MAX_GROUPS];

extern "C" fn on_signal(_sig: libc::c_int) {
    if RECEIVED.fetch_add(1, Ordering::SeqCst) >= 1 {
        for g in &GROUPS {
            let pgid = g.load(Ordering::SeqCst);
            if pgid > 0 {
                // SAFETY: kill(2) is async-signal-safe.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        // SAFETY: _exit(2) is async-signal-safe; exit(3) is not.
        unsafe { libc::_exit(crate::EXIT_INTERRUPTED) };
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP. Idempotent.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a plain sigaction with a handler that only uses async-signal-safe calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    RECEIVED.load(Ordering::SeqCst) > 0
}

/// Registers a child's process group so that a second signal kills it with us.
pub fn register_group(pgid: i32) {
    for g in &GROUPS {
        if g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

pub fn unregister_group(pgid: i32) {
    for g in &GROUPS {
        let _ = g.compare_exchange(pgid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Sends `sig` to process group `pgid` (a child started with `process_group(0)`).
pub fn signal_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a negative pid addresses a process group; errors (already gone)
    // are harmless.
    unsafe { libc::kill(-pgid, sig) };
}

/// For `Command::pre_exec` in a child: ask the kernel to send SIGTERM when the parent dies
/// (kill -9 of the orchestrator included), and leave at once if it already has.
pub fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl and getppid are async-signal-safe and valid between fork and exec.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            libc::_exit(crate::EXIT_INTERRUPTED);
        }
    }
    Ok(())
}
