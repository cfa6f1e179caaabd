// Compiles the small C++ shim (bf16 autocast, fused AdamW: libtorch calls tch does not expose)
// and adds the link flags that make our test binaries find libtorch and CUDA.
use std::path::PathBuf;

fn main() {
    temper_link::emit_libtorch_link_args();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        panic!("LIBTORCH is not set: run scripts/setup.sh, which installs torch 2.11.0");
    };
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .file("csrc/shim.cpp")
        .compile("temper_shim");
}
