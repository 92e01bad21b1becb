use super::*;

const S: u64 = 1_000_000;

#[test]
fn gcra_seed_example_three_then_429_then_one_per_second() {
    let store = MemoryStore::default();
    let g = Gcra::new(1.0, 3);
    let t0 = 1_000 * S;
    let d: Vec<bool> = (0..4).map(|_| store.rate("ip", &g, t0).allowed).collect();
    assert_eq!(d, vec![true, true, true, false]);
    let refused = store.rate("ip", &g, t0);
    assert_eq!(refused.retry_after_us, S, "next slot in one second");
    assert!(!store.rate("ip", &g, t0 + S - 1).allowed);
    assert!(store.rate("ip", &g, t0 + S).allowed);
    assert!(!store.rate("ip", &g, t0 + S).allowed);
    assert!(store.rate("ip", &g, t0 + 2 * S).allowed);
    // After a long pause the full burst is back.
    let later = t0 + 100 * S;
    let d: Vec<bool> = (0..4)
        .map(|_| store.rate("ip", &g, later).allowed)
        .collect();
    assert_eq!(d, vec![true, true, true, false]);
}

#[test]
fn gcra_remaining_counts_down() {
    let store = MemoryStore::default();
    let g = Gcra::new(1.0, 3);
    let r: Vec<u64> = (0..3)
        .map(|_| store.rate("k", &g, 5 * S).remaining)
        .collect();
    assert_eq!(r, vec![2, 1, 0]);
    assert_eq!(
        store.rate("other", &g, 5 * S).remaining,
        2,
        "keys are independent"
    );
}

#[test]
fn quota_never_exceeds_limit_in_any_window_and_refusals_are_free() {
    let store = MemoryStore::default();
    let w = Window::new(5, Duration::from_secs(60));
    let t0 = 10_000 * S;
    let mut admitted = Vec::new();
    // Two requests in the same microsecond are two requests.
    for _ in 0..2 {
        assert!(store.quota("alice", &w, t0).allowed);
        admitted.push(t0);
    }
    for i in 0..3 {
        let t = t0 + (i + 1) * 10 * S;
        assert!(store.quota("alice", &w, t).allowed);
        admitted.push(t);
    }
    // Limit reached: refused, repeatedly, and refusals do not extend the wait.
    for k in 0..50 {
        assert!(!store.quota("alice", &w, t0 + 31 * S + k * S / 10).allowed);
    }
    // The first two leave the window 60s (+ at most one bucket width) after t0.
    let width = w.width_us();
    assert!(
        !store.quota("alice", &w, t0 + 60 * S - 1).allowed,
        "never more than limit"
    );
    let mut t = t0 + 60 * S;
    while !store.quota("alice", &w, t).allowed {
        t += width / 4;
        assert!(
            t <= t0 + 60 * S + width,
            "refused later than the documented bound"
        );
    }
    admitted.push(t);
    // Check the invariant over every window ending at an admission.
    for &end in &admitted {
        let n = admitted
            .iter()
            .filter(|&&a| a + 60 * S > end && a <= end)
            .count();
        assert!(n <= 5, "{n} admitted in the window ending at {end}");
    }
    assert!(store.quota("bob", &w, t).allowed, "per-consumer isolation");
}

#[test]
fn quota_brute_force_invariant() {
    // Random arrival times: the sliding-window invariant holds everywhere.
    let store = MemoryStore::default();
    let w = Window::new(7, Duration::from_secs(10));
    let mut t = 50 * S;
    let mut admitted = Vec::new();
    let mut rng = 12345u64;
    for _ in 0..5000 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        t += (rng >> 33) % (S / 2);
        if store.quota("k", &w, t).allowed {
            admitted.push(t);
        }
    }
    for (i, &end) in admitted.iter().enumerate() {
        let n = admitted[..=i].iter().filter(|&&a| a + 10 * S > end).count();
        assert!(n <= 7, "{n} in a window");
    }
    // And it is not wildly conservative: roughly limit per period over the run.
    let span = (t - 50 * S) as f64 / (10 * S) as f64;
    assert!(
        admitted.len() as f64 >= span * 7.0 * 0.8,
        "{} admitted over {span:.1} periods",
        admitted.len()
    );
}

#[test]
fn refund_gives_the_slot_back() {
    let store = MemoryStore::default();
    let w = Window::new(1, Duration::from_secs(60));
    let d = store.quota("a", &w, 100 * S);
    assert!(d.allowed);
    assert!(!store.quota("a", &w, 100 * S).allowed);
    store.refund("a", d.bucket.unwrap());
    assert!(store.quota("a", &w, 100 * S).allowed);
}

#[test]
fn a_backlog_left_by_a_slower_limit_is_capped_at_this_ones_tolerance() {
    // free: 1/s burst 100 used up (TAT 100 s ahead); pro: 50/s burst 100 (tolerance 2 s).
    let free = Gcra::new(1.0, 100);
    let pro = Gcra::new(50.0, 100);
    let now = 1_000 * S;
    let tat = Some(now + 100 * S);
    let (d, _) = free.decide(tat, now);
    assert!(!d.allowed, "free is spent");
    // On pro the backlog counts as pro's burst spent but for one request, which passes; then
    // pro's rate (one per 20 ms), not the 98 s free's backlog would mean.
    let (d, stored) = pro.decide(tat, now);
    assert!(d.allowed, "one request at once");
    let (d, _) = pro.decide(stored, now);
    assert!(!d.allowed);
    assert_eq!(d.retry_after_us, pro.interval_us);
    let (d, _) = pro.decide(stored, now + pro.interval_us);
    assert!(d.allowed, "pro's rate from then on");
}
