//! Builds the kernel programs (ebpf/) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. `cargo xtask build` installs what this needs.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../common/src");
    let ebpf = aya_build::Package {
        name: "wsguard-ebpf",
        root_dir: "../ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly)
}
