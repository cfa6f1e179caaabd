//! Called from the build script of every crate whose binaries or tests link libtorch.
//!
//! torch-sys links `libtorch_cuda.so`, but the linker's default `--as-needed` drops it because
//! no symbol of it is referenced, and CUDA then reports itself unavailable even on a GPU
//! machine. We re-add it after `--no-as-needed`. The rpath is the canonical torch lib folder
//! (the shared cache that scripts/setup.sh fills), so binaries run without LD_LIBRARY_PATH here;
//! on another machine LD_LIBRARY_PATH still wins, because modern linkers write DT_RUNPATH.

use std::path::PathBuf;

pub fn emit_libtorch_link_args() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/setup.sh first");
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
