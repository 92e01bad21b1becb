//! Host canonicalisation: any Host header or `:authority` (see hexgate::fuzz::check_host).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hexgate::fuzz::check_host(data);
});
