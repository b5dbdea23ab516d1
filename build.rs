//! Build script: only with `--features tch`, compiles `src/kernels/torch_shim.cpp` against the
//! libtorch that torch-sys located (torch-sys passes its library folder as
//! `DEP_TCH_LIBTORCH_LIB`; the headers sit beside it in every libtorch layout, the standalone
//! archive and the one inside a PyTorch wheel). torch-sys already compiles C++ against the same
//! headers, so the feature needs no toolchain it did not need before. The default build runs
//! nothing here.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "tch")]
    torch_shim();
}

#[cfg(feature = "tch")]
fn torch_shim() {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed=src/kernels/torch_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report its libtorch folder (DEP_TCH_LIBTORCH_LIB)"),
    );
    let root = lib.parent().expect("libtorch lib folder has a parent");
    let include = root.join("include");
    assert!(
        include.join("ATen").join("ATen.h").exists(),
        "no ATen/ATen.h under {}: is {} a libtorch lib folder?",
        include.display(),
        lib.display()
    );
    // PyTorch wheels and libtorch archives since 2.7 are built with the C++11 ABI; the same
    // variable torch-sys reads overrides it.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/kernels/torch_shim.cpp")
        .compile("convlab_torch_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
