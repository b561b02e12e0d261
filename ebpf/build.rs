//! Fails early with a clear message when bpf-linker is missing
//! (`cargo xtask` installs it).
fn main() {
    if which::which("bpf-linker").is_err() {
        panic!(
            "bpf-linker not found in PATH: run `cargo xtask build`, which installs bpf-linker 0.10.0"
        );
    }
}
