//! The token verifier against a fixed key (see hexgate::fuzz::TokenTarget). Each input is tried
//! as a token by itself, and spliced into the valid token (the first two bytes choose where and
//! how much to replace), so the search starts next to a token that verifies.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static TARGET: OnceLock<hexgate::fuzz::TokenTarget> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let target = TARGET.get_or_init(hexgate::fuzz::TokenTarget::new);
    if let Ok(token) = std::str::from_utf8(data) {
        target.check(token);
    }
    if let [at, len, rest @ ..] = data {
        let valid = target.token.as_bytes();
        let at = usize::from(*at) * valid.len() / 256;
        let end = (at + usize::from(*len)).min(valid.len());
        let mut spliced = valid[..at].to_vec();
        spliced.extend_from_slice(rest);
        spliced.extend_from_slice(&valid[end..]);
        if let Ok(token) = String::from_utf8(spliced) {
            target.check(&token);
        }
    }
});
