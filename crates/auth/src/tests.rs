use super::*;

#[test]
fn cache_respects_exp_and_generation() {
    let cache = cache::TokenCache::new();
    let id = Arc::new(Identity {
        consumer: Arc::from("a"),
        headers: Vec::new(),
        scopes: Vec::new(),
        plan: None,
        key_id: None,
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

/// Token expiry on an injected clock: verified and cached, then refused once the clock passes
/// `exp`, with no sleeping.
#[tokio::test]
async fn expiry_follows_the_injected_clock() {
    let (private, public) = tools::generate(Alg::EdDSA).unwrap();
    let signing = tools::SigningKey::from_pem(&private).unwrap();
    let keys = keys::from_pem(&public, "t").unwrap();
    let cfg = Authentication {
        enabled: true,
        algorithms: vec!["EdDSA".into()],
        consumer_claim: "sub".into(),
        require_exp: true,
        ..Default::default()
    };
    let clock = hexgate_http::clock::ManualClock::new(1_800_000_000 * 1_000_000);
    let auth = Authenticator::new(
        &cfg,
        Fingerprint::default(),
        keys,
        Arc::new(Registry::default()),
    )
    .with_clock(Clock::Manual(clock.clone()));
    let token = tools::sign_token(
        &signing,
        Alg::EdDSA,
        None,
        &serde_json::json!({"sub": "alice", "exp": 1_800_000_100u64}),
    )
    .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    assert_eq!(
        &*auth.authenticate(&headers).await.unwrap().consumer,
        "alice"
    );
    clock.advance_us(99 * 1_000_000);
    assert!(
        auth.authenticate(&headers).await.is_ok(),
        "cached, still valid"
    );
    clock.advance_us(1_000_000);
    assert!(
        matches!(
            auth.authenticate(&headers).await,
            Err(AuthError::Token(TokenError::Expired))
        ),
        "expired at exp, from the cache"
    );
}

#[test]
fn scopes_come_from_scope_or_scp() {
    let claims = |j: &str| match serde_json::from_str(j) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => panic!("{j}"),
    };
    assert_eq!(scopes_of(&claims(r#"{"scope":"a b  c"}"#)), ["a", "b", "c"]);
    assert_eq!(scopes_of(&claims(r#"{"scp":["a","b",3]}"#)), ["a", "b"]);
    assert_eq!(scopes_of(&claims(r#"{"scp":"a b"}"#)), ["a", "b"]);
    assert!(scopes_of(&claims(r#"{"scope":7}"#)).is_empty());
    let id = Identity {
        consumer: Arc::from("c"),
        headers: Vec::new(),
        scopes: vec!["a".into(), "b".into()],
        plan: None,
        key_id: None,
    };
    let need = ["a".to_string(), "c".to_string(), "d".to_string()];
    assert_eq!(id.missing_scopes(&need), ["c", "d"]);
}
