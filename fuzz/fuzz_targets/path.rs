//! The path normaliser: any request path (see hexgate::fuzz::check_path for the properties).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        hexgate::fuzz::check_path(path);
    }
});
