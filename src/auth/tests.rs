use super::*;
use base64::Engine as _;

/// Mutation fuzzing of the token path, bounded: no panic, and no altered token is ever accepted.
#[test]
fn mutated_tokens_never_verify_and_never_panic() {
    let target = crate::fuzz::TokenTarget::new();
    assert!(target.verify(&target.token).is_ok());
    let bytes = target.token.as_bytes().to_vec();
    let budget = crate::fuzz::Budget::from_env(20_000);
    let mut rng = fastrand::Rng::with_seed(budget.seed);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}\"";
    let mut case = 0;
    while budget.more(case) {
        case += 1;
        let mut m = bytes.clone();
        match rng.u8(0..4) {
            0 => {
                let i = rng.usize(..m.len());
                m[i] = alphabet[rng.usize(..alphabet.len())];
            }
            1 => {
                let i = rng.usize(..m.len());
                m.truncate(i);
            }
            2 => {
                let i = rng.usize(..m.len());
                m.insert(i, alphabet[rng.usize(..alphabet.len())]);
            }
            _ => {
                let i = rng.usize(..m.len());
                let j = rng.usize(..m.len());
                m.swap(i, j);
            }
        }
        let Ok(s) = String::from_utf8(m) else {
            continue;
        };
        crate::fuzz::case(budget.seed, &s, || target.check(&s));
    }
    eprintln!("tokens: {case} mutated tokens, seed {}", budget.seed);
}

#[test]
fn algorithm_confusion_is_refused() {
    let target = crate::fuzz::TokenTarget::new();
    let claims =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"x","exp":9999999999}"#);
    for alg in ["none", "HS256", "HS512", "RS256", "ES256"] {
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"alg":"{alg}"}}"#));
        let t = format!("{header}.{claims}.AAAA");
        assert!(target.verify(&t).is_err(), "{alg} accepted");
    }
}

#[test]
fn cache_respects_exp_and_generation() {
    let cache = cache::TokenCache::new();
    let id = Arc::new(Identity {
        consumer: Arc::from("a"),
        headers: Vec::new(),
    });
    cache.insert("tok", 1, Some(100), id);
    assert!(cache.get("tok", 1, 99, Duration::ZERO).unwrap().is_some());
    assert!(
        cache.get("tok", 2, 99, Duration::ZERO).unwrap().is_none(),
        "other key generation"
    );
    assert_eq!(
        cache.get("tok", 1, 100, Duration::ZERO).unwrap_err(),
        TokenError::Expired
    );
    assert!(
        cache.get("tok", 1, 50, Duration::ZERO).unwrap().is_none(),
        "expired entry removed"
    );
}
