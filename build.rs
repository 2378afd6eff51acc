// Builds kernels/ext.cpp against the venv's libtorch headers and the CUDA kernels (KERNELS) with the venv's nvcc (into
// one archive), and embeds an rpath to torch/lib and the CUDA runtime beside it, so that `cargo run`/`cargo test` need
// no LD_LIBRARY_PATH. The tag is RUNPATH: LD_LIBRARY_PATH still wins on the GPU box. No GPU is needed to build.
use std::path::{Path, PathBuf};

const KERNELS: [&str; 4] =
    ["kernels/tau_attn.cu", "kernels/softcap_ce.cu", "kernels/block_ops.cu", "kernels/tau_bias.cu"];

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/ext.cpp");
    println!("cargo:rerun-if-changed=kernels/mma_bf16.cuh"); // included by the .cu files
    println!("cargo:rerun-if-changed=kernels/launchers.h"); // included by the .cu files and ext.cpp
    for k in KERNELS {
        println!("cargo:rerun-if-changed={k}");
    }
    println!("cargo:rerun-if-changed=Cargo.lock");
    let torch = std::env::var("LIBTORCH").expect("LIBTORCH unset: run ./run.sh setup (it makes .venv/torch)");
    let torch = std::fs::canonicalize(&torch).expect("LIBTORCH points nowhere: run ./run.sh setup");
    // c10d's NCCL group needs the CUDA runtime, CCCL and NCCL headers: PyPI's nvidia-* wheels beside torch.
    let cu = torch.join("../nvidia/cu13/include");
    let cudart = torch.join("../nvidia/cu13/lib");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .flag("-Wno-interference-size")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(&cu)
        .include(cu.join("cccl"))
        .include(torch.join("../nvidia/nccl/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_NCCL", None)
        .file("kernels/ext.cpp");
    for k in KERNELS {
        build.object(nvcc(&torch, k));
    }
    build.compile("train_gpt_ext");
    println!("cargo:rustc-link-search=native={}", torch.join("lib").display());
    println!("cargo:rustc-link-search=native={}", cudart.display());
    for lib in ["torch_cuda", "torch_cpu", "c10_cuda", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13"); // the runtime torch's CUDA 13 wheel ships
    for dir in [torch.join("lib"), cudart] {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    println!("cargo:rustc-env=TRAIN_GPT_RUSTC={}", command_line(&std::env::var("RUSTC").unwrap_or("rustc".into())));
    println!("cargo:rustc-env=TRAIN_GPT_TCH={}", locked_version(Path::new("Cargo.lock"), "tch"));
}

// Compiles a .cu file for the H200 (sm_90) with nvcc from the venv (pip's nvidia-cuda-nvcc, beside torch); returns
// the object. No --use_fast_math: a kernel that takes fast intrinsics says where and why (softcap_ce.cu); elsewhere
// expf/logf match torch to fp32 rounding.
fn nvcc(torch: &Path, src: &str) -> PathBuf {
    let nvcc = torch.join("../nvidia/cu13/bin/nvcc");
    assert!(nvcc.exists(), "{} missing: run ./run.sh setup (it installs cuda-toolkit[nvcc])", nvcc.display());
    let obj =
        PathBuf::from(std::env::var("OUT_DIR").unwrap()).join(Path::new(src).with_extension("o").file_name().unwrap());
    let status = std::process::Command::new(&nvcc)
        .args(["-c", src, "-o"])
        .arg(&obj)
        .args([
            "-gencode=arch=compute_90,code=sm_90",
            "-std=c++17",
            "-O3",
            "-Xcompiler",
            "-fPIC",
            "-D_GLIBCXX_USE_CXX11_ABI=1",
        ])
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {src}");
    obj
}

fn command_line(rustc: &str) -> String {
    let out = std::process::Command::new(rustc).arg("--version").output().expect("rustc --version");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// The version Cargo.lock pins for a crate, so the log names what was really linked.
fn locked_version(lock: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l == format!("name = \"{name}\"") {
            if let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = \"")) {
                return v.trim_end_matches('"').to_string();
            }
        }
    }
    "unknown".into()
}
