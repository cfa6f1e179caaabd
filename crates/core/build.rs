// Compiles the small C++ shim (bf16 autocast, fused AdamW: libtorch calls tch does not expose)
// and adds the link flags that make our test binaries find libtorch and CUDA.
use std::path::PathBuf;

fn main() {
    temper_link::emit_libtorch_link_args();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/nccl.cpp");
    println!("cargo:rerun-if-changed=csrc/reducer.cpp");
    println!("cargo:rerun-if-changed=csrc/guarded.h");
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
    let mut dist = shim_build(&include);
    dist.define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None)
        .file("csrc/dist.cpp")
        .file("csrc/nccl.cpp")
        .file("csrc/reducer.cpp");
    let nccl = nccl_headers(&libtorch);
    if let Some(dirs) = &nccl {
        dist.define("TEMPER_WITH_NCCL", None).includes(dirs);
    } else {
        println!(
            "cargo:warning=building without NCCL (libtorch has no CUDA, or its headers are missing: run scripts/setup.sh); data parallelism on GPUs will refuse to start"
        );
    }
    dist.compile("temper_dist");
    if nccl.is_some() {
        // ProcessGroupNCCL and CUDA's device calls live in these two; both ship in the wheel.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

/// The include folders ProcessGroupNCCL.hpp needs beyond libtorch's: nccl.h (the wheel's
/// nvidia-nccl) and CUDA 13's runtime, crt and cccl headers (the nvidia-cuda-crt and
/// nvidia-cuda-cccl wheels scripts/setup.sh installs beside it). None where libtorch has no
/// CUDA or a header is missing.
fn nccl_headers(libtorch: &std::path::Path) -> Option<Vec<PathBuf>> {
    if !libtorch.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    // torch/ sits in site-packages beside nvidia/.
    let nvidia = libtorch.canonicalize().ok()?.parent()?.join("nvidia");
    let dirs = vec![nvidia.join("nccl/include"), nvidia.join("cu13/include")];
    let needed = [
        dirs[0].join("nccl.h"),
        dirs[1].join("cuda_runtime_api.h"),
        dirs[1].join("crt/host_config.h"),
        dirs[1].join("nv/target"),
    ];
    needed.iter().all(|f| f.exists()).then_some(dirs)
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
