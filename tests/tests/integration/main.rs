//! Every integration test, one binary: the real programs in the running
//! kernel, test hosts in network namespaces. `cargo xtask test` runs it one
//! test at a time (`--test-threads=1`): the namespace tests flood, time and
//! measure, and must not share the machine with each other.

mod cli;
mod enforcement;
mod evasion;
mod fast_path;
mod fleet;
mod full_maps;
mod fuzz_packets;
mod handshake;
mod handshake_kernel;
mod observability;
mod operations;
mod packaging;
mod reload;
mod soak;
mod source_table;
mod syn_cookies;
mod users;
mod users_kernel;
mod xdp_verdicts;
