//! The L2 response cache against a real `redis-server` over TCP: an L2 hit
//! survives a restart of the agent's cache (empty L1); with Redis killed
//! every call still returns promptly and the breaker opens; when Redis is
//! back on its port the cache uses it again.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use weir_agent::cache::{CacheKey, ResponseCache, Tier};
use weir_crds::cache_policy::{RedisCacheSpec, ResponseCacheSpec, WriteMode};
use weir_crds::common::SecretKeyRef;
use weir_e2e::process::Redis;

fn spec(mode: WriteMode) -> ResponseCacheSpec {
    let mut s = ResponseCacheSpec::default();
    s.l1.max_bytes = Quantity("1Mi".into());
    s.l2 = Some(RedisCacheSpec {
        url_secret_ref: SecretKeyRef {
            name: "unused".into(),
            key: "url".into(),
        },
        key_prefix: "weir-test:".into(),
        ttl_seconds: 60,
        compress_above_bytes: 64,
        write_mode: mode,
        write_behind_queue: 4,
        timeout_ms: 200,
    });
    s
}

fn key(i: u32) -> CacheKey {
    CacheKey::from_canonical(&i.to_le_bytes())
}

async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn l2_survives_restarts_and_outages() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let redis = Redis::start_on(port);
    let big = vec![b'x'; 10_000];

    let first = ResponseCache::new(&spec(WriteMode::WriteThrough), Some(url.clone())).unwrap();
    first.put(key(1), big.clone().into()).await;
    assert_eq!(
        first
            .stats()
            .l2_writes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A new cache (an agent restart): L1 is empty, L2 answers, decompressed.
    let second = ResponseCache::new(&spec(WriteMode::WriteThrough), Some(url.clone())).unwrap();
    let (tier, value) = second.get(&key(1)).await.expect("L2 hit after restart");
    assert_eq!((tier, &value[..]), (Tier::L2, &big[..]));
    assert!(
        matches!(second.get(&key(1)).await, Some((Tier::L1, _))),
        "an L2 hit fills L1"
    );

    // Redis dies: calls stay fast, nothing fails, the breaker opens.
    drop(redis);
    for i in 0..10 {
        let started = Instant::now();
        assert!(second.get(&key(100 + i)).await.is_none());
        second.put(key(200 + i), b"v".to_vec().into()).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a dead Redis must not stall requests"
        );
    }
    assert_eq!(
        second.l2_breaker(),
        Some(1),
        "breaker open after repeated failures"
    );
    assert!(
        matches!(second.get(&key(1)).await, Some((Tier::L1, _))),
        "L1 keeps serving"
    );

    // Redis returns on the same port: after the open period L2 is used again.
    let _redis = Redis::start_on(port);
    second.put(key(3), b"back".to_vec().into()).await;
    eventually("L2 writes to resume", async || {
        second.put(key(3), b"back".to_vec().into()).await;
        let third = ResponseCache::new(&spec(WriteMode::WriteThrough), Some(url.clone())).unwrap();
        matches!(third.get(&key(3)).await, Some((Tier::L2, _)))
    })
    .await;
    assert_eq!(second.l2_breaker(), Some(0), "breaker closed again");
}

#[tokio::test]
async fn write_behind_drops_when_its_queue_is_full() {
    // No Redis at all on this port: the queue fills and drops are counted.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = ResponseCache::new(
        &spec(WriteMode::WriteBehind),
        Some(format!("redis://127.0.0.1:{port}")),
    )
    .unwrap();
    for i in 0..100 {
        cache.put(key(i), b"v".to_vec().into()).await;
    }
    let dropped = cache
        .stats()
        .write_behind_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped > 0, "the bounded queue never dropped");
    assert!(matches!(cache.get(&key(99)).await, Some((Tier::L1, _))));
}

#[tokio::test]
async fn a_new_cache_warms_its_l1_with_the_most_asked_answers() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let _redis = Redis::start_on(port);
    let mut warm_spec = spec(WriteMode::WriteThrough);
    warm_spec.warm_on_start = true;
    warm_spec.popular_keys = 2;

    // One agent's traffic: key 1 asked often, key 2 a few times, key 3 once.
    let first = ResponseCache::new(&warm_spec, Some(url.clone())).unwrap();
    for i in 1..=3 {
        first
            .put(key(i), format!("answer {i}").into_bytes().into())
            .await;
    }
    for (k, times) in [(1, 5), (2, 3), (3, 1)] {
        for _ in 0..times {
            assert!(first.get(&key(k)).await.is_some());
        }
    }
    first.store_popular().await;

    // A restarted agent: empty L1, warmed with the two most asked.
    let second = ResponseCache::new(&warm_spec, Some(url.clone())).unwrap();
    assert_eq!(second.l1_len().await, 0);
    assert_eq!(second.warm(2).await, 2);
    assert!(matches!(second.get(&key(1)).await, Some((Tier::L1, _))));
    assert!(matches!(second.get(&key(2)).await, Some((Tier::L1, _))));
    assert!(
        matches!(second.get(&key(3)).await, Some((Tier::L2, _))),
        "the least asked stays in L2 only"
    );
    let stats = second.stats();
    assert_eq!(stats.warmed.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(
        stats.warmed_hits.load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // Started as the agent does: warms by itself in the background.
    let third = std::sync::Arc::new(ResponseCache::new(&warm_spec, Some(url)).unwrap());
    third.start(&warm_spec);
    eventually("background warming", async || {
        third
            .stats()
            .warmed
            .load(std::sync::atomic::Ordering::Relaxed)
            == 2
    })
    .await;
    assert!(matches!(third.get(&key(1)).await, Some((Tier::L1, _))));
}
