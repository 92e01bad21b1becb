//! The header-field policy: any set of header names, split on newlines (see
//! hexgate::fuzz::check_header_names).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    hexgate::fuzz::check_header_names(&names);
});
