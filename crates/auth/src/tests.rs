use super::*;

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
