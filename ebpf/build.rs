//! Fails early with a clear message when bpf-linker is missing
//! (`cargo xtask` installs it), and keeps the kfuncs the programs call as
//! external symbols: without `--export`, bpf-linker internalizes their
//! declarations and LLVM then drops the arguments of the calls.
fn main() {
    if which::which("bpf-linker").is_err() {
        panic!(
            "bpf-linker not found in PATH: run `cargo xtask build`, which installs bpf-linker 0.10.0"
        );
    }
    println!("cargo:rustc-link-arg=--export=bpf_sk_assign_tcp_reqsk");
}
