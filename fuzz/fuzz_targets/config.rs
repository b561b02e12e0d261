//! Any text as a config file: the loader answers with a config or an error
//! naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = wsguard::config::Config::parse(std::path::Path::new("fuzz.toml"), &text) {
        assert!(e.to_string().starts_with("fuzz.toml"));
    }
});
