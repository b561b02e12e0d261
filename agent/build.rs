//! Builds the kernel programs (ebpf/) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. `cargo xtask build` installs what this needs.
//!
//! With `AYA_BUILD_SKIP=1` (what `cargo xtask lint` sets, and what lets
//! `cargo check` and clippy run without the BPF toolchain) an empty stub
//! object stands in; a binary built that way refuses to load programs.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../common/src");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("wsguard");
        std::fs::write(out, [])?;
        return Ok(());
    }
    let ebpf = aya_build::Package {
        name: "wsguard-ebpf",
        root_dir: "../ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly)
}
