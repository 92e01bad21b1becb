//! The config reader and validator: any config file (see hexgate::fuzz::check_config).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hexgate::fuzz::check_config(&String::from_utf8_lossy(data));
});
