// Compiles the small C++ shim (bf16 autocast, fused AdamW: libtorch calls tch does not expose)
// and adds the link flags that make our test binaries find libtorch and CUDA.
use std::path::PathBuf;

fn main() {
    temper_link::emit_libtorch_link_args();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        panic!("LIBTORCH is not set: run scripts/setup.sh, which installs torch 2.11.0");
    };
    let include = libtorch.join("include");
    shim_build(&include)
        .file("csrc/shim.cpp")
        .compile("temper_shim");
    // c10d (Gloo): ProcessGroupGloo.hpp includes gloo's headers, which the torch wheel lacks;
    // scripts/setup.sh installs Debian's libgloo-dev for them (headers only: nothing links
    // against its library, every symbol comes from libtorch_cpu).
    if !std::path::Path::new("/usr/include/gloo/config.h").exists() {
        panic!("gloo's headers are missing (/usr/include/gloo): run scripts/setup.sh, which installs Debian's libgloo-dev");
    }
    shim_build(&include)
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None)
        .file("csrc/dist.cpp")
        .compile("temper_dist");
}

/// A C++17 build against libtorch's headers, with the ABI the wheel was built with.
fn shim_build(include: &std::path::Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1");
    build
}
